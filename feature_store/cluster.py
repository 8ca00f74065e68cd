"""Stream writes to a Redis Cluster: the same features and update rules as the single-server
:class:`feature_store.writes.FeatureWriter`, with a protocol that keeps every event exactly once when
one batch's keys live in many hash slots on several nodes.

A Redis script may only touch keys its node serves, so one atomic script per batch is impossible:
Feast fixes each entity's key (no hash tag), and a batch touches thousands of slots. Instead:

* **Claims.** Before anything is written, each event id is claimed for the record that carries it:
  ``SET recstack:eid:<digest> <topic:partition:offset> NX EX <window> GET``. The first record to
  claim an id owns it forever after (within the window); any other record with that id is a
  duplicate. A claim is idempotent: the same record claiming again (a retry, a replay after a
  crash, another consumer after a rebalance) finds its own name and goes on.
* **Per-slot fences.** Every hash slot ``s`` that holds written features also holds a hash
  ``recstack:stream:<topic>:applied:{<tag of s>}`` (a hash tag chosen so that the key lands in
  ``s``): partition -> last offset whose effects in slot ``s`` are applied. The writes of one node
  go in ONE script (``allow-cross-slot-keys``: any keys of slots that node serves), which checks
  every touched slot's fence, reads every key, and only then writes the hashes and raises the
  fences. A fence above what the caller expected refuses the node's script (nothing written) and
  reports the stored offset, so the caller leaves that slot's part of the records up to it out.
* **Global fence.** Once every node's script went through, the partition's applied offset
  (``recstack:stream:<topic>:applied``, as on a single server) is raised to the batch's last
  offset. A consumer taking a partition over starts after it; records between it and a slot's
  fence are filtered per slot, never applied twice.
* **Lost writes.** A node that comes back with less than it acknowledged (a restart from an old
  AOF or RDB file, a failover to a lagging replica) holds slot fences below what this writer
  stored there. The writer remembers, per (slot, partition), the offset it last stored, and a
  node's script refuses a slot whose fence is below it ("behind"), as :meth:`lost_fences` reports
  for every slot it wrote: the caller reads the partition again from the lowest such fence + 1.

The argument is written out in ``docs/FEATURES.md`` ("Redis Cluster").
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from feature_store.changes import announce_items
from feature_store.layout import USER_FIELDS, decode_user, item_key, timestamp_bytes, user_key
from feature_store.scripts import CLAIM_SCRIPT, CLUSTER_MERGE_SCRIPT, LOWER_SCRIPT, RAISE_SCRIPT
from feature_store.values import ItemDelta, UserDelta
from feature_store.writes import (
    ApplyResult,
    BatchGuard,
    RememberedUsers,
    WriteState,
    item_delta_args,
    merge_user_values,
    trending_half_life_ms,
)

SLOTS = 16384

# Errors after which the slot map may have changed (resharding, failover): refresh it, retry.
_TOPOLOGY_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError)

_slot_tags: list[str] | None = None


def slot_tag(slot: int) -> str:
    """A short string whose hash tag ``{tag}`` puts a key in ``slot`` (table built once, ~0.2 s)."""
    global _slot_tags
    if _slot_tags is None:
        tags: list[str | None] = [None] * SLOTS
        missing = SLOTS
        for n in itertools.count():
            tag = format(n, "x")
            s = key_slot(tag.encode())
            if tags[s] is None:
                tags[s] = tag
                missing -= 1
                if not missing:
                    break
        _slot_tags = tags  # type: ignore[assignment]
    return _slot_tags[slot]  # type: ignore[index]


def slot_fence_key(offsets_key: str | bytes, slot: int) -> bytes:
    """The per-slot fence of a topic's applied-offset hash: ``<offsets_key>:{<tag>}``, in ``slot``."""
    base = offsets_key if isinstance(offsets_key, bytes) else offsets_key.encode()
    return base + b":{" + slot_tag(slot).encode() + b"}"


class ClusterFeatureWriter:
    """Applies stream batches to a Redis Cluster (``redis.cluster.RedisCluster`` client).

    The same surface as :class:`feature_store.writes.FeatureWriter` (:meth:`read`, :meth:`apply`,
    :meth:`forget`); :meth:`read` also claims event ids, and :meth:`apply` needs
    ``guard.slot_partitions`` (slot -> partitions whose records write there) and honours
    ``guard.floors``. A refused apply reports ``floors`` learned from the fences and from the
    nodes that did write, so the caller's next attempt leaves exactly those parts out.
    """

    def __init__(self, client: Any, half_life_s: float | None = None, user_cache: int = 50_000) -> None:
        self._client = client
        self._half_life_ms = trending_half_life_ms(half_life_s)
        self._known = RememberedUsers(user_cache)
        self._slots: dict[bytes, int] = {}
        self._slot_clients: list[tuple[str, Any]] | None = None
        # (slot, partition) -> the offset this writer last stored in that slot's fence
        self._stored: dict[tuple[int, int], int] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="cluster-writer")
        self._raise = client.register_script(RAISE_SCRIPT)
        self._lower = client.register_script(LOWER_SCRIPT)
        # Called on each node's own client (``client=``): EVALSHA, loaded on a node when missing.
        # The claim script runs inside a node's read pipeline, where redis-py would check
        # SCRIPT EXISTS first (one more round trip per batch): it is sent with EVAL (549 bytes).
        self._merge = client.register_script(CLUSTER_MERGE_SCRIPT)
        slot_tag(0)  # build the tag table now, not in the first batch

    # --- slots and nodes ---------------------------------------------------------------------
    def slot(self, key: bytes) -> int:
        slots = self._slots
        s = slots.get(key)
        if s is None:
            if len(slots) >= 1_000_000:
                slots.clear()
            s = slots[key] = key_slot(key)
        return s

    def user_slot(self, user_id: str) -> int:
        return self.slot(user_key(user_id))

    def item_slot(self, item_id: str) -> int:
        return self.slot(item_key(item_id))

    def _node_client(self, slot: int) -> tuple[str, Any]:
        table = self._slot_clients
        if table is None:  # slot -> (node name, its client), rebuilt after a topology error
            clients: dict[str, tuple[str, Any]] = {}
            table = []
            try:
                for s in range(SLOTS):
                    node = self._client.nodes_manager.get_node_from_slot(s)
                    entry = clients.get(node.name)
                    if entry is None:
                        entry = clients[node.name] = (node.name, self._client.get_redis_connection(node))
                    table.append(entry)
            except RedisClusterException as exc:  # e.g. a slot not covered while a node is down
                try:
                    self._client.nodes_manager.initialize()
                except (redis.RedisError, RedisClusterException):
                    pass
                raise redis.ConnectionError(f"Redis Cluster slot map incomplete: {exc}") from exc
            self._slot_clients = table
        return table[slot]

    def _on_nodes(self, calls: Mapping[str, tuple[Any, Any]]) -> dict[str, Any]:
        """Run ``fn(client)`` per node, concurrently; a routing or connection failure refreshes the
        slot map and is raised (the caller retries the whole batch)."""
        futures = {name: self._pool.submit(fn, client) for name, (client, fn) in calls.items()}
        results, error = {}, None
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except _TOPOLOGY_ERRORS as exc:
                error = error or exc
        if error is not None:
            self._slot_clients = None
            try:
                self._client.nodes_manager.initialize()
            except (redis.RedisError, RedisClusterException):
                pass  # the cluster is not back yet: the caller's retry initializes again
            raise error
        return results

    # --- the FeatureWriter surface -----------------------------------------------------------
    def read(
        self,
        user_ids: Sequence[str],
        seen_keys: Sequence[bytes] = (),
        claims: Sequence[bytes] = (),
        claim_ttl_s: int = 86_400,
    ) -> WriteState:
        """The stored hashes of the users not remembered; claim the first ``len(claims)`` of
        ``seen_keys`` for those records and read the rest. ``state.seen`` holds, per key, another
        record that owns the id (None: this record owns it, or nobody claimed it)."""
        known = self._known
        to_read = [u for u in user_ids if u not in known]
        per_node: dict[str, tuple[Any, list]] = {}  # node -> (client, [(kind, index, key)])

        def add(key: bytes, entry: tuple) -> None:
            name, client = self._node_client(self.slot(key))
            per_node.setdefault(name, (client, []))[1].append(entry)

        for i, user_id in enumerate(to_read):
            key = user_key(user_id)
            add(key, ("u", i, key))
        for j, key in enumerate(seen_keys):
            add(key, ("c" if j < len(claims) else "g", j, key))
        ttl = str(claim_ttl_s)

        def run(entries: list) -> Any:
            def call(client: Any) -> list:
                pipe = client.pipeline(transaction=False)
                users = [e for e in entries if e[0] == "u"]
                for _, _, key in users:
                    pipe.hmget(key, USER_FIELDS)
                cl = [e for e in entries if e[0] == "c"]
                gets = [e for e in entries if e[0] == "g"]
                if cl or gets:
                    args: list[Any] = [ttl, len(cl)]
                    for _, j, key in cl:
                        args += (key, claims[j])
                    args += [key for _, _, key in gets]
                    pipe.eval(CLAIM_SCRIPT, 0, *args)
                replies = pipe.execute()
                out = list(zip(users, replies, strict=False))
                if cl or gets:
                    out += list(zip(cl + gets, replies[-1], strict=True))
                return out

            return call

        results = self._on_nodes(
            {name: (client, run(entries)) for name, (client, entries) in per_node.items()}
        )
        users: dict[str, Any] = {}
        seen: list[bytes | None] = [None] * len(seen_keys)
        for replies in results.values():
            for (kind, index, _), value in replies:
                if kind == "u":
                    users[to_read[index]] = value
                else:
                    seen[index] = value
        return WriteState(users=users, seen=seen)

    def forget(self, user_ids: Sequence[str] | None = None) -> None:
        """Drop remembered users (all of them by default), e.g. when a partition changes owner."""
        self._known.forget(user_ids)

    def lost_fences(self, offsets_key: str | bytes, partitions: Sequence[int]) -> dict[int, int]:
        """Partition -> the lowest slot fence found below what this writer stored there (the
        node lost acknowledged writes), for ``partitions``; one pipeline per node, in parallel.
        The fences found are remembered, so a loss is reported once."""
        wanted = set(partitions)
        by_slot: dict[int, list[int]] = {}
        for slot, p in self._stored:
            if p in wanted:
                by_slot.setdefault(slot, []).append(p)
        per_node: dict[str, tuple[Any, list[int]]] = {}
        for slot in by_slot:
            name, client = self._node_client(slot)
            per_node.setdefault(name, (client, []))[1].append(slot)

        def read(slots: list[int]) -> Any:
            def call(client: Any) -> list:
                pipe = client.pipeline(transaction=False)
                for slot in slots:
                    pipe.hmget(slot_fence_key(offsets_key, slot), by_slot[slot])
                return list(zip(slots, pipe.execute(), strict=True))

            return call

        results = self._on_nodes({name: (client, read(slots)) for name, (client, slots) in per_node.items()})
        behind: dict[int, int] = {}
        for pairs in results.values():
            for slot, values in pairs:
                for p, value in zip(by_slot[slot], values, strict=True):
                    held = -1 if value is None else int(value)
                    if held < self._stored[(slot, p)]:
                        self._stored[(slot, p)] = held
                        behind[p] = min(behind.get(p, held), held)
        return behind

    def lower_applied(self, offsets_key: str | bytes, offsets: Mapping[int, int]) -> None:
        """Lower the partitions' global applied offsets to ``offsets`` (never raise them): a node
        lost writes, so everything up to the old value is no longer applied in every slot, and a
        consumer taking the partition over must start below the loss."""
        if offsets:
            self._lower(keys=[offsets_key], args=[x for p, o in sorted(offsets.items()) for x in (p, o)])

    def apply(
        self,
        users: Mapping[str, UserDelta],
        items: Mapping[str, ItemDelta],
        guard: BatchGuard,
        state: WriteState,
        now_ms: int | None = None,
    ) -> ApplyResult:
        """Write ``users`` and ``items`` node by node (one script each), then raise the global fence."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        now_ts = timestamp_bytes(now)
        # node -> per-slot fence entries, user args, item args, written users
        nodes: dict[str, dict[str, Any]] = {}

        def node_of(slot: int) -> dict[str, Any]:
            name, client = self._node_client(slot)
            node = nodes.get(name)
            if node is None:
                node = nodes[name] = {"client": client, "slots": [], "users": [], "items": [], "written": []}
                node["n_users"] = node["n_items"] = 0
            return node

        for slot in guard.slot_partitions:
            node_of(slot)["slots"].append(slot)
        known = self._known
        for user_id, delta in users.items():
            key = user_key(user_id)
            node = node_of(self.slot(key))
            reply = state.users.get(user_id)
            if reply is not None:
                current, counters = decode_user(reply), (reply[0] or b"", reply[1] or b"", reply[2] or b"")
            else:
                current, counters = known[user_id]
            merged, values = merge_user_values(current, delta, now, counters)
            node["users"] += (key, *counters, *values)
            node["n_users"] += 1
            stored = (values[0] or counters[0], values[1] or counters[1], values[2] or counters[2])
            node["written"].append((user_id, merged, stored))
        for item_id, d in items.items():
            key = item_key(item_id)
            node = node_of(self.slot(key))
            node["items"] += (key, *item_delta_args(d))
            node["n_items"] += 1

        def fence_args(slot: int) -> list[Any]:
            parts = sorted(guard.slot_partitions[slot])
            args: list[Any] = [slot_fence_key(guard.offsets_key, slot), len(parts)]
            for p in parts:
                lo = max(guard.expected.get(p, -1), guard.floors.get((slot, p), -1))
                args += (p, lo, guard.applied[p], self._stored.get((slot, p), -1))
            return args

        def run(node: dict[str, Any]) -> Any:
            args: list[Any] = [now, now_ts, repr(self._half_life_ms), len(node["slots"])]
            args += (node["n_users"], node["n_items"])
            for slot in node["slots"]:
                args += fence_args(slot)
            args += node["users"]
            args += node["items"]
            return lambda client: self._merge(args=args, client=client)

        replies = self._on_nodes({name: (node["client"], run(node)) for name, node in nodes.items()})
        floors: dict[tuple[int, int], int] = {}
        stale: list[str] = []
        fenced: tuple[int, int] | None = None  # a (partition, stored offset) that refused
        behind: dict[int, int] = {}
        for name, reply in replies.items():
            node = nodes[name]
            status = reply[0]
            if status == b"ok":
                self._known.remember(node["written"])
                for slot in node["slots"]:  # this node's part is done: leave it out of a retry
                    for p in guard.slot_partitions[slot]:
                        floors[(slot, p)] = guard.applied[p]
                        if guard.applied[p] > self._stored.get((slot, p), -1):
                            self._stored[(slot, p)] = guard.applied[p]
            elif status == b"behind":
                for entry in reply[1].split(b","):
                    index, p, held = (int(x) for x in entry.split(b":"))
                    self._stored[(node["slots"][index], p)] = held
                    behind[p] = min(behind.get(p, held), held)
            elif status == b"fence":
                for entry in reply[1].split(b","):
                    index, p, held = (int(x) for x in entry.split(b":"))
                    floors[(node["slots"][index], p)] = held
                    fenced = fenced or (p, held)
            elif status == b"stale":
                written = node["written"]
                stale += [written[int(x)][0] for x in reply[1].split(b",")]
            else:
                raise RuntimeError(f"unexpected reply from the cluster merge script: {reply!r}")
        if all(reply[0] == b"ok" for reply in replies.values()):
            if guard.applied:
                args = [x for p, offset in sorted(guard.applied.items()) for x in (p, offset)]
                self._raise(keys=[guard.offsets_key], args=args)
            announce_items(self._client, items)  # after every node wrote: readers see the new values
            return ApplyResult(ok=True)
        self.forget(stale)
        return ApplyResult(
            ok=False,
            fenced_partition=None if fenced is None else fenced[0],
            stored_offset=None if fenced is None else fenced[1],
            stale_users=stale,
            floors=floors,
            behind=behind,
        )
