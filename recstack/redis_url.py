"""Redis URLs of recstack: the one parser every Redis client of the project reads its URL with.

Accepted forms (a password or user name percent-encoded: ``@`` as ``%40``, ``/`` as ``%2F``):

* ``redis://host:port/db``, ``rediss://…`` (TLS), with credentials as ``redis://:password@…``,
  ``redis://user:password@…`` or in the query: ``redis://host:port/db?password=…[&username=…]``;
  ``?db=N`` may stand for the path's database; ``rediss://…?ssl_ca_certs=/path/ca.crt`` trusts a
  private CA (the system's CAs otherwise);
* ``unix:///path/to/redis.sock?db=N&password=…`` (or ``unix://:password@/path?db=N``);
* a Redis Cluster: ``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://``
  for TLS), ``?password=`` and ``?username=`` too: any reachable nodes, from which the client learns
  the rest. A cluster has only database 0, so the path is empty or ``/0``.

User info without a colon (``redis://name@host``) is a user name, as RFC 3986 and redis-py read it;
its password then comes from the query, ``RECSTACK_REDIS_PASSWORD`` or ``--redis-password-file``.
A password given both in the user info and the query, or any other query parameter, is an error.

:func:`parse` gives a :class:`RedisURL`; :func:`connect` a redis-py client; the ranking fast path
(``services.ranking.redis_client``) and Feast's connection string (``feature_store.store``) are
built from the same :class:`RedisURL`. :func:`redact` is what every log line and error shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from recstack.errors import UserError

SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_PORT = 6379
QUERY_PARAMETERS = ("db", "password", "username", "ssl_ca_certs")
_FORMS = (
    "redis://[[user]:password@]HOST:PORT/DB[?password=...], rediss://..., "
    "unix:///PATH?db=N[&password=...] or redis+cluster://[[user]:password@]HOST:PORT[,HOST:PORT...]"
)


@dataclass(frozen=True, slots=True)
class RedisURL:
    """A parsed Redis URL: one server (TCP or Unix socket) or the seed nodes of a cluster."""

    scheme: str  # redis, rediss, unix, redis+cluster or rediss+cluster
    nodes: tuple[tuple[str, int], ...] = ()  # one for redis/rediss, one or more for a cluster, none for unix
    socket_path: str | None = None  # unix:// only
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl_ca_certs: str | None = None  # rediss only: a PEM file of CAs to trust instead of the system's

    @property
    def cluster(self) -> bool:
        return self.scheme in CLUSTER_SCHEMES

    @property
    def ssl(self) -> bool:
        return self.scheme in ("rediss", "rediss+cluster")

    def node(self, host: str, port: int) -> RedisURL:
        """One node of this cluster as a single-server URL with the same credentials and TLS."""
        scheme = "rediss" if self.ssl else "redis"
        return RedisURL(scheme, ((host, port),), None, 0, self.username, self.password, self.ssl_ca_certs)

    def with_password(self, password: str) -> RedisURL:
        return replace(self, password=password)

    def redis_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``redis.Redis`` for one server."""
        if self.cluster:
            raise ValueError("a Redis Cluster URL has no single-server client")
        kwargs: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.socket_path is not None:
            kwargs["unix_socket_path"] = self.socket_path
        else:
            kwargs["host"], kwargs["port"] = self.nodes[0]
            kwargs["ssl"] = self.ssl
            if self.ssl_ca_certs is not None:
                kwargs["ssl_ca_certs"] = self.ssl_ca_certs
        return kwargs

    def to_url(self) -> str:
        """This URL in the canonical form (credentials in the user info)."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        elif self.username:
            auth = f"{quote(self.username, safe='')}@"
        if self.socket_path is not None:
            return f"unix://{auth}{quote(self.socket_path)}?db={self.db}"
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        cafile = f"?ssl_ca_certs={quote(self.ssl_ca_certs, safe='/')}" if self.ssl_ca_certs else ""
        return f"{self.scheme}://{auth}{hosts}/{self.db}{cafile}"

    def __str__(self) -> str:
        return redact(self.to_url())


def is_cluster(url: str) -> bool:
    """True for a ``redis+cluster://`` or ``rediss+cluster://`` URL."""
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


_SHOWN_PARAMETERS = ("db", "username", "ssl_ca_certs")  # query values that are no secret


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs and errors; never raises.

    Works on the text, not on a parse, so a malformed URL (the kind that ends up in an error
    message) leaks nothing either. Hidden: the user info after its first colon up to the last
    ``@``, and the value of every query parameter but ``db``, ``username`` and ``ssl_ca_certs`` (a misspelt
    ``?pasword=`` too). Where the two readings of an odd URL disagree, both are hidden.
    """
    hide = [False] * len(url)
    start = url.find("://") + 3 if "://" in url else 0
    at = url.rfind("@")
    colon = url.find(":", start)
    if at > start and 0 <= colon < at:
        hide[colon + 1 : at] = [True] * (at - colon - 1)
    query = url.find("?")
    if query >= 0:
        position = query + 1
        for piece in url[query + 1 :].split("&"):
            name, eq, _ = piece.partition("=")
            first = position + len(name) + 1 if eq else position
            if not eq or name.lower() not in _SHOWN_PARAMETERS:
                hide[first : position + len(piece)] = [True] * (position + len(piece) - first)
            position += len(piece) + 1
    out: list[str] = []
    for i, char in enumerate(url):
        if not hide[i]:
            out.append(char)
        elif i == 0 or not hide[i - 1]:
            out.append("***")
    return "".join(out)


def _fail(flag: str, url: str, reason: str) -> UserError:
    return UserError(f"{flag}: {reason} in {redact(url)!r}")


def _quoted(url: str, part: str) -> str:
    """``part`` of ``url`` quoted for an error message, unless redaction hides it (a malformed URL
    whose password was cut at an unencoded ``?`` may put pieces of it where a port is expected)."""
    return repr(part) if part in redact(url) else "(a part hidden as it may hold the password)"


def _port(text: str, flag: str, url: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise _fail(flag, url, f"expected a port 1-65535, got {_quoted(url, text)}")
    return int(text)


def _host_port(node: str, flag: str, url: str) -> tuple[str, int]:
    node = node.strip()
    if node.startswith("["):  # [IPv6]:port
        host, _, after = node[1:].partition("]")
        port = after.removeprefix(":") or str(DEFAULT_PORT)
    else:
        host, colon, port = node.rpartition(":")
        if not colon:
            host, port = node, str(DEFAULT_PORT)
    if not host:
        raise _fail(flag, url, f"expected HOST:PORT, got {_quoted(url, node)}")
    return unquote(host), _port(port, flag, url)


def _db(text: str, flag: str, url: str) -> int:
    if not text.isdigit():
        raise _fail(flag, url, f"the database must be a number, got {_quoted(url, text)}")
    return int(text)


def parse(url: str, flag: str = "--redis") -> RedisURL:
    """Any accepted Redis URL -> :class:`RedisURL`; a :class:`UserError` naming ``flag`` and the
    (redacted) URL otherwise."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SINGLE_SCHEMES + CLUSTER_SCHEMES:
        raise UserError(f"{flag}: expected {_FORMS}, got {redact(url)!r}")
    rest, _, query = rest.partition("?")
    # The user info ends at the last '@' before the path, so an unencoded '@' in a password still parses.
    authority_end = rest.find("/", rest.rfind("@") + 1)
    netloc, path = (rest, "") if authority_end < 0 else (rest[:authority_end], rest[authority_end:])
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None

    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _fail(flag, url, "malformed query") from None
    for name, value in pairs:
        if name not in QUERY_PARAMETERS:
            raise _fail(
                flag,
                url,
                f"unknown parameter {_quoted(url, name)} (recstack reads {', '.join(QUERY_PARAMETERS)})",
            )
        if name in params:
            raise _fail(flag, url, f"parameter {_quoted(url, name)} given twice")
        params[name] = value
    for name, current in (("password", password), ("username", username)):
        given = params.get(name)
        if given is not None and current is not None and given != current:
            raise _fail(flag, url, f"the {name} is given twice (in the user info and in ?{name}=)")
    password = params.get("password") or password
    username = params.get("username") or username
    cafile = params.get("ssl_ca_certs") or None
    if cafile is not None and scheme not in ("rediss", "rediss+cluster"):
        raise _fail(flag, url, "ssl_ca_certs needs TLS: rediss:// or rediss+cluster://")

    db_text = params.get("db")
    if scheme == "unix":
        if hosts not in ("", "localhost"):
            raise _fail(flag, url, "a unix:// URL names a socket path, not a host")
        socket_path = unquote(path)
        if not socket_path:
            raise _fail(flag, url, "expected unix:///PATH/TO/SOCKET")
        db = _db(db_text, flag, url) if db_text is not None else 0
        return RedisURL(scheme, (), socket_path, db, username, password)

    path_db = path.strip("/")
    if path_db and db_text is not None and path_db != db_text:
        raise _fail(flag, url, f"two databases: /{_quoted(url, path_db)} and ?db={_quoted(url, db_text)}")
    db = _db(db_text if db_text is not None else path_db or "0", flag, url)
    if scheme in CLUSTER_SCHEMES:
        if db != 0:
            raise _fail(flag, url, f"a Redis Cluster has only database 0, got {db}")
        if not hosts:
            raise _fail(flag, url, "expected HOST:PORT for every cluster node")
        nodes = tuple(_host_port(node, flag, url) for node in hosts.split(","))
        return RedisURL(scheme, nodes, None, 0, username, password, cafile)
    if not hosts or "," in hosts:
        raise _fail(flag, url, "expected one HOST:PORT (a cluster is named redis+cluster://)")
    return RedisURL(scheme, (_host_port(hosts, flag, url),), None, db, username, password, cafile)


def parse_cluster(url: str, flag: str = "--redis") -> RedisURL:
    """:func:`parse` of a ``redis+cluster://`` URL (an error for any other)."""
    parsed = parse(url, flag)
    if not parsed.cluster:
        raise UserError(f"{flag}: expected a redis+cluster:// URL, got {redact(url)!r}")
    return parsed


def check(url: str, flag: str = "--redis") -> str:
    """``url`` when recstack can use it, else a :class:`UserError` naming ``flag``."""
    parse(url, flag)
    return url


def connect(url: str | RedisURL, **kwargs: Any) -> Any:
    """A redis-py client for ``url``: ``redis.Redis`` for one server, ``redis.cluster.RedisCluster``
    for a cluster (keyword arguments such as ``socket_timeout`` go to either)."""
    import redis

    parsed = parse(url) if isinstance(url, str) else url
    if not parsed.cluster:
        # Built from the canonical URL, as redis-py builds any URL's client: its connections hand
        # a dropped connection to the caller, where a client built from keywords would retry the
        # command up to three times by itself. The stream consumer counts and handles those
        # errors (a restarted Redis must not go unnoticed).
        extra = {"ssl_ca_certs": parsed.ssl_ca_certs} if parsed.ssl_ca_certs else {}
        return redis.Redis.from_url(replace(parsed, ssl_ca_certs=None).to_url(), **extra, **kwargs)
    from redis.cluster import ClusterNode, RedisCluster

    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        username=parsed.username,
        password=parsed.password,
        ssl=parsed.ssl,
        **({"ssl_ca_certs": parsed.ssl_ca_certs} if parsed.ssl_ca_certs else {}),
        **kwargs,
    )
