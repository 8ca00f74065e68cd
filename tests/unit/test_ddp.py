"""The same ``recstack train`` under torchrun: 2 CPU processes, DDP over gloo, one published version."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from models.artifacts import list_versions, load_version
from recstack.sources import synthetic


def test_two_process_gloo_training_publishes_one_version(tmp_path):
    log = tmp_path / "events.jsonl"
    frame = synthetic(1_500, n_users=40, n_items=60, n_categories=6, seed=5)
    with log.open("w") as fh:
        for row in frame.itertuples(index=False):
            fh.write(
                json.dumps(
                    {
                        "event_id": row.event_id,
                        "user_id": row.user_id,
                        "item_id": row.item_id,
                        "event_type": row.event_type,
                        "ts": int(row.ts),
                    }
                )
                + "\n"
            )
    until = int(frame["ts"].quantile(0.8))
    from models.data import ms_to_rfc3339

    out = tmp_path / "models"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "recstack.cli",
        "--log-level",
        "WARNING",
        "train",
        "--events",
        str(log),
        "--until",
        ms_to_rfc3339(until),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--embedding-dim",
        "8",
        "--no-bench",
        "--no-progress",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    versions = list_versions(out)
    assert len(versions) == 1  # rank 0 alone publishes
    metrics = json.loads((versions[0] / "metrics.json").read_text())
    assert metrics["training"]["world_size"] == 2
    load_version(versions[0]).warmup()
