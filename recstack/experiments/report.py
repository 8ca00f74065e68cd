"""``recstack experiment report``: the experiment's figures from the raw topics, and the verdict.

The report reads ``rank-impressions`` and ``user-events`` from their beginning, credits every
event with the attribution rule itself (:func:`services.attribution.rule.attribute` and
:func:`~services.attribution.rule.event_credits`, the functions the attribution consumer runs),
and turns the credited events into one outcome per impression. The outcomes are fed to
:class:`~recstack.experiments.stats.ArmStats` user by user, so every interval and the test use the
cluster-robust variance (the user is the unit of randomisation, not the impression).

Per impression (docs/EXPERIMENTS.md, "What is measured, per arm"): ``add_to_cart`` and
``purchase`` are 1 if any credited event of that type, ``reciprocal_rank`` the best reciprocal
rank of an item added to the cart (as the rule scores positions), ``revenue`` the priced
purchases' value. The same pass also adds the rule's integer counters (exactly what
:func:`services.attribution.rule.offline_join` computes), which are compared with the attribution
consumer's totals in Redis.
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from recstack.errors import UserError
from recstack.experiments.stats import ALPHA, METRICS, ArmStats, Moments, Report, compare, estimate, report
from services.attribution.rule import (
    MICROS,
    ArmMetrics,
    Impression,
    InvalidImpression,
    add_credits,
    attribute,
    event_credits,
    impression_credits,
    parse_impression,
)

METRIC_FLAGS = {
    "purchase": "purchase",
    "add_to_cart": "add_to_cart",
    "mrr": "reciprocal_rank",
    "revenue": "revenue",
}
_PLOT_POINTS = 60  # looks drawn in the plot over time
Record = tuple[int, int, bytes | None]  # (partition, offset, value)


# --- reading the topics -----------------------------------------------------------------------------


class Progress:
    """``topic: 120,000 / 480,000 records (25%)`` on stderr, at most every ``every_s`` seconds
    (and once at the end), only when the topic is large enough for it to matter."""

    def __init__(
        self, topic: str, total: int, stream: Any = None, every_s: float = 1.0, min_total: int = 50_000
    ):
        self.topic, self.total, self.stream = topic, total, stream or sys.stderr
        self.every_s, self.show = every_s, total >= min_total
        self.done = 0
        self._next = time.monotonic() + every_s

    def advance(self, n: int) -> None:
        self.done += n
        if self.show and time.monotonic() >= self._next:
            self._next = time.monotonic() + self.every_s
            self._print()

    def finish(self) -> None:
        if self.show:
            self._print()

    def _print(self) -> None:
        pct = 100 * self.done / self.total if self.total else 100
        print(f"reading {self.topic}: {self.done:,} / {self.total:,} records ({pct:.0f}%)", file=self.stream)


def read_topic(bootstrap: str, topic: str, progress: bool = True, **client_options: Any) -> Iterator[Record]:
    """Every record of ``topic`` up to its end offsets when the read starts, partition by
    partition in offset order. Unreachable broker or missing topic: :class:`UserError`."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            enable_auto_commit=False,
            request_timeout_ms=15_000,
            bootstrap_timeout_ms=10_000,  # an unreachable broker is reported in 10 s, not 30
            **client_options,
        )
    except KafkaError as exc:
        raise UserError(f"--bootstrap {bootstrap}: cannot reach Kafka ({exc})") from None
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise UserError(f"topic {topic!r}: not on the broker {bootstrap} (nothing published yet?)")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        start = consumer.beginning_offsets(tps)
        meter = Progress(topic, sum(end[tp] - start[tp] for tp in tps)) if progress else None
        remaining = {tp for tp in tps if end[tp] > start[tp]}
        while remaining:
            for tp, recs in consumer.poll(timeout_ms=1_000, max_records=5_000).items():
                mine = [(tp.partition, r.offset, r.value) for r in recs if r.offset < end[tp]]
                yield from mine
                if meter is not None:
                    meter.advance(len(mine))
            remaining = {tp for tp in remaining if consumer.position(tp) < end[tp]}
        if meter is not None:
            meter.finish()
    except KafkaError as exc:
        raise UserError(f"--bootstrap {bootstrap}: reading {topic!r} failed ({exc})") from None
    finally:
        consumer.close()


# --- the join ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """What one impression earned (the metrics of :mod:`recstack.experiments.stats`), and for a
    shadowed one the best reciprocal rank of a carted item in the shadow's and the live list."""

    added_to_cart: bool = False
    purchased: bool = False
    reciprocal_rank: float = 0.0
    revenue_micros: int = 0
    shadow_rr: float = 0.0
    live_rr: float = 0.0


@dataclass
class Joined:
    """Impressions in topic order with their outcomes, and the rule's counters (``metrics``,
    equal to :func:`services.attribution.rule.offline_join` of the same records)."""

    impressions: list[Impression] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    metrics: ArmMetrics = field(default_factory=dict)
    events: int = 0
    attributed: int = 0

    def experiments(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for imp in self.impressions:
            counts[imp.experiment] += 1
        return dict(counts)


def join(impressions: Iterable[Record], events: Iterable[Record], window_ms: int) -> Joined:
    """Credit every valid event to its impression by the attribution rule (all impressions of the
    user, as the offline join: no per-user bound) and record each impression's outcome."""
    from recstack.events import EVENT_TYPES, InvalidEvent, parse_events

    out = Joined()
    by_user: dict[str, list[Impression]] = defaultdict(list)
    index: dict[int, int] = {}  # id(impression) -> its row
    for _, offset, value in impressions:
        try:
            imp = parse_impression(value, offset)
        except InvalidImpression:
            continue
        index[id(imp)] = len(out.impressions)
        out.impressions.append(imp)
        out.outcomes.append(Outcome())
        by_user[imp.user_id].append(imp)
        add_credits(out.metrics, impression_credits(imp))
    records = iter(events)
    # Parsed in batches (recstack.events.parse_events: the same verdicts as parse_event, faster).
    while chunk := [value for _, _, value in islice(records, 5_000)]:
        for event in parse_events(chunk):
            if isinstance(event, InvalidEvent) or event.event_type not in EVENT_TYPES:
                continue
            _credit(out, event, by_user, index, window_ms)
    return out


def _credit(
    out: Joined, event: Any, by_user: dict[str, list[Impression]], index: dict[int, int], window_ms: int
) -> None:
    out.events += 1
    imp = attribute(event, by_user.get(event.user_id, ()), window_ms)
    if imp is None:
        return
    out.attributed += 1
    credits = event_credits(event, imp)
    add_credits(out.metrics, credits)
    _record(out.outcomes[index[id(imp)]], event.event_type, imp, credits)


def _record(
    outcome: Outcome, kind: str, imp: Impression, credits: list[tuple[str, str, int, str, int]]
) -> None:
    live, shadow = imp.arm, None if imp.shadow_version is None else f"shadow:{imp.shadow_version}"
    for _, arm, _, name, amount in credits:
        if arm == live:
            if name == "add_to_cart":
                outcome.added_to_cart = True
            elif name == "purchase":
                outcome.purchased = True
            elif name == "rr_micros_add_to_cart":
                outcome.reciprocal_rank = max(outcome.reciprocal_rank, amount / MICROS)
            elif name == "revenue_micros":
                outcome.revenue_micros += amount
        elif arm == shadow:
            if name == "rr_micros_add_to_cart":
                outcome.shadow_rr = max(outcome.shadow_rr, amount / MICROS)
            elif name == "live_rr_micros_add_to_cart":
                outcome.live_rr = max(outcome.live_rr, amount / MICROS)


def arm_stats(joined: Joined, experiment: str) -> dict[str, ArmStats]:
    """Per live arm, the outcomes fed user by user (cluster-robust: see :class:`ArmStats`)."""
    arms: dict[str, ArmStats] = {}
    for imp, o in zip(joined.impressions, joined.outcomes, strict=True):
        if imp.experiment != experiment:
            continue
        stats = arms.get(imp.arm) or arms.setdefault(imp.arm, ArmStats())
        stats.add(imp.user_id, o.added_to_cart, o.purchased, o.reciprocal_rank, o.revenue_micros / MICROS)
    return dict(sorted(arms.items()))


@dataclass(frozen=True, slots=True)
class ShadowFigures:
    """A shadow version's MRR (items added to the cart) against the live lists' on the same impressions."""

    version: str
    impressions: int
    users: int
    shadow_mrr: float
    live_mrr: float
    difference: float  # shadow - live, with its cluster-robust (1 - alpha) interval
    low: float
    high: float


def shadow_figures(joined: Joined, experiment: str, alpha: float = ALPHA) -> list[ShadowFigures]:
    rows: dict[str, tuple[list[str], list[float], list[float]]] = defaultdict(lambda: ([], [], []))
    for imp, o in zip(joined.impressions, joined.outcomes, strict=True):
        if imp.experiment == experiment and imp.shadow_version is not None:
            users, shadow, live = rows[imp.shadow_version]
            users.append(imp.user_id)
            shadow.append(o.shadow_rr)
            live.append(o.live_rr)
    out = []
    for version, (users, shadow, live) in sorted(rows.items()):
        _, codes = np.unique(np.asarray(users, dtype=object), return_inverse=True)
        # Paired per impression, clustered by user: the difference's own variance.
        diff = estimate("reciprocal_rank", Moments.from_arrays(codes, np.subtract(shadow, live)), 1 - alpha)
        out.append(
            ShadowFigures(
                version,
                len(users),
                diff.users,
                float(np.mean(shadow)),
                float(np.mean(live)),
                diff.value,
                diff.low,
                diff.high,
            )
        )
    return out


# --- the consumer's totals against the offline join --------------------------------------------------


def compare_totals(
    offline: ArmMetrics, online: ArmMetrics, experiment: str
) -> list[tuple[str, str, int, int]]:
    """``(arm, counter, offline, consumer)`` of every counter that differs (none: they agree)."""
    a, b = offline.get(experiment, {}), online.get(experiment, {})
    out = []
    for arm in sorted(set(a) | set(b)):
        ta, tb = a.get(arm, {}).get("totals", {}), b.get(arm, {}).get("totals", {})
        for name in sorted(set(ta) | set(tb)):
            if ta.get(name, 0) != tb.get(name, 0):
                out.append((arm, name, ta.get(name, 0), tb.get(name, 0)))
    return out


# --- the report ---------------------------------------------------------------------------------------


@dataclass
class ExperimentReport:
    experiment: str
    arms: dict[str, ArmStats]
    pair: tuple[str, str]
    stats: Report
    shadows: list[ShadowFigures]
    joined: Joined
    consumer: ArmMetrics | None = None  # the attribution consumer's totals (None: not read)
    consumer_error: str | None = None
    differences: list[tuple[str, str, int, int]] = field(default_factory=list)
    plot: Path | None = None

    @property
    def verdict(self) -> str:
        d = self.stats.decision
        if d.significant:
            return d.verdict
        if not d.ready:
            return "no difference yet — too little data for the test (at least 500 impressions per arm)"
        if d.impressions_needed:
            return f"no difference yet — about {d.impressions_needed:,} more impressions needed"
        return "no difference yet"

    def text(self) -> str:
        lines = [f"experiment {self.experiment}: arms {', '.join(self.arms)}"]
        for name, s in self.arms.items():
            e = {m: estimate(m, s.moments[m]) for m in METRICS}
            lines.append(f"arm {name}: {s.impressions:,} impressions, {s.users:,} users")
            for m, label in (
                ("add_to_cart", "add-to-cart rate"),
                ("purchase", "purchase rate"),
                ("reciprocal_rank", "MRR (cart)"),
                ("revenue", "revenue/impression"),
            ):
                lines.append(f"  {label:<19} {e[m].value:9.5f}  99% CI [{e[m].low:.5f}, {e[m].high:.5f}]")
        a, b = self.pair
        lines.append(f"test: {a} against {b} (mSPRT, always valid, alpha {self.stats.decision.alpha:g})")
        for c in self.stats.comparisons:
            p = f"p = {c.p_value:.3g}" if c.ready else "too little data"
            lines.append(
                f"  {c.metric:<16} {a} - {b} = {c.difference:+.5f}  [{c.low:+.5f}, {c.high:+.5f}]  {p}"
            )
        for s in self.shadows:
            lines.append(
                f"shadow {s.version}: {s.impressions:,} impressions, MRR (cart) {s.shadow_mrr:.5f} "
                f"against the live lists' {s.live_mrr:.5f} on the same impressions: {s.difference:+.5f} "
                f"[{s.low:+.5f}, {s.high:+.5f}]"
            )
        lines += self._consumer_lines()
        if self.plot is not None:
            lines.append(f"plot: {self.plot}")
        lines.append(f"verdict ({self.stats.decision.metric}): {self.verdict}")
        return "\n".join(lines)

    def _consumer_lines(self) -> list[str]:
        if self.consumer_error is not None:
            return [f"attribution consumer: not compared ({self.consumer_error})"]
        if self.consumer is None:
            return []
        lines = ["attribution consumer (Redis) against this offline join, per arm:"]
        online = self.consumer.get(self.experiment, {})
        for arm in sorted(set(online) | set(self.joined.metrics.get(self.experiment, {}))):
            off = self.joined.metrics.get(self.experiment, {}).get(arm, {}).get("totals", {})
            on = online.get(arm, {}).get("totals", {})
            cells = [
                f"{k} {off.get(k, 0):,}/{on.get(k, 0):,}" for k in ("impressions", "add_to_cart", "purchase")
            ]
            lines.append(f"  {arm}: " + ", ".join(cells) + "  (offline/consumer)")
        if self.differences:
            lines.append(
                f"  DIFFERENT in {len(self.differences)} counters (the consumer may not have caught up yet; "
                "they must agree once it has):"
            )
            lines += [
                f"    {arm} {name}: offline {x:,}, consumer {y:,}"
                for arm, name, x, y in self.differences[:12]
            ]
        else:
            lines.append("  every counter agrees")
        return lines


def choose_pair(arms: dict[str, ArmStats], order: Iterable[str] = ()) -> tuple[str, str]:
    """The two live arms compared: in the experiment's order when known (the state in Redis),
    else by name."""
    known = [a for a in order if a in arms]
    rest = sorted(a for a in arms if a not in known)
    names = known + rest
    if len(names) < 2:
        raise UserError(
            f"the experiment has impressions of one arm only ({', '.join(names)}): nothing to compare"
        )
    return names[0], names[1]


def build(
    joined: Joined,
    experiment: str,
    metric: str = "purchase",
    arm_order: Iterable[str] = (),
    consumer: ArmMetrics | None = None,
    consumer_error: str | None = None,
) -> ExperimentReport:
    if metric not in METRIC_FLAGS:
        raise UserError(f"--metric {metric!r}: must be one of {', '.join(METRIC_FLAGS)}")
    have = joined.experiments()
    if not have:
        raise UserError(
            "no impressions yet: the ranking servers have published none (is --kafka-bootstrap set?)"
        )
    if experiment not in have:
        listing = ", ".join(f"{k} ({n:,})" for k, n in sorted(have.items()))
        raise UserError(
            f"--experiment {experiment!r}: no impressions of it (impressions by experiment: {listing})"
        )
    arms = arm_stats(joined, experiment)
    pair = choose_pair(arms, arm_order)
    stats = report(arms, *pair, metric=METRIC_FLAGS[metric])
    differences = compare_totals(joined.metrics, consumer, experiment) if consumer is not None else []
    return ExperimentReport(
        experiment,
        arms,
        pair,
        stats,
        shadow_figures(joined, experiment),
        joined,
        consumer,
        consumer_error,
        differences,
    )


# --- the plot over time -------------------------------------------------------------------------------


def series(joined: Joined, experiment: str, pair: tuple[str, str], metric: str) -> dict[str, Any]:
    """At up to ``_PLOT_POINTS`` looks in impression time: each arm's cumulative rate and interval,
    and the test's always-valid p-value (the smallest so far, as :class:`SequentialMonitor`)."""
    rows = [
        (imp.ts_ms, imp.arm, imp.user_id, o)
        for imp, o in zip(joined.impressions, joined.outcomes, strict=True)
        if imp.experiment == experiment and imp.arm in pair
    ]
    rows.sort(key=lambda r: r[0])
    ts = np.array([r[0] for r in rows], dtype=np.int64)
    arm = np.array([pair.index(r[1]) for r in rows])
    _, user = np.unique(np.asarray([r[2] for r in rows], dtype=object), return_inverse=True)
    name = METRIC_FLAGS[metric]
    value = np.array([_value(r[3], name) for r in rows], dtype=np.float64)
    # From 200 impressions on: before that the intervals span most of the axis and hide the rest.
    first = min(200, len(rows))
    looks = np.unique(np.linspace(first, len(rows), min(_PLOT_POINTS, len(rows))).astype(int))
    out: dict[str, Any] = {"ts": [], "p": [], **{a: {"rate": [], "low": [], "high": []} for a in pair}}
    best_p = 1.0
    for end in looks:
        moments = [
            Moments.from_arrays(user[:end][arm[:end] == k], value[:end][arm[:end] == k]) for k in (0, 1)
        ]
        for a, m in zip(pair, moments, strict=True):
            e = estimate(name, m)
            out[a]["rate"].append(e.value)
            out[a]["low"].append(e.low if math.isfinite(e.low) else e.value)
            out[a]["high"].append(e.high if math.isfinite(e.high) else e.value)
        c = compare(name, moments[0], moments[1], pair)
        if c.ready:
            best_p = min(best_p, c.p_value)
        out["ts"].append(int(ts[end - 1]))
        out["p"].append(best_p)
    return out


def _value(o: Outcome, metric: str) -> float:
    if metric == "add_to_cart":
        return float(o.added_to_cart)
    if metric == "purchase":
        return float(o.purchased)
    if metric == "reciprocal_rank":
        return o.reciprocal_rank
    return o.revenue_micros / MICROS


def plot(rep: ExperimentReport, metric: str, path: Path) -> Path:
    """The PNG: cumulative rate per arm with its interval band, and the test's evidence."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    data = series(rep.joined, rep.experiment, rep.pair, metric)
    when = [np.datetime64(t, "ms").astype("datetime64[ms]").astype(object) for t in data["ts"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(3, 2))
    for a in rep.pair:
        top.plot(when, data[a]["rate"], label=f"arm {a}")
        top.fill_between(when, data[a]["low"], data[a]["high"], alpha=0.25)
    top.set_ylabel(f"cumulative {metric} per impression (99% CI)")
    top.set_title(f"experiment {rep.experiment}: {rep.pair[0]} against {rep.pair[1]}")
    top.legend()
    alpha = rep.stats.decision.alpha
    bottom.semilogy(when, data["p"], color="black", label="always-valid p-value (smallest so far)")
    bottom.axhline(alpha, color="red", linestyle="--", label=f"alpha {alpha:g}")
    bottom.set_ylim(min(min(data["p"]), alpha) / 3, 1.5)
    bottom.set_ylabel("p-value (mSPRT)")
    bottom.legend(loc="lower left")
    bottom.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- the command ------------------------------------------------------------------------------------


def run(
    bootstrap: str,
    *,
    experiment: str | None = None,
    redis_client: Callable[[], Any] | None = None,
    impressions_topic: str = "rank-impressions",
    events_topic: str = "user-events",
    window_ms: int = 1_800_000,
    metric: str = "purchase",
    out_dir: Path | None = None,
    progress: bool = True,
    kafka_options: dict[str, Any] | None = None,
) -> ExperimentReport:
    """Read both topics, join, build the report, read the consumer's totals, draw the plot."""
    from services.attribution.store import read_arm_metrics

    if metric not in METRIC_FLAGS:
        raise UserError(f"--metric {metric!r}: must be one of {', '.join(METRIC_FLAGS)}")
    state = None
    client = None
    consumer = consumer_error = None
    if redis_client is not None:
        try:
            client = redis_client()
            from recstack.experiments import state as state_mod

            state = state_mod.read(client)
        except Exception as exc:  # the figures come from Kafka: Redis only adds the comparison
            consumer_error = f"cannot read Redis: {exc}"
            client = None
    options = kafka_options or {}
    joined = join(
        read_topic(bootstrap, impressions_topic, progress, **options),
        read_topic(bootstrap, events_topic, progress, **options),
        window_ms,
    )
    if experiment is None:
        have = joined.experiments()
        if state is not None and state.name in have:
            experiment = state.name
        elif len(have) == 1:
            experiment = next(iter(have))
        elif not have:
            raise UserError(
                f"no impressions yet in {impressions_topic!r} (is the servers' --kafka-bootstrap set?)"
            )
        else:
            raise UserError(f"--experiment: give one of {', '.join(sorted(have))}")
    order = (
        [a.name for a in state.arms if not a.shadow] if state is not None and state.name == experiment else []
    )
    if client is not None:
        try:
            consumer = read_arm_metrics(client, experiment)
        except Exception as exc:
            consumer_error = f"cannot read the consumer's totals: {exc}"
    rep = build(joined, experiment, metric, order, consumer, consumer_error)
    target = Path(out_dir) if out_dir is not None else Path("artifacts/experiments") / experiment
    rep.plot = plot(rep, metric, target / f"{metric}.png")
    return rep
