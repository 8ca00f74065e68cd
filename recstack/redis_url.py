"""Redis URLs of recstack: one server (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster.

A cluster is named by ``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://``
for TLS): any reachable nodes of the cluster, from which the client learns the rest. A cluster has
only database 0, so the path is empty or ``/0``. Plain URLs keep redis-py's meaning unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from recstack.errors import UserError

SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_PORT = 6379


@dataclass(frozen=True, slots=True)
class ClusterURL:
    """A parsed ``redis+cluster://`` URL."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def is_cluster(url: str) -> bool:
    """True for a ``redis+cluster://`` or ``rediss+cluster://`` URL."""
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def parse_cluster(url: str, flag: str = "--redis") -> ClusterURL:
    """``redis+cluster://[user:password@]host:port[,host:port...][/0]`` -> :class:`ClusterURL`."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise UserError(f"{flag}: expected a redis+cluster:// URL, got {url!r}")
    netloc, _, path = rest.partition("/")
    path = path.split("?", 1)[0].strip("/")
    if path not in ("", "0"):
        raise UserError(f"{flag}: a Redis Cluster has only database 0, got /{path} in {url!r}")
    credentials, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if not colon:  # redis://secret@host means a password, as redis-py reads it
            username, password = None, unquote(user)
    nodes = []
    for node in hosts.split(","):
        host, colon, port = node.strip().rpartition(":")
        if not colon:
            host, port = node.strip(), str(DEFAULT_PORT)
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"{flag}: expected HOST:PORT for every cluster node, got {node!r} in {url!r}")
        nodes.append((host, int(port)))
    return ClusterURL(tuple(nodes), username, password, scheme.lower() == "rediss+cluster")


def check(url: str, flag: str = "--redis") -> str:
    """``url`` when recstack can use it, else a :class:`UserError` naming ``flag``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in CLUSTER_SCHEMES:
        parse_cluster(url, flag)
    elif scheme not in SINGLE_SCHEMES:
        raise UserError(
            f"{flag}: expected redis://HOST:PORT/DB, rediss://, unix:// or "
            f"redis+cluster://HOST:PORT[,HOST:PORT...], got {url!r}"
        )
    return url


def connect(url: str, **kwargs: Any) -> Any:
    """A redis-py client for ``url``: ``redis.Redis`` for one server, ``redis.cluster.RedisCluster``
    for a cluster (keyword arguments such as ``socket_timeout`` go to either)."""
    import redis

    if not is_cluster(url):
        return redis.Redis.from_url(url, **kwargs)
    from redis.cluster import ClusterNode, RedisCluster

    parsed = parse_cluster(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        username=parsed.username,
        password=parsed.password,
        ssl=parsed.ssl,
        **kwargs,
    )
