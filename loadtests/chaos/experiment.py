"""The experiment side of the chaos stack: the ranking servers publish impressions to a topic of the
run's own, an A/B experiment splits users between two published versions, two ``recstack attribute``
consumers join the impressions with the run's events, and some events carry the ``request_id`` of
the answer they followed (the rest are credited by user, item and time window).

Two checks, after the faults that touch this path and after the run's last fault:

* **impressions**: for every ranking server process running, the answers it served
  (``recstack_ranking_path_total``) = published + dropped + failed (its impression counters), and
  the impressions topic holds every published one: the distinct ``request_id`` s of that process
  (the first 16 hex characters of a request id are drawn once per process) number at least the
  published and at most published + failed (a record whose acknowledgement was lost counts as
  failed, yet may be on the topic). The producer retries without idempotence, so a broker restart
  may write a record twice: duplicates are counted and reported, distinct ids are compared.
* **attribution**: once both consumers applied every record of both topics, the per-arm counters in
  Redis (``store.read_arm_metrics``: totals and per-minute buckets) equal ``offline_join_topics``
  of the same two topics.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import time
import urllib.request
from collections import Counter
from typing import TYPE_CHECKING, Any

from loadtests.chaos.stack import RECSTACK, REPO, Service, free_port

if TYPE_CHECKING:
    from loadtests.chaos.report import FaultResult
    from loadtests.chaos.runner import ChaosRun

ATTRIBUTION_SESSION_TIMEOUT_MS = 6_000
# How long an event waits for the impressions of its partition to pass its ts (--max-wait): a
# broker restart holds the servers' impressions back for as long as it lasts (tens of seconds
# here), and an event released before its impression arrives is credited differently than the
# offline join would. The checks keep impressions flowing while they wait (see _tick), so the
# watermark, not this wait, releases the last events.
ATTRIBUTION_MAX_WAIT_S = 120
# Marks a database whose attribution keys a chaos run wrote (the next run may delete them).
CHAOS_MARK = "recstack:attr:chaos-run"
RELEASED_BY_WAIT = "recstack_attribution_released_by_wait_total"
CATCH_UP_TIMEOUT_S = 120.0
PREFIX_LEN = 16  # hex characters of a request id drawn once per server process
IMPRESSION_METRICS = ("published", "dropped", "failed")
IMPRESSIONS_CHECK = "impressions: answers = published + dropped + failed, published on the topic"
ATTRIBUTION_CHECK = "attribution: per-arm counters = offline join of the topics"


def scrape_total(port: int, metric: str) -> float | None:
    """A metric summed over its labels on a ``/metrics`` endpoint (None when unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    pattern = rf"^{re.escape(metric)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def older_name(version: str) -> str:
    """A version name one second older than ``version`` (so the run's model stays the newest)."""
    when = dt.datetime.strptime(version[1:16], "%Y%m%d-%H%M%S") - dt.timedelta(seconds=1)
    return when.strftime("v%Y%m%d-%H%M%S")


class ExperimentStack:
    """Impressions topic, experiment, attribution consumers and the two checks, for one run."""

    def __init__(self, run: ChaosRun) -> None:
        self.run = run
        self.topic = f"{run.run_id}-impressions"
        self.group = f"{run.run_id}-attribution"
        self.experiment = run.run_id
        self.arms: dict[str, str] = {}
        self.started_experiment = False
        self.consumers: list[Service] = []
        self.consumer_metrics: list[int] = []
        self.followups = 0
        self._client: Any = None

    @property
    def redis_url(self) -> str:
        cfg = self.run.cfg
        db = cfg.redis_db if cfg.attribution_db is None else cfg.attribution_db
        return f"redis://127.0.0.1:{cfg.redis_port}/{db}"

    def server_args(self) -> list[str]:
        return ["--kafka-bootstrap", self.run.cfg.bootstrap, "--impressions-topic", self.topic]

    # ------------------------------------------------------------------------------ set-up

    def clear_attribution_state(self) -> None:
        """The attribution keys of the run's attribution database start empty: their offsets are
        per partition (one attribution group per database), and an earlier run's would skip records.
        Only keys an earlier chaos run left (it marks the database) are deleted: a database holding
        another attribution group's keys is refused, naming the flag to choose another one."""
        import redis

        from services.attribution import keys

        client = redis.Redis.from_url(self.redis_url)
        try:
            stale = [
                k for k in client.scan_iter(match=keys.PREFIX + "*", count=1000) if k != CHAOS_MARK.encode()
            ]
            if stale and not client.exists(CHAOS_MARK):
                raise RuntimeError(
                    f"{self.redis_url} holds attribution keys ({keys.PREFIX}*) "
                    "that no chaos run wrote: choose an empty database with --attribution-redis-db"
                )
            client.set(CHAOS_MARK, self.run.run_id)
            for i in range(0, len(stale), 500):
                client.delete(*stale[i : i + 500])
        finally:
            client.close()

    def start_experiment(self) -> None:
        """Arm A: the run's model; arm B: a copy of it published under an older name (two versions
        loaded and routed by user, the newest still the default)."""
        run = self.run
        source = run.models / run.model_version
        copy = run.models / older_name(run.model_version)
        if not copy.exists():
            shutil.copytree(source, run.models / f".tmp-{copy.name}")
            (run.models / f".tmp-{copy.name}").rename(copy)
        self.arms = {"A": run.model_version, "B": copy.name}
        arms = [a for name, v in self.arms.items() for a in ("--arm", f"{name}={v}:0.5")]
        cmd = [*RECSTACK, "experiment", "start", "--name", self.experiment, "--models", str(run.models),
               "--redis", run.cfg.redis_url, *arms]  # fmt: skip
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"recstack experiment start failed:\n{result.stdout}{result.stderr}")
        self.started_experiment = True
        run.say(f"experiment {self.experiment}: A={self.arms['A']} / B={self.arms['B']}, 50/50")

    def start_consumers(self) -> None:
        run, cfg = self.run, self.run.cfg
        for i in (1, 2):
            port = free_port()
            self.consumer_metrics.append(port)
            args = ["--log-level", "INFO", "attribute", "--bootstrap", cfg.bootstrap,
                    "--redis", self.redis_url, "--group", self.group, "--impressions-topic", self.topic,
                    "--events-topic", run.topic, "--metrics-port", str(port),
                    "--session-timeout-ms", str(ATTRIBUTION_SESSION_TIMEOUT_MS),
                    "--max-wait", f"{ATTRIBUTION_MAX_WAIT_S}s",
                    "--client-id", f"{run.run_id}-attr-{i}"]  # fmt: skip
            service = Service(
                f"attribute-{i}", args, run.logs / f"attribute-{i}.log", cfg.background_priority
            )
            service.start()
            self.consumers.append(service)
        run.say(f"attribution consumers started (pids {[c.pid for c in self.consumers]})")

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
        for service in self.consumers:
            service.stop()
        if self.started_experiment:
            subprocess.run([*RECSTACK, "experiment", "stop", "--redis", self.run.cfg.redis_url],
                           cwd=REPO, capture_output=True, timeout=60)  # fmt: skip

    # ------------------------------------------------------------------------------ traffic

    def followup(self, user_id: str, items: list[str]) -> tuple[str, list[str]] | None:
        """One ranked call for ``user_id`` over ``items`` (the event traffic's next event follows
        it): the answer's request id and items, or None when the call failed (a server away)."""
        from recstack.client import RankingClient, settings_from_env

        if self._client is None:
            address = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in self.run.server_ports)
            self._client = RankingClient(address, strict=True, deadline_s=1.0, **settings_from_env())
        try:
            answer = self._client.rank(user_id, items, top_k=10)
        except Exception:
            return None
        self.followups += 1
        return answer.request_id, answer.item_ids

    # ------------------------------------------------------------------------------ checks

    def check(self, result: FaultResult) -> None:
        self._check_impressions(result)
        self._check_attribution(result)

    def _tick(self) -> None:
        """A few ranked calls for users spread over every partition: their impressions move each
        partition's watermark past the last events, which the consumers then release (with no
        impressions flowing, the last events would wait --max-wait)."""
        assert self.run.traffic is not None
        for user in self.run.traffic.users[:: max(1, len(self.run.traffic.users) // 24)]:
            self.followup(user, self.run.vocab[:5])

    def _server_counts(self) -> list[dict[str, float] | None]:
        out: list[dict[str, float] | None] = []
        for port in self.run.server_metrics:
            values = {"served": scrape_total(port, "recstack_ranking_path_total")}
            for name in IMPRESSION_METRICS:
                values[name] = scrape_total(port, f"recstack_impressions_{name}_total")
            out.append(None if any(v is None for v in values.values()) else values)  # type: ignore[misc]
        return out

    def _check_impressions(self, result: FaultResult) -> None:
        from recstack.client import RankingClient, settings_from_env
        from services.attribution.store import topic_records

        run = self.run
        # The request-id prefix of each server process running now: one direct call each.
        prefixes: list[str | None] = []
        for port in run.server_ports:
            try:
                with RankingClient(
                    f"127.0.0.1:{port}", strict=True, deadline_s=5, **settings_from_env()
                ) as c:
                    prefixes.append(
                        c.rank(run.traffic.users[0], run.vocab[:5], top_k=5).request_id[:PREFIX_LEN]
                    )  # type: ignore[union-attr]
            except Exception:
                prefixes.append(None)
        # Every answer's impression settles (sent and acknowledged, or counted) within seconds.
        deadline = time.monotonic() + 30.0
        while True:
            counts = self._server_counts()
            settled = all(
                c is not None and c["served"] == sum(c[n] for n in IMPRESSION_METRICS) for c in counts
            )
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        ids: Counter = Counter()
        import json

        for _, _, value in topic_records(run.cfg.bootstrap, self.topic):
            try:
                ids[json.loads(value)["request_id"]] += 1  # type: ignore[arg-type]
            except (ValueError, KeyError, TypeError):
                ids["<unreadable>"] += 1
        ok, parts = True, []
        totals = Counter()
        for service, prefix, c in zip(run.servers, prefixes, counts, strict=True):
            if prefix is None or c is None:
                ok = False
                parts.append(f"{service.name}: not reachable")
                continue
            mine = {i: n for i, n in ids.items() if i.startswith(prefix)}
            distinct, dups = len(mine), sum(mine.values()) - len(mine)
            balanced = c["served"] == sum(c[n] for n in IMPRESSION_METRICS)
            on_topic = c["published"] <= distinct <= c["published"] + c["failed"]
            ok = ok and balanced and on_topic
            parts.append(
                f"{service.name}: {c['served']:,.0f} answers, {c['published']:,.0f} published + "
                f"{c['dropped']:,.0f} dropped + {c['failed']:,.0f} failed; {distinct:,} distinct on the topic"
                f" ({dups} duplicates)"
            )
            totals.update({k: int(v) for k, v in c.items()} | {"distinct": distinct, "duplicates": dups})
        result.figures["impressions"] = f"{totals['published']:,} published"
        result.figures["impressions_dropped_failed"] = f"{totals['dropped']}/{totals['failed']}"
        result.figures["impression_duplicates"] = totals["duplicates"]
        result.check(IMPRESSIONS_CHECK, ok, "; ".join(parts))

    def _caught_up(self, client: Any) -> tuple[bool, bool]:
        """Whether the offsets the consumers stored reach the end of (events, impressions)."""
        from kafka import KafkaConsumer, TopicPartition

        from services.attribution import keys

        stored = {k.decode(): int(v) for k, v in client.hgetall(keys.OFFSETS).items()}
        consumer = KafkaConsumer(bootstrap_servers=self.run.cfg.bootstrap, enable_auto_commit=False)
        try:
            out = []
            for topic, field in ((self.run.topic, keys.events_field), (self.topic, keys.impressions_field)):
                tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
                ends = consumer.end_offsets(tps)
                out.append(
                    bool(tps) and all(stored.get(field(tp.partition), -1) >= ends[tp] - 1 for tp in tps)
                )
        finally:
            consumer.close()
        return out[0], out[1]

    def _check_attribution(self, result: FaultResult) -> None:
        import redis

        from services.attribution.config import AttributionConfig
        from services.attribution.store import offline_join_topics, read_arm_metrics

        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        try:
            start, caught_up = time.monotonic(), False
            while time.monotonic() - start < CATCH_UP_TIMEOUT_S:
                try:
                    events, impressions = self._caught_up(client)
                except Exception:  # the broker or Redis still on its way back
                    events = impressions = False
                if events and impressions:
                    caught_up = True
                    break
                if not events:  # held events wait for the watermark: move it (then stop, so it ends)
                    self._tick()
                time.sleep(1.0)
            online = read_arm_metrics(client)
        finally:
            client.close()
        offline = offline_join_topics(
            self.run.cfg.bootstrap, self.topic, self.run.topic, AttributionConfig().window_ms
        )
        arms = sorted({(e, a) for m in (online, offline) for e in m for a in m[e]})
        parts, ok = [], caught_up and online == offline
        for exp, arm in arms:
            got = online.get(exp, {}).get(arm, {}).get("totals", {})
            want = offline.get(exp, {}).get(arm, {}).get("totals", {})
            acted = {k: got.get(k, 0) for k in ("impressions", "add_to_cart", "purchase")}
            parts.append(f"arm {arm}: " + ", ".join(f"{v:,} {k}" for k, v in acted.items())
                         + ("" if got == want else f" (offline join: {want})"))  # fmt: skip
        if online != offline and all(
            online.get(e, {}).get(a, {}).get("totals") == offline.get(e, {}).get(a, {}).get("totals")
            for e, a in arms
        ):
            parts.append("totals agree, per-minute buckets differ")
        if not caught_up:
            parts.append(f"consumers not caught up within {CATCH_UP_TIMEOUT_S:.0f} s")
        result.figures["released_by_wait"] = int(
            sum(scrape_total(port, RELEASED_BY_WAIT) or 0.0 for port in self.consumer_metrics)
        )
        result.figures["attributed"] = sum(
            m["totals"].get(k, 0) for arms_ in online.values() for m in arms_.values()
            for k in ("view", "add_to_cart", "purchase")
        )  # fmt: skip
        result.check(ATTRIBUTION_CHECK, ok, "; ".join(parts) or "no impressions")
