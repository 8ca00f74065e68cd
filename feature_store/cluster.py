"""Stream writes to a Redis Cluster: the same features and update rules as the single-server
:class:`feature_store.online.FeatureWriter`, with a protocol that keeps every event exactly once when
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
from feature_store.online import (
    _LUA_CODEC,
    DEFAULT_TRENDING_HALF_LIFE_S,
    ITEM_FIELDS,
    USER_FIELDS,
    ApplyResult,
    BatchGuard,
    ItemDelta,
    RememberedUsers,
    UserDelta,
    WriteState,
    _lua_bytes,
    _merge_user_values,
    _timestamp_bytes,
    decode_user,
    item_key,
    user_key,
)

SLOTS = 16384

_CLAIM_SCRIPT = r"""#!lua flags=allow-cross-slot-keys
-- ARGV: ttl, n, then n (key, record) claims, then keys only to read. Returns, per claim, the record
-- that owns the id when it is another one (false: this record owns it), then the read values.
local ttl, n = ARGV[1], tonumber(ARGV[2])
local out, a = {}, 3
for i = 1, n do
  local owner = redis.call('SET', ARGV[a], ARGV[a + 1], 'NX', 'EX', ttl, 'GET')
  if owner == ARGV[a + 1] then owner = false end
  out[i] = owner
  a = a + 2
end
for j = a, #ARGV do out[#out + 1] = redis.call('GET', ARGV[j]) end
return out
"""

_MERGE_SCRIPT_TEMPLATE = (
    r"""#!lua flags=allow-cross-slot-keys
-- One node's share of a stream batch on a Redis Cluster: the keys of every slot this node serves
-- that the batch touches, each slot guarded by its own per-partition fence. Every key is read
-- before the first write (a key this node does not serve fails the script before it writes), and
-- a failed check writes nothing.
-- ARGV: now_ms, now_ts, half_life_ms, n_slots, n_users, n_items, then per slot: its fence key,
-- n, then n (partition, lowest stored offset expected, new offset, offset this writer last stored
-- there or -1); per user: key, 3 counters as read, 9 values; per item: key, 7 values.
"""
    + _LUA_CODEC
    + r"""
local now_ms = tonumber(ARGV[1])
local now_ts = ARGV[2]
local half_life_ms = tonumber(ARGV[3])
local n_slots = tonumber(ARGV[4])
local n_users = tonumber(ARGV[5])
local n_items = tonumber(ARGV[6])
local a = 7

-- 1. per-slot fences: refuse when a slot holds more than the caller knew of, or less than the
-- caller stored there (the node lost acknowledged writes)
local fences, refused, behind = {}, {}, {}
for s = 1, n_slots do
  local key, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local parts = {}
  for j = 1, n do parts[j] = ARGV[a + 4 * (j - 1)] end
  local stored = redis.call('HMGET', key, unpack(parts))
  local w = {}
  for j = 1, n do
    local lo, hi, known = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    local st = tonumber(stored[j] or '-1')
    if st > lo then
      refused[#refused + 1] = (s - 1) .. ':' .. ARGV[a] .. ':' .. tostring(st)
    elseif st < known then
      behind[#behind + 1] = (s - 1) .. ':' .. ARGV[a] .. ':' .. tostring(st)
    elseif hi > st then
      w[#w + 1] = ARGV[a]
      w[#w + 1] = ARGV[a + 2]
    end
    a = a + 4
  end
  fences[s] = {key, w}
end

-- 2. users unchanged since the caller read them
local writes, n_writes, stale = {}, 0, {}
for u = 1, n_users do
  local key = ARGV[a]
  local changed, w = plan_user(key, a + 1)
  if changed then stale[#stale + 1] = u - 1 end
  a = a + 13
  n_writes = n_writes + 1
  writes[n_writes] = {key, w}
end

-- 3. items: merge counters and trending into what is stored
for _ = 1, n_items do
  local key = ARGV[a]
  n_writes = n_writes + 1
  writes[n_writes] = {key, merge_item(key, a + 1, now_ms, now_ts, half_life_ms)}
  a = a + 8
end
if #behind > 0 then return {'behind', concat(behind, ',')} end
if #refused > 0 then return {'fence', concat(refused, ',')} end
if #stale > 0 then return {'stale', concat(stale, ',')} end

-- 4. write
for i = 1, n_writes do
  local w = writes[i][2]
  if #w > 0 then redis.call('HSET', writes[i][1], unpack(w)) end
end
for s = 1, n_slots do
  if #fences[s][2] > 0 then redis.call('HSET', fences[s][1], unpack(fences[s][2])) end
end
return {'ok'}
"""
)

MERGE_SCRIPT = _MERGE_SCRIPT_TEMPLATE % {
    "user_fields": ", ".join(_lua_bytes(f) for f in USER_FIELDS),
    "item_fields": ", ".join(_lua_bytes(f) for f in ITEM_FIELDS),
}

# Raise hash fields to the given values, never lower them (several writers, any order).
_RAISE_SCRIPT = """
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '-1')
  if tonumber(ARGV[i + 1]) > cur then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""

# After a node lost writes: lower hash fields to the given values, never raise them.
_LOWER_SCRIPT = """
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '-1')
  if tonumber(ARGV[i + 1]) < cur then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""

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

    The same surface as :class:`feature_store.online.FeatureWriter` (:meth:`read`, :meth:`apply`,
    :meth:`forget`); :meth:`read` also claims event ids, and :meth:`apply` needs
    ``guard.slot_partitions`` (slot -> partitions whose records write there) and honours
    ``guard.floors``. A refused apply reports ``floors`` learned from the fences and from the
    nodes that did write, so the caller's next attempt leaves exactly those parts out.
    """

    def __init__(
        self, client: Any, half_life_s: float = DEFAULT_TRENDING_HALF_LIFE_S, user_cache: int = 50_000
    ) -> None:
        self._client = client
        self._half_life_ms = half_life_s * 1000.0
        self._known = RememberedUsers(user_cache)
        self._slots: dict[bytes, int] = {}
        self._slot_clients: list[tuple[str, Any]] | None = None
        # (slot, partition) -> the offset this writer last stored in that slot's fence
        self._stored: dict[tuple[int, int], int] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="cluster-writer")
        self._raise = client.register_script(_RAISE_SCRIPT)
        self._lower = client.register_script(_LOWER_SCRIPT)
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
                    pipe.eval(_CLAIM_SCRIPT, 0, *args)
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
        now_ts = _timestamp_bytes(now)
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
            merged, values = _merge_user_values(current, delta, now, counters)
            node["users"] += (key, *counters, *values)
            node["n_users"] += 1
            stored = (values[0] or counters[0], values[1] or counters[1], values[2] or counters[2])
            node["written"].append((user_id, merged, stored))
        for item_id, d in items.items():
            key = item_key(item_id)
            node = node_of(self.slot(key))
            node["items"] += (
                key,
                d.views,
                d.add_to_carts,
                d.purchases,
                d.last_event_ts,
                repr(d.trending),
                d.category or "",
                "" if d.price is None else repr(d.price),
            )
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
            return lambda client: client.eval(MERGE_SCRIPT, 0, *args)

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
