"""A lean Redis client for the ranking hot path: one pipelined round trip of HMGETs, parsed in C.

redis-py's pipeline spends ~15 µs of Python per command (command objects, packing, response
callbacks): 1.5 ms for the 100 HMGETs of one request, longer than the network round trip and
all of it holding the GIL the event loop needs. This client packs each command once (the
packed bytes of a key are cached; the field list is packed once), writes the whole pipeline
with one ``sendall`` and lets hiredis parse every reply, ~1-2 µs per command.

It implements only what :func:`feature_store.reads.read_features` uses (``pipeline()``,
``hmget``, ``execute``), plus ``ping`` and ``close``, so the feature layout stays the feature
store's business and only the transport is ours. Each thread has its own connection (the
batcher's workers read concurrently); any error or timeout closes that connection and raises
a ``redis`` exception, and the next call reconnects.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any

import hiredis
import redis
from redis.crc import key_slot

from recstack import redis_url as redis_urls
from recstack.redis_url import RedisURL

_KEY_CACHE_MAX = 500_000


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def pack(*parts: str | bytes) -> bytes:
    """One command in the Redis protocol (RESP2)."""
    encoded = [_as_bytes(p) for p in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(_bulk(p) for p in encoded)


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = hiredis.Reader()
        self.buffer = bytearray(1 << 16)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class PipelinedRedis:
    """One Redis server, its URL in any form :func:`recstack.redis_url.parse` accepts (credentials in
    the user info or ``?password=``, ``rediss://``, ``unix:///path?db=N``); ``timeout_s`` bounds
    connecting and every read of a reply."""

    def __init__(self, url: str | RedisURL, timeout_s: float) -> None:
        parsed = redis_urls.parse(url) if isinstance(url, str) else url
        if parsed.cluster:
            raise ValueError(f"a Redis Cluster URL needs ClusterPipelinedRedis, got {parsed}")
        self._scheme = parsed.scheme
        self._host, self._port = parsed.nodes[0] if parsed.nodes else ("", 0)
        self._path = parsed.socket_path or ""
        self._db = parsed.db
        self._username = parsed.username
        self._password = parsed.password
        self._cafile = parsed.ssl_ca_certs
        self._timeout = timeout_s
        self._local = threading.local()
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self._hmget_heads: dict[bytes, bytes] = {}
        # id(field list) -> (the list itself, kept so its id stays unique; count; packed fields)
        self._field_tails: dict[int, tuple[Sequence[bytes], int, bytes]] = {}

    # --- connections ---------------------------------------------------------------------------
    def _connect(self) -> _Connection:
        try:
            if self._scheme == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._timeout)
                sock.connect(self._path)
            else:
                sock = socket.create_connection((self._host, self._port), timeout=self._timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._scheme == "rediss":
                    context = ssl.create_default_context(cafile=self._cafile)
                    sock = context.wrap_socket(sock, server_hostname=self._host)
        except OSError as exc:
            raise redis.ConnectionError(f"cannot connect to Redis: {exc}") from exc
        conn = _Connection(sock)
        setup: list[bytes] = []
        if self._password is not None:
            setup.append(
                pack("AUTH", self._username, self._password)
                if self._username
                else pack("AUTH", self._password)
            )
        if self._db:
            setup.append(pack("SELECT", str(self._db)))
        if setup:
            try:
                self._roundtrip(conn, setup)
            except redis.ResponseError as exc:
                conn.close()
                if str(exc).startswith(("WRONGPASS", "NOAUTH", "invalid password", "invalid username")):
                    raise redis.AuthenticationError(str(exc)) from None
                raise
            except BaseException:
                conn.close()
                raise
        with self._lock:
            self._connections.append(conn)
        return conn

    def _connection(self) -> _Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._local.conn = None
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    # --- protocol ------------------------------------------------------------------------------
    def _roundtrip(self, conn: _Connection, commands: Sequence[bytes]) -> list[Any]:
        """Send ``commands`` at once and return their replies in order; raises on any error reply."""
        self._send(conn, commands)
        replies = self._receive(conn, len(commands))
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise redis.ResponseError(str(reply))
        return replies

    def _send(self, conn: _Connection, commands: Sequence[bytes]) -> None:
        try:
            conn.sock.sendall(b"".join(commands))
        except TimeoutError as exc:
            raise redis.TimeoutError(f"Redis did not answer within {self._timeout * 1000:.0f} ms") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"Redis connection failed: {exc}") from exc

    def _receive(self, conn: _Connection, want: int) -> list[Any]:
        """The next ``want`` replies, error replies included (as ``hiredis.ReplyError``)."""
        sock, reader, buffer = conn.sock, conn.reader, conn.buffer
        replies: list[Any] = []
        try:
            while len(replies) < want:
                reply = reader.gets()
                if reply is False:
                    n = sock.recv_into(buffer)
                    if n == 0:
                        raise redis.ConnectionError("Redis closed the connection")
                    reader.feed(buffer, 0, n)  # type: ignore[arg-type]  # hiredis takes any buffer
                    continue
                replies.append(reply)
        except TimeoutError as exc:
            raise redis.TimeoutError(f"Redis did not answer within {self._timeout * 1000:.0f} ms") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"Redis connection failed: {exc}") from exc
        return replies

    def execute_packed(self, commands: Sequence[bytes]) -> list[Any]:
        conn = self._connection()
        try:
            return self._roundtrip(conn, commands)
        except redis.ResponseError:
            raise  # the connection is still in step
        except BaseException:
            self._drop(conn)  # a timed-out or broken connection may hold half a reply
            raise

    def pack_hmget(self, key: bytes, fields: Sequence[bytes]) -> bytes:
        """``HMGET key *fields``; callers pass the same field list object each time (a constant)."""
        tail = self._field_tails.get(id(fields))
        if tail is None or tail[0] is not fields:
            tail = self._field_tails[id(fields)] = (fields, len(fields), b"".join(_bulk(f) for f in fields))
        head = self._hmget_heads.get(key)
        if head is None:
            if len(self._hmget_heads) >= _KEY_CACHE_MAX:
                self._hmget_heads.clear()
            head = self._hmget_heads[key] = b"*%d\r\n$5\r\nHMGET\r\n%s" % (2 + tail[1], _bulk(key))
        return head + tail[2]

    # --- the redis-py surface read_features uses ----------------------------------------------
    def pipeline(self, transaction: bool = False) -> _Pipeline:
        if transaction:
            raise ValueError("PipelinedRedis only runs non-transactional pipelines")
        return _Pipeline(self)

    def ping(self) -> bool:
        return self.execute_packed([pack("PING")])[0] == b"PONG"


class _Pipeline:
    def __init__(self, client: PipelinedRedis) -> None:
        self._client = client
        self._commands: list[bytes] = []
        self._fields: tuple[bytes, ...] | None = None

    def hmget(self, name: bytes | str, keys: Sequence[bytes], *args: bytes) -> _Pipeline:
        fields = [*keys, *args] if args else keys
        self._commands.append(self._client.pack_hmget(_as_bytes(name), fields))
        return self

    def execute(self) -> list[Any]:
        if not self._commands:
            return []
        try:
            return self._client.execute_packed(self._commands)
        finally:
            self._commands = []


# ------------------------------------------------------------------------------- Redis Cluster

_SLOTS = 16384


class ClusterPipelinedRedis:
    """The same lean transport for a Redis Cluster (``redis+cluster://host:port[,host:port...]``).

    A pipeline's commands are grouped by the node that serves each key's slot (the slot map comes
    from ``CLUSTER SLOTS``, loaded on first use and again after a redirection or a failed ping),
    sent to every node at once, then read back: one round trip per node touched, concurrently.
    A ``MOVED`` or ``ASK`` reply (resharding, failover) reloads the map and sends those commands
    once more where the cluster says; a second redirection raises ``redis.ResponseError``.
    """

    def __init__(self, url: str, timeout_s: float) -> None:
        parsed = redis_urls.parse_cluster(url)
        self._seeds = list(parsed.nodes)
        self._url_of = parsed.node  # every node with the cluster's credentials and TLS
        self._timeout = timeout_s
        self._nodes: dict[tuple[str, int], PipelinedRedis] = {}
        self._slot_nodes: list[tuple[str, int]] | None = None
        self._key_slots: dict[bytes, int] = {}
        self._lock = threading.Lock()

    # --- topology ------------------------------------------------------------------------------
    def node(self, address: tuple[str, int]) -> PipelinedRedis:
        client = self._nodes.get(address)
        if client is None:
            with self._lock:
                client = self._nodes.get(address)
                if client is None:
                    client = self._nodes[address] = PipelinedRedis(self._url_of(*address), self._timeout)
        return client

    def load_slots(self) -> list[tuple[str, int]]:
        """Ask the known nodes, seeds first, for the slot map; raises when none answers."""
        error: Exception | None = None
        for address in dict.fromkeys([*self._seeds, *self._nodes]):
            try:
                (reply,) = self.node(address).execute_packed([pack("CLUSTER", "SLOTS")])
            except redis.RedisError as exc:
                error = exc
                continue
            table: list[tuple[str, int] | None] = [None] * _SLOTS
            for start, end, master, *_replicas in reply:
                host = master[0].decode() or address[0]
                for slot in range(start, end + 1):
                    table[slot] = (host, int(master[1]))
            if any(entry is None for entry in table):
                error = redis.ResponseError("the cluster does not serve every slot (CLUSTERDOWN?)")
                continue
            self._slot_nodes = table  # type: ignore[assignment]
            return self._slot_nodes  # type: ignore[return-value]
        raise redis.ConnectionError(f"no node of the Redis Cluster gave its slot map: {error}")

    def node_of(self, key: bytes) -> tuple[str, int]:
        table = self._slot_nodes or self.load_slots()
        slot = self._key_slots.get(key)
        if slot is None:
            if len(self._key_slots) >= _KEY_CACHE_MAX:
                self._key_slots.clear()
            slot = self._key_slots[key] = key_slot(key)
        return table[slot]

    # --- the redis-py surface read_features uses ------------------------------------------------
    def pipeline(self, transaction: bool = False) -> _ClusterPipeline:
        if transaction:
            raise ValueError("ClusterPipelinedRedis only runs non-transactional pipelines")
        return _ClusterPipeline(self)

    def execute(self, commands: Sequence[tuple[bytes, bytes]]) -> list[Any]:
        """``(key, packed command)`` pairs -> their replies in order; one round trip per node."""
        by_node: dict[tuple[str, int], list[int]] = {}
        for i, (key, _) in enumerate(commands):
            by_node.setdefault(self.node_of(key), []).append(i)
        replies: list[Any] = [None] * len(commands)
        self._exchange(
            {address: [commands[i][1] for i in indexes] for address, indexes in by_node.items()},
            by_node,
            replies,
        )
        redirected = [i for i, r in enumerate(replies) if isinstance(r, hiredis.ReplyError) and _redirect(r)]
        if redirected:
            self.load_slots()
            again: dict[tuple[str, int], list[int]] = {}
            packed: dict[tuple[str, int], list[bytes]] = {}
            for i in redirected:
                kind, address = _redirect(replies[i])  # type: ignore[misc]
                again.setdefault(address, []).append(i)
                ask = [pack("ASKING")] if kind == "ASK" else []
                packed.setdefault(address, []).extend([*ask, commands[i][1]])
            self._exchange(packed, again, replies, asking=True)
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise redis.ResponseError(str(reply))
        return replies

    def _exchange(
        self,
        packed: dict[tuple[str, int], list[bytes]],
        indexes: dict[tuple[str, int], list[int]],
        replies: list[Any],
        asking: bool = False,
    ) -> None:
        """Send each node its commands, then read every node's replies into ``replies``."""
        sent: list[tuple[PipelinedRedis, _Connection, tuple[str, int]]] = []
        try:
            for address, commands in packed.items():
                client = self.node(address)
                conn = client._connection()
                sent.append((client, conn, address))
                client._send(conn, commands)
            while sent:
                client, conn, address = sent[0]
                got = client._receive(conn, len(packed[address]))
                if asking:  # drop the +OK of each ASKING
                    got = [r for r, c in zip(got, packed[address], strict=True) if c != _ASKING]
                for i, reply in zip(indexes[address], got, strict=True):
                    replies[i] = reply
                sent.pop(0)
        except BaseException:
            for client, conn, _ in sent:  # a connection with replies still unread is out of step
                client._drop(conn)
            raise

    def ping(self) -> bool:
        """Reload the slot map and PING every master (the fetcher's recovery probe)."""
        table = self.load_slots()
        return all(self.node(address).ping() for address in set(table))

    def close(self) -> None:
        for client in list(self._nodes.values()):
            client.close()


_ASKING = pack("ASKING")


def _redirect(reply: hiredis.ReplyError) -> tuple[str, tuple[str, int]] | None:
    """``MOVED 3999 127.0.0.1:6381`` / ``ASK ...`` -> (kind, address); None for other errors."""
    text = str(reply)
    kind, _, rest = text.partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    host, _, port = rest.rpartition(" ")[2].rpartition(":")
    return kind, (host, int(port))


class _ClusterPipeline:
    def __init__(self, client: ClusterPipelinedRedis) -> None:
        self._client = client
        self._commands: list[tuple[bytes, bytes]] = []

    def hmget(self, name: bytes | str, keys: Sequence[bytes], *args: bytes) -> _ClusterPipeline:
        key = _as_bytes(name)
        fields = [*keys, *args] if args else keys
        node = self._client.node(self._client.node_of(key))
        self._commands.append((key, node.pack_hmget(key, fields)))
        return self

    def execute(self) -> list[Any]:
        if not self._commands:
            return []
        try:
            return self._client.execute(self._commands)
        finally:
            self._commands = []
