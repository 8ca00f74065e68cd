"""Feast's own SDK works the moment the stack is up, as a Feast user would use it.

`make up` (infra/up.sh) applies the registry that ``feature_store/feature_store.yaml`` names, so
``FeatureStore(repo_path="feature_store")`` from the repository root reads what ``recstack
stream`` wrote, with no ``feast apply`` by hand. The test runs the same ``infra/up.sh`` on a
fresh registry and a private Redis database: the committed YAML, with only those two values
swapped, handed to Feast through its own ``FEAST_FS_YAML_FILE_PATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# What a user gets after `make up`: the registry it applies and Redis 127.0.0.1:6379 db 0.
USER_REGISTRY = "registry: ../.run/feast/registry.db\n"
USER_REDIS = 'connection_string: "127.0.0.1:6379,db=0"\n'


@pytest.fixture
def private_yaml(tmp_path, redis_url) -> Path:
    """The committed feature_store.yaml, pointed at a fresh registry and this test's database."""
    from feature_store.store import connection_string

    text = (REPO / "feature_store" / "feature_store.yaml").read_text()
    assert USER_REGISTRY in text and USER_REDIS in text, (
        "feature_store.yaml no longer names make up's defaults"
    )
    registry = tmp_path / "feast" / "registry.db"
    text = text.replace(USER_REGISTRY, f"registry: {registry}\n")
    text = text.replace(USER_REDIS, f'connection_string: "{connection_string(redis_url)}"\n')
    path = tmp_path / "feature_store.yaml"
    path.write_text(text)
    return path


def test_feature_store_from_the_repository_root_reads_the_streams_features_after_make_up(
    kafka_bootstrap, redis_url, redis_client, fresh_topic, tmp_path, private_yaml, monkeypatch
):
    from test_stream_exactly_once import (
        Published,
        _config,
        _events,
        assert_features_exact,
        consumer_thread,
        publish,
        wait_all_applied,
    )

    env = dict(os.environ, FEAST_FS_YAML_FILE_PATH=str(private_yaml))
    registry = private_yaml.parent / "feast" / "registry.db"
    assert not registry.exists()

    # The start-up step a user runs (the services are already up: only the registry is new).
    up = subprocess.run(
        [str(REPO / "infra" / "up.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"Feast registry {registry}: applied" in up.stdout, up.stdout
    assert registry.is_file()
    # Idempotent: a second start finds the registry current and leaves it as it is.
    before = registry.read_bytes()
    again = subprocess.run(
        [sys.executable, "-m", "feature_store.store"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert f"Feast registry {registry}: already current" in again.stdout, again.stdout
    assert registry.read_bytes() == before

    topic = fresh_topic(3)
    fresh_topic(1, name=f"{topic}.dlq")
    published = Published()
    publish(kafka_bootstrap, topic, _events(300, seed=15), published)
    with consumer_thread(_config(kafka_bootstrap, redis_url, topic, tmp_path / "events")):
        wait_all_applied(redis_client, topic, published)

    from feast import FeatureStore

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("FEAST_FS_YAML_FILE_PATH", str(private_yaml))
    store = FeatureStore(repo_path="feature_store")
    assert_features_exact(store, published.events)
