"""Test-suite wide settings. Kept light: no heavy imports here, so unit tests start fast.

The fixtures that talk to the real Kafka broker and Redis server live in
``tests/integration/conftest.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Versions published by tests leave their AOTInductor compilation (half a minute or more each)
# to the tests that are about it (they ask for served_form="aoti"); everything else serves the
# TorchScript form, which the server falls back to anyway. Subprocesses inherit the setting.
os.environ.setdefault("RECSTACK_SERVED_FORM", "torchscript")


def pytest_report_header(config: pytest.Config) -> list[str]:
    kafka = (
        os.environ.get("RECSTACK_BOOTSTRAP") or f"127.0.0.1:{os.environ.get('RECSTACK_KAFKA_PORT', '9092')}"
    )
    redis = (
        os.environ.get("RECSTACK_REDIS")
        or f"redis://127.0.0.1:{os.environ.get('RECSTACK_REDIS_PORT', '6379')}"
    )
    return [f"recstack integration targets: kafka {kafka}, redis {redis} (start them with `make up`)"]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root folder (where pyproject.toml is)."""
    return REPO_ROOT


def pytest_configure(config: pytest.Config) -> None:
    """Hypothesis profiles: ``ci`` (default: a bounded number of examples, seconds per test) and
    ``long`` (``RECSTACK_FUZZ_PROFILE=long``: many more, for fuzzing on demand). No deadline in
    either: the machine is shared, and a slow example is not a wrong one."""
    from hypothesis import settings

    settings.register_profile("ci", max_examples=100, deadline=None)
    settings.register_profile("long", max_examples=5_000, deadline=None)
    settings.load_profile(os.environ.get("RECSTACK_FUZZ_PROFILE", "ci"))
