"""``recstack chaos`` end to end, short: a stream consumer and an attribution consumer SIGKILLed and
Redis restarted under traffic, with impressions and an A/B experiment on.

The real broker and Redis of `make up`, real ``recstack stream`` and ``recstack serve`` processes
started by the command itself. Only what does not depend on the machine's speed is asserted:
the features equal the truth (nothing lost, nothing applied twice), the dead-letter topic holds
exactly the malformed records, the ranking clients saw no status the contract does not allow,
every impression is published or counted, and the per-arm attributions equal the offline join.
The latency figures are in the report; they are not asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
INVARIANTS = (
    "stream caught up",
    "features = truth (none lost, none applied twice)",
    "DLQ = malformed sent",
    "ranking errors only DEADLINE_EXCEEDED/RESOURCE_EXHAUSTED",
)
EXPERIMENT_INVARIANTS = (
    "impressions: answers = published + dropped + failed, published on the topic",
    "attribution: per-arm counters = offline join of the topics",
)


def small_model(models_dir: Path) -> Path:
    """A small random model of the served architecture (training one would take longer than the run)."""
    import numpy as np
    import torch

    from models.artifacts import publish_version
    from models.model import ItemEmbeddingConfig, RankerConfig, TwoPathRanker
    from models.vocab import ItemVocab

    vocab = ItemVocab([f"item-{k}" for k in range(300)])
    torch.manual_seed(0)
    model = TwoPathRanker(RankerConfig(embedding=ItemEmbeddingConfig(num_rows=len(vocab), dim=16)))
    stats = np.random.default_rng(0).gamma(1.0, 10.0, size=(len(vocab), 4)).astype(np.float32)
    return publish_version(
        models_dir, model, vocab, stats, {"note": "test model"}, version="v20240101-000000"
    )


def test_short_chaos_run_loses_nothing(kafka_bootstrap, redis_url, redis_db, tmp_path):
    redis = urlsplit(redis_url)
    attribution_db = urlsplit(redis_db(1)).path.lstrip("/")
    out = tmp_path / "chaos"
    small_model(tmp_path / "models")
    cmd = [
        sys.executable, "-m", "recstack.cli", "chaos", "--quick", "--attribution-redis-db", attribution_db,
        "--faults", "consumer-kill,attribution-kill,redis-restart",
        "--out", str(out), "--kafka-port", kafka_bootstrap.rsplit(":", 1)[1], "--redis-port", str(redis.port),
        "--redis-db", redis.path.lstrip("/"), "--models", str(tmp_path / "models"), "--event-rate", "300",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    report = out / "results.json"
    assert result.returncode in (0, 1) and report.is_file(), result.stdout[-3000:] + result.stderr[-3000:]

    data = json.loads(report.read_text())
    faults = {f["name"]: f for f in data["faults"]}
    assert list(faults) == ["consumer-kill", "attribution-kill", "redis-restart"]
    assert not faults["consumer-kill"]["skipped"] and not faults["attribution-kill"]["skipped"]
    for fault in faults.values():
        if fault["skipped"]:  # Redis not started by `make up`: it cannot be restarted
            continue
        checks = {c["name"]: c for c in fault["checks"]}
        for name in INVARIANTS:
            assert checks[name]["ok"], (fault["name"], checks[name])
        assert (
            "0 lost, 0 applied twice" in checks["features = truth (none lost, none applied twice)"]["detail"]
        )
    # Impressions and attribution: checked after attribution-kill and after the run's last fault.
    ran = [f for f in faults.values() if not f["skipped"]]
    for fault in (faults["attribution-kill"], ran[-1]):
        checks = {c["name"]: c for c in fault["checks"]}
        for name in EXPERIMENT_INVARIANTS:
            assert checks[name]["ok"], (fault["name"], checks[name])
    kill_checks = {c["name"]: c for c in faults["attribution-kill"]["checks"]}
    assert kill_checks["the killed attribution consumer held partitions"]["ok"]
    assert data["meta"]["followup_events"] > 0 and set(data["meta"]["arms"]) == {"A", "B"}
    assert data["meta"]["events_sent"]["malformed"] > 0 and data["meta"]["events_sent"]["duplicates"] > 0
    text = (out / "reliability.md").read_text()
    assert "| fault | what was checked | result | figures |" in text
    assert (out / "timeline.png").read_bytes()[:4] == b"\x89PNG"
