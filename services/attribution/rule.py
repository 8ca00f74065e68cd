"""The attribution rule, pure: impressions and events in, per-arm credits out.

Both the attribution consumer (:mod:`services.attribution.consumer`, exactly once through Redis)
and the offline join (:func:`offline_join`, over the raw topics' records) compute their counters
with these functions, so the two can only differ by what each saw, never by how it counted.

The rule (docs/EXPERIMENTS.md, "Attribution"):

* an event with a ``request_id`` is credited to the impression of that user with that id, if its
  ``ts`` is at most ``window`` after the impression's;
* an event without one is credited to the latest impression (largest ``ts``, then the later
  record) shown to that user that contained the item, with ``0 <= event.ts - impression.ts <=
  window``; time is event time (the records' ``ts``), never the clock, so replays credit alike;
* otherwise the event is not attributed.

All counters are integers (reciprocal ranks and revenue in millionths) so that sums are exact
whatever the order they are added in.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from recstack.events import EVENT_TYPES, MAX_ID_LENGTH, Event, parse_event

DEFAULT_EXPERIMENT = "default"  # impressions without an ``experiment`` field
MICROS = 1_000_000
BUCKET_MS = 60_000  # the per-minute buckets, in event time


class InvalidImpression(ValueError):
    """An impression record that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class Impression:
    """One served list: positions are 1-based (1 = shown first, as the ranking server writes them);
    ``offset`` orders impressions with equal ``ts``."""

    request_id: str
    user_id: str
    experiment: str
    arm: str
    model_version: str
    ts_ms: int
    items: Mapping[str, int]  # item id -> position (its first one)
    shadow_version: str | None = None
    shadow_items: Mapping[str, int] | None = None
    offset: int = -1

    def to_state(self) -> str:
        """The compact JSON kept per user in Redis (the consumer reads it back with :meth:`from_state`)."""
        state: dict[str, Any] = {
            "r": self.request_id,
            "e": self.experiment,
            "a": self.arm,
            "v": self.model_version,
            "t": self.ts_ms,
            "i": self.items,
            "o": self.offset,
        }
        if self.shadow_version is not None:
            state["sv"], state["si"] = self.shadow_version, self.shadow_items
        return json.dumps(state, separators=(",", ":"))

    @classmethod
    def from_state(cls, user_id: str, raw: bytes | str) -> Impression:
        s = json.loads(raw)
        return cls(s["r"], user_id, s["e"], s["a"], s["v"], s["t"], s["i"], s.get("sv"), s.get("si"), s["o"])


def _text(obj: Mapping[str, Any], name: str, required: bool = True) -> str | None:
    value = obj.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_LENGTH:
        raise InvalidImpression(
            f"{name}: must be a string of 1-{MAX_ID_LENGTH} characters, got {value!r:.40}"
        )
    return value


def _positions(items: Any, name: str) -> dict[str, int]:
    if not isinstance(items, list):
        raise InvalidImpression(f"{name}: must be a list, got {type(items).__name__}")
    out: dict[str, int] = {}
    for k, entry in enumerate(items):
        if not isinstance(entry, dict):
            raise InvalidImpression(f"{name}[{k}]: must be an object")
        item_id = _text(entry, "item_id")
        position = entry.get("position", k + 1)
        if type(position) is not int or position < 1:
            raise InvalidImpression(f"{name}[{k}].position: must be an integer >= 1, got {position!r:.40}")
        out.setdefault(item_id, position)  # type: ignore[arg-type]
    return out


def parse_impression(raw: bytes | str | None, offset: int = -1) -> Impression:
    """A ``rank-impressions`` record value -> :class:`Impression`, or :class:`InvalidImpression`."""
    try:
        obj = json.loads(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise InvalidImpression(f"value is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidImpression("impression must be a JSON object")
    ts = obj.get("ts")
    if type(ts) is not int or ts < 0:
        raise InvalidImpression(f"ts: must be integer epoch milliseconds, got {ts!r:.40}")
    shadow = obj.get("shadow")
    shadow_version = shadow_items = None
    if shadow is not None:
        if not isinstance(shadow, dict):
            raise InvalidImpression("shadow: must be an object")
        shadow_version = _text(shadow, "version")
        shadow_items = _positions(shadow.get("items"), "shadow.items")
    return Impression(
        request_id=_text(obj, "request_id"),  # type: ignore[arg-type]
        user_id=_text(obj, "user_id"),  # type: ignore[arg-type]
        experiment=_text(obj, "experiment", required=False) or DEFAULT_EXPERIMENT,
        arm=_text(obj, "arm"),  # type: ignore[arg-type]
        model_version=str(obj.get("model_version", "")),
        ts_ms=ts,
        items=_positions(obj.get("items"), "items"),
        shadow_version=shadow_version,
        shadow_items=shadow_items,
        offset=offset,
    )


def attribute(event: Event, impressions: Iterable[Impression], window_ms: int) -> Impression | None:
    """The impression ``event`` is credited to among its user's ``impressions``, or None (the rule
    in the module docstring)."""
    best: Impression | None = None
    for imp in impressions:
        if imp.user_id != event.user_id or event.ts_ms - imp.ts_ms > window_ms:
            continue
        if event.request_id:
            if imp.request_id == event.request_id:
                return imp
        elif imp.ts_ms <= event.ts_ms and event.item_id in imp.items:
            if best is None or (imp.ts_ms, imp.offset) > (best.ts_ms, best.offset):
                best = imp
    return best


def shadow_arm(imp: Impression) -> str:
    """The arm name under which a shadow ranking's metrics are kept."""
    return f"shadow:{imp.shadow_version}"


# A credit: (experiment, arm, minute bucket, counter name, amount)
Credit = tuple[str, str, int, str, int]


def impression_credits(imp: Impression) -> list[Credit]:
    minute = imp.ts_ms // BUCKET_MS
    out: list[Credit] = [(imp.experiment, imp.arm, minute, "impressions", 1)]
    if imp.shadow_version is not None:
        out.append((imp.experiment, shadow_arm(imp), minute, "impressions", 1))
    return out


def _rr_micros(positions: Mapping[str, int] | None, item_id: str) -> int:
    position = (positions or {}).get(item_id)
    return 0 if position is None else round(MICROS / position)


def event_credits(event: Event, imp: Impression) -> list[Credit]:
    """What an event credited to ``imp`` adds: its count, the reciprocal rank of the item in the
    list (0 when the item was not in it), revenue for a priced purchase; and on the shadow arm the
    reciprocal rank of the same item in the shadow's list, next to the live list's for pairing."""
    kind, minute = event.event_type, event.ts_ms // BUCKET_MS
    exp, rr = imp.experiment, _rr_micros(imp.items, event.item_id)
    out: list[Credit] = [(exp, imp.arm, minute, kind, 1), (exp, imp.arm, minute, f"rr_micros_{kind}", rr)]
    if kind == "purchase" and event.price is not None:
        revenue = round(event.price * event.quantity * MICROS)
        out += [(exp, imp.arm, minute, "revenue_micros", revenue), (exp, imp.arm, minute, "priced", 1)]
    if imp.shadow_version is not None:
        arm = shadow_arm(imp)
        out += [
            (exp, arm, minute, kind, 1),
            (exp, arm, minute, f"rr_micros_{kind}", _rr_micros(imp.shadow_items, event.item_id)),
            (exp, arm, minute, f"live_rr_micros_{kind}", rr),
        ]
    return out


# experiment -> arm -> {"totals": {counter: n}, "buckets": {minute: {counter: n}}}
ArmMetrics = dict[str, dict[str, dict[str, Any]]]


def add_credits(into: ArmMetrics, credits: Iterable[Credit]) -> ArmMetrics:
    for exp, arm, minute, name, amount in credits:
        arm_metrics = into.setdefault(exp, {}).setdefault(arm, {"totals": {}, "buckets": {}})
        totals, bucket = arm_metrics["totals"], arm_metrics["buckets"].setdefault(minute, {})
        totals[name] = totals.get(name, 0) + amount
        bucket[name] = bucket.get(name, 0) + amount
    return into


def offline_join(
    impressions: Iterable[tuple[int, int, bytes | None]],
    events: Iterable[tuple[int, int, bytes | None]],
    window_ms: int,
) -> ArmMetrics:
    """Per-arm metrics from the raw topics' records, ``(partition, offset, value)`` each: every
    impression, and every valid event credited by :func:`attribute` against all impressions of
    its user (no hold, no Redis, no bound per user). Invalid records are left out, as online."""
    by_user: dict[str, list[Impression]] = defaultdict(list)
    out: ArmMetrics = {}
    for _, offset, value in impressions:
        try:
            imp = parse_impression(value, offset)
        except InvalidImpression:
            continue
        by_user[imp.user_id].append(imp)
        add_credits(out, impression_credits(imp))
    for _, _, value in events:
        try:
            event = parse_event(value)  # type: ignore[arg-type]
        except ValueError:
            continue
        if event.event_type not in EVENT_TYPES:
            continue
        imp = attribute(event, by_user.get(event.user_id, ()), window_ms)
        if imp is not None:
            add_credits(out, event_credits(event, imp))
    return out
