"""``open_store(redis_url)``: Feast's own ``FeatureStore`` on any Redis database or Redis Cluster.

The configuration is built in code rather than read from ``feature_store.yaml`` (whose
``${VAR}`` expansion has no defaults), so the same definitions serve every Redis URL, database
index included. The file registry lives outside the package, in ``RECSTACK_FEAST_DIR``
(default ``.run/feast`` under the working directory), and is (re)applied from
:mod:`feature_store.definitions` whenever it is missing or differs from them.

``python -m feature_store.store`` (run by ``make up``) applies the same definitions to the
registry that ``feature_store.yaml`` names (``.run/feast/registry.db``, the file ``open_store``
uses from the repository root), so that ``FeatureStore(repo_path="feature_store")`` reads the
stream's features with no ``feast apply`` by hand. Feast's ``FEAST_FS_YAML_FILE_PATH`` points
it at another configuration file.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from recstack import redis_url as redis_urls

if TYPE_CHECKING:
    from collections.abc import Iterator

    from feast import FeatureStore

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_FEAST_DIR = ".run/feast"
FEAST_DIR_ENV = "RECSTACK_FEAST_DIR"


def feast_dir() -> Path:
    """Where the registry is kept: ``$RECSTACK_FEAST_DIR`` or ``.run/feast`` (created on demand)."""
    return Path(os.environ.get(FEAST_DIR_ENV) or DEFAULT_FEAST_DIR).resolve()


def connection_string(redis_url: str) -> str:
    """Feast's connection string for any URL :func:`recstack.redis_url.parse` accepts:
    ``host:port,db=N[,username=...][,password=...][,ssl=true]`` for one server (a ``unix://`` socket
    as ``unix_socket_path=...``, which Feast hands to ``redis.Redis``), and
    ``host:port,host:port[,username=...][,password=...][,ssl=true]`` for a cluster (Feast's form for
    ``redis_type: redis_cluster``)."""
    parsed = redis_urls.parse(redis_url)
    if parsed.cluster:
        pieces = [f"{host}:{port}" for host, port in parsed.nodes]
    elif parsed.socket_path is not None:
        # Feast needs a host:port first; redis-py ignores both once it has a socket path.
        pieces = ["localhost:6379", f"unix_socket_path={_feast_value(parsed.socket_path)}", f"db={parsed.db}"]
    else:
        host, port = parsed.nodes[0]
        pieces = [f"{host}:{port}", f"db={parsed.db}"]
    if parsed.username:
        pieces.append(f"username={_feast_value(parsed.username)}")
    if parsed.password is not None:
        pieces.append(f"password={_feast_value(parsed.password)}")
    if parsed.ssl:
        pieces.append("ssl=true")
    if parsed.ssl_ca_certs:
        pieces.append(f"ssl_ca_certs={_feast_value(parsed.ssl_ca_certs)}")
    return ",".join(pieces)


def _feast_value(text: str) -> str:
    """A credential as Feast's connection string needs it. Feast splits the string at commas and
    ``json.loads`` each value, so a bare ``123``, ``true`` or ``null`` would reach Redis as a
    number, a bool or nothing: a JSON string (commas escaped) reads back exactly as given."""
    return json.dumps(text).replace(",", "\\u002c")


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # Several processes (consumer, ranking, tests) may open the store at once; only one applies.
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "apply.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _schema(view) -> list[tuple[str, str]]:
    return [(f.name, str(f.dtype)) for f in view.features]


def _registry_is_current(store: FeatureStore) -> bool:
    from feature_store import definitions

    try:
        stored = {fv.name: fv for fv in store.list_feature_views()}
    except Exception:  # an unreadable or empty registry: apply again
        return False
    return all(
        fv.name in stored and _schema(stored[fv.name]) == _schema(fv) for fv in definitions.FEATURE_VIEWS
    )


def open_store(redis_url: str, directory: str | Path | None = None) -> FeatureStore:
    """A ``feast.FeatureStore`` (project ``recstack``) whose online store is ``redis_url``.

    ``directory`` holds the registry file (default :func:`feast_dir`). The definitions are
    applied when the registry is missing or out of date, under a file lock.
    """
    from feast import FeatureStore, RepoConfig
    from feast.infra.online_stores.redis import RedisOnlineStoreConfig
    from feast.repo_config import RegistryConfig

    from feature_store import definitions

    root = Path(directory).resolve() if directory is not None else feast_dir()
    config = RepoConfig(
        project=definitions.PROJECT_NAME,
        provider="local",
        registry=RegistryConfig(registry_type="file", path=str(root / "registry.db"), cache_ttl_seconds=60),
        online_store=RedisOnlineStoreConfig(
            redis_type="redis_cluster" if redis_urls.is_cluster(redis_url) else "redis",
            connection_string=connection_string(redis_url),
        ),
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
    )
    store = FeatureStore(repo_path=str(REPO_DIR), config=config)
    ensure_applied(store, root)
    return store


def ensure_applied(store: FeatureStore, lock_dir: Path) -> bool:
    """Apply :mod:`feature_store.definitions` to ``store``'s registry unless it already holds them,
    under a file lock in ``lock_dir``. Returns whether it applied. A partial apply: nothing is
    deleted from the registry or the online store, so running it again is harmless."""
    from feature_store import definitions

    with _locked(lock_dir):
        if _registry_is_current(store):
            return False
        store.apply(
            [
                definitions.project,
                *definitions.ENTITIES,
                definitions.user_activity_push,
                definitions.item_popularity_push,
                *definitions.FEATURE_VIEWS,
            ]
        )
        store.refresh_registry()
        return True


def registry_path(store: FeatureStore) -> Path:
    """The registry file of ``store``: a relative path in the YAML is relative to the repo folder."""
    path = Path(store.config.registry.path)
    return path if path.is_absolute() else (Path(store.repo_path) / path).resolve()


def main() -> int:
    """Apply the definitions to the registry of ``feature_store.yaml`` (``make up`` runs this)."""
    started = time.monotonic()
    from feast import FeatureStore

    # Exactly what a Feast user opens: the YAML of this folder, or $FEAST_FS_YAML_FILE_PATH.
    store = FeatureStore(repo_path=str(REPO_DIR))
    registry = registry_path(store)
    applied = ensure_applied(store, registry.parent)
    took = time.monotonic() - started
    print(
        f"Feast registry {registry}: {'applied' if applied else 'already current'} in {took:.1f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
