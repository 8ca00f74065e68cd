"""docs/CONTRACT.md is in the repository, every reference points at it and the sections cited exist,
and the names and defaults it states are the ones the code has."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTRACT = REPO / "docs" / "CONTRACT.md"


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    keep = (".py", ".md", ".proto", ".yaml", ".yml", ".toml", ".sh")
    return [REPO / name for name in out.splitlines() if name.endswith(keep) and (REPO / name).is_file()]


def test_every_contract_reference_points_at_docs_contract_and_an_existing_section():
    sections = set(re.findall(r"^## (\d+)\. ", CONTRACT.read_text(), flags=re.M))
    assert sections == {"1", "2", "3", "4", "5", "6"}
    cited = 0
    for path in _tracked_text_files():
        if path in (CONTRACT, Path(__file__).resolve()):  # this file names it in code
            continue
        text = path.read_text(errors="replace")
        for match in re.finditer(r"(\S*)CONTRACT\.md(\)?)(?: sections? (\d)(?: and (\d))?)?", text):
            prefix = match.group(1)
            inside_docs = path.parent == CONTRACT.parent
            where = f"{path.relative_to(REPO)}: {match.group(0)}"
            assert prefix.endswith("docs/") or (inside_docs and prefix.endswith("(")), where
            for number in match.group(3, 4):
                assert number is None or number in sections, where
            cited += 1
        assert not re.search(r"CONTRACT (section )?\d", text), f"{path}: a reference without docs/CONTRACT.md"
    assert cited >= 15


def test_the_contract_states_the_names_and_defaults_the_code_has():
    from recstack.events import EVENT_TYPES, MAX_ID_LENGTH
    from services.ranking.config import RankingConfig
    from services.stream.config import StreamConfig

    text = " ".join(CONTRACT.read_text().split())
    stream, ranking = StreamConfig(), RankingConfig()
    assert f"Topic `{stream.topic}`" in text and f"the topic `{stream.dlq_topic}`" in text
    assert f"`--group NAME` (default `{stream.group}`)" in text
    assert (
        f"(default `{stream.event_log}`" in text
        and f"`--dedup-window-s S` ({stream.dedup_window_s:,})" in text
    )
    assert f"{stream.max_future_skew / 60:g} minutes" in text
    assert all(f"`{kind}`" in text for kind in EVENT_TYPES)
    assert f"1-{MAX_ID_LENGTH} characters" in text and f"at most {MAX_ID_LENGTH} characters" in text
    assert f"`{ranking.host}:{ranking.port}`" in text
    assert f"`{ranking.metrics_host}:{ranking.metrics_port}` ranking" in text
    assert f"`{stream.metrics_host}:{stream.metrics_port}` stream consumer" in text
    assert f"`{ranking.models_dir}/`" in text and f"`{ranking.redis_url}`" in text
    assert f"1 to {ranking.max_candidates:,} by default" in text
    assert f"0 = the default, {ranking.default_recommend_k}" in text
