"""Stream consumer benchmark: throughput of one consumer process next to Feast ``push``, and freshness.

One run, three measurements:

1. **Throughput.** ``--events`` synthetic events are published to a fresh 6-partition topic first;
   then one ``recstack stream`` process consumes the backlog. Applied events/s are measured from
   the applied offsets the consumer stores in Redis (start-up excluded: the clock starts at the
   first applied batch and stops when every record is applied).
2. **Feast push.** In this process, ``FeatureStore.push`` (online) writes user_activity rows as
   the consumer left them (real list lengths), in batches of ``--push-batch``, into the same
   Redis; the median rows/s of ``--push-repeats`` runs is the baseline (the best is printed too).
   CPU time per event / per row is printed for both: it depends much less on other load on the
   machine than wall-clock rates do.
3. **Freshness.** With the consumer still running and caught up, events are published at a steady
   ``--rate`` for ``--seconds``; among them, probes (one new user each, every ``--probe-every``
   events) are timed from ``send()`` to the moment a pipelined Redis read sees them, i.e. when
   ``Rank`` could use them. The consumer's own histogram (Kafka timestamp -> applied) is printed too.

    .venv/bin/python benchmarks/stream_bench.py --json artifacts/bench/stream.json

Needs Kafka and Redis (``make up``). Uses a free Redis database (flushed before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _create_topic(bootstrap: str, name: str, partitions: int) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="stream-bench")
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()


def _delete_topics(bootstrap: str, names: list[str]) -> None:
    from kafka.admin import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="stream-bench")
        try:
            admin.delete_topics(names)
        finally:
            admin.close()
    except Exception as exc:  # cleanup only
        print(f"warning: could not delete topics {names}: {exc}", file=sys.stderr)


def _reserve_database(server: str):
    """A free database of ``server`` (1-14), locked like tests/integration/conftest.py does, so
    that a test running at the same time never gets it. Returns (url, release)."""
    import redis

    locks = redis.Redis.from_url(f"{server}/15")
    owner = f"stream-bench:{os.getpid()}"
    for db in range(1, 15):
        key = f"recstack-tests:db:{db}"
        if locks.set(key, owner, nx=True, px=30 * 60 * 1000):

            def release(key=key) -> None:
                if locks.get(key) == owner.encode():
                    locks.delete(key)

            return f"{server}/{db}", release
    raise RuntimeError(f"every database 1-14 of {server} is reserved by running tests; give --redis")


def _applied_total(client, topic: str) -> int:
    from services.stream.keys import applied_key

    return sum(int(v) + 1 for v in client.hvals(applied_key(topic)))


def _start_consumer(args, topic: str, metrics_port: int, log_dir: str, stderr) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "recstack.cli",
        "stream",
        "--bootstrap",
        args.bootstrap,
        "--redis",
        args.redis,
        "--topic",
        topic,
        "--dlq-topic",
        f"{topic}.dlq",
        "--group",
        f"bench-{topic}",
        "--event-log",
        log_dir,
        "--metrics-port",
        str(metrics_port),
        "--max-batch",
        str(args.max_batch),
    ]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _redis_cpu_seconds(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure_throughput(args, client, topic: str, total: int, proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + args.timeout
    first_t = None
    first_n = 0
    n = 0
    cpu0 = redis_cpu0 = 0.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the consumer exited with code {proc.returncode}")
        n = _applied_total(client, topic)
        now = time.monotonic()
        if n and first_t is None:
            first_t, first_n = now, n
            cpu0, redis_cpu0 = _cpu_seconds(proc.pid), _redis_cpu_seconds(client)
        if n >= total:
            break
        time.sleep(0.02)
    else:
        raise RuntimeError(f"the consumer applied {n} of {total} records within {args.timeout}s")
    seconds = time.monotonic() - first_t
    records = total - first_n
    consumer_cpu = _cpu_seconds(proc.pid) - cpu0
    redis_cpu = _redis_cpu_seconds(client) - redis_cpu0
    return {
        "records": records,
        "seconds": seconds,
        "events_per_s": records / seconds,
        "consumer_cpu_s": consumer_cpu,
        "consumer_cpu_us_per_event": consumer_cpu / records * 1e6,
        "events_per_consumer_cpu_s": records / consumer_cpu if consumer_cpu else None,
        "redis_cpu_us_per_event": redis_cpu / records * 1e6,
        "load_average": os.getloadavg()[0],
    }


def measure_feast_push(args, client, user_ids: list[str]) -> dict:
    """Feast ``push`` (online) of user_activity rows as the consumer keeps them (real list lengths)."""
    import pandas as pd
    from feast.data_source import PushMode

    from feature_store.layout import user_key
    from feature_store.reads import read_features
    from feature_store.store import open_store

    store = open_store(args.redis, tempfile.mkdtemp(prefix="stream-bench-feast-"))
    users, _ = read_features(client, user_ids, [])
    rows = [u for u in users if u is not None]
    n = args.push_rows
    now = pd.Timestamp.now(tz="UTC")
    picked = [rows[k % len(rows)] for k in range(n)]
    frame = pd.DataFrame(
        {
            "user_id": [f"push-{k}" for k in range(n)],
            "views": [u.views for u in picked],
            "add_to_carts": [u.add_to_carts for u in picked],
            "purchases": [u.purchases for u in picked],
            "last_event_ts": [u.last_event_ts for u in picked],
            "recent_items": [u.recent_items for u in picked],
            "purchased_items": [u.purchased_items for u in picked],
            "top_categories": [u.top_categories for u in picked],
            "top_category_weights": [u.top_category_weights for u in picked],
            "event_timestamp": [now] * n,
        }
    )
    store.push("user_activity_push", frame.head(10), to=PushMode.ONLINE)  # warm-up
    runs = []
    for _ in range(args.push_repeats):  # the machine is shared: report the median of a few runs
        client.delete(*[user_key(u) for u in frame["user_id"]])
        started = time.perf_counter()
        cpu0 = time.process_time()
        for start in range(0, n, args.push_batch):
            store.push("user_activity_push", frame.iloc[start : start + args.push_batch], to=PushMode.ONLINE)
        runs.append((n / (time.perf_counter() - started), n / max(time.process_time() - cpu0, 1e-9)))
    rates = sorted(r for r, _ in runs)
    return {
        "rows": n,
        "batch": args.push_batch,
        "runs_rows_per_s": [r for r, _ in runs],
        "rows_per_s": statistics.median(rates),
        "best_rows_per_s": rates[-1],
        "rows_per_cpu_s": statistics.median(c for _, c in runs),
        "mean_recent_items": sum(len(u.recent_items) for u in picked) / n,
    }


def measure_freshness(args, client, topic: str, metrics_port: int) -> dict:
    from kafka import KafkaProducer

    from feature_store.layout import USER_FIELDS, user_key
    from recstack.sources import synthetic
    from services.replay.publisher import frame_to_events

    n = int(args.rate * args.seconds)
    events = list(frame_to_events(synthetic(n, seed=7)))
    before = dict(_histogram(metrics_port, "recstack_stream_freshness_seconds"))
    run = uuid.uuid4().hex[:6]
    producer = KafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=5, batch_size=256 * 1024)
    pending: dict[bytes, float] = {}
    lock = threading.Lock()
    latencies: list[float] = []
    done = threading.Event()

    def watch() -> None:  # a reader polling Redis the way Rank reads features
        while not done.is_set() or pending:
            with lock:
                keys = list(pending)
            if keys:
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.hmget(key, USER_FIELDS[:1])
                seen_at = time.perf_counter()
                for key, reply in zip(keys, pipe.execute(), strict=True):
                    if reply[0] is not None:
                        with lock:
                            latencies.append(seen_at - pending.pop(key))
            if done.is_set() and time.perf_counter() - stop_at > 30:
                break
            time.sleep(0.002)

    stop_at = float("inf")
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    for i, ev in enumerate(events):
        if i % 100 == 0:
            ahead = started + i / args.rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        producer.send(topic, key=ev.user_id.encode(), value=ev.to_json_bytes())
        if i % args.probe_every == 0:
            user = f"probe-{run}-{i}"
            value = json.dumps(
                {
                    "event_id": f"probe-{run}-{i}",
                    "user_id": user,
                    "item_id": "probe",
                    "event_type": "view",
                    "ts": int(time.time() * 1000),
                }
            ).encode()
            with lock:
                pending[user_key(user)] = time.perf_counter()
            producer.send(topic, key=user.encode(), value=value)
    producer.flush()
    achieved = len(events) / (time.perf_counter() - started)
    stop_at = time.perf_counter()
    done.set()
    watcher.join(timeout=40)
    producer.close()
    latencies.sort()
    result = {
        "rate_target": args.rate,
        "rate_achieved": achieved,
        "probes": len(latencies),
        "probes_lost": len(pending),
        "p50_s": _quantile(latencies, 0.50),
        "p99_s": _quantile(latencies, 0.99),
        "max_s": latencies[-1] if latencies else None,
        "mean_s": statistics.fmean(latencies) if latencies else None,
    }
    after = _histogram(metrics_port, "recstack_stream_freshness_seconds")
    result["consumer_histogram"] = _quantiles([(le, count - before.get(le, 0)) for le, count in after])
    return result


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _histogram(port: int, name: str) -> list[tuple[float, float]]:
    """(le, cumulative count) of a Prometheus histogram scraped from ``/metrics``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    return buckets


def _quantiles(buckets: list[tuple[float, float]]) -> dict:
    """p50/p99 upper bounds (bucket "le") of a cumulative histogram."""
    if not buckets or buckets[-1][1] == 0:
        return {}
    total = buckets[-1][1]

    def upper(q: float) -> float:
        return next(le for le, count in buckets if count >= q * total)

    return {"count": int(total), "p50_le_s": upper(0.5), "p99_le_s": upper(0.99)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", default=os.environ.get("RECSTACK_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument(
        "--redis",
        default=None,
        help="Redis URL to use, flushed before and after (default: a free database 1-14 of "
        "redis://127.0.0.1:6379, reserved the way the test suite reserves them)",
    )
    parser.add_argument("--events", type=int, default=200_000, help="backlog for the throughput run")
    parser.add_argument("--max-batch", type=int, default=2_000)
    parser.add_argument("--push-rows", type=int, default=10_000)
    parser.add_argument("--push-repeats", type=int, default=3)
    parser.add_argument("--push-batch", type=int, default=1_000)
    parser.add_argument("--rate", type=float, default=5_000.0, help="events/s of the freshness run")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the freshness run")
    parser.add_argument("--probe-every", type=int, default=100, help="one timed probe every N events")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)

    import logging

    logging.getLogger("kafka").setLevel(logging.ERROR)
    import prometheus_client  # noqa: F401  (before Feast; see services/stream/cli.py)
    import redis

    from recstack.sources import synthetic
    from services.replay.publisher import frame_to_events, publish

    release = None
    if args.redis is None:
        args.redis, release = _reserve_database("redis://127.0.0.1:6379")
    client = redis.Redis.from_url(args.redis)
    client.flushdb()
    topic = f"bench-stream-{uuid.uuid4().hex[:8]}"
    _create_topic(args.bootstrap, topic, 6)
    _create_topic(args.bootstrap, f"{topic}.dlq", 1)  # the consumer refuses to start without it
    metrics_port = _free_port()
    log_dir = tempfile.mkdtemp(prefix="stream-bench-log-")
    proc = None
    try:
        frame = synthetic(args.events, seed=3)
        print(f"publishing {len(frame):,} events to {topic} ...", file=sys.stderr)
        publish(
            frame_to_events(frame), total=len(frame), bootstrap=args.bootstrap, topic=topic, progress=False
        )
        consumer_log = open(Path(log_dir) / "consumer.log", "w")  # noqa: SIM115 (closed below)
        proc = _start_consumer(args, topic, metrics_port, log_dir, consumer_log)
        try:
            throughput = measure_throughput(args, client, topic, len(frame), proc)
        except RuntimeError:
            consumer_log.flush()
            tail = (Path(log_dir) / "consumer.log").read_text().splitlines()[-30:]
            print("consumer log (last lines):\n" + "\n".join(tail), file=sys.stderr)
            raise
        print(f"consumer: {throughput['events_per_s']:,.0f} events/s", file=sys.stderr)
        push = measure_feast_push(args, client, sorted(frame["user_id"].unique().tolist()))
        print(f"feast push: {push['rows_per_s']:,.0f} rows/s", file=sys.stderr)
        freshness = measure_freshness(args, client, topic, metrics_port)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        _delete_topics(args.bootstrap, [topic, f"{topic}.dlq"])
        client.flushdb()
        if release is not None:
            release()

    ratio = throughput["events_per_s"] / push["rows_per_s"]
    ratio_best = throughput["events_per_s"] / push["best_rows_per_s"]
    results = {
        "consumer": throughput,
        "feast_push": push,
        "ratio_consumer_to_push": ratio,
        "ratio_consumer_to_best_push": ratio_best,
        "freshness": freshness,
        "targets": {
            "events_per_s>=20000": throughput["events_per_s"] >= 20_000,
            "ratio>=3": ratio >= 3,
            "freshness_p99<=1s": freshness["p99_s"] is not None and freshness["p99_s"] <= 1.0,
        },
    }
    fr = freshness
    print()
    print(f"{'measure':<44}{'value':>16}  target")
    print(f"{'consumer, one process (events/s applied)':<44}{throughput['events_per_s']:>16,.0f}  >= 20,000")
    print(f"{'  consumer CPU per event (us)':<44}{throughput['consumer_cpu_us_per_event']:>16,.1f}")
    print(f"{'  Redis CPU per event (us)':<44}{throughput['redis_cpu_us_per_event']:>16,.1f}")
    print(f"{'Feast push, same Redis (rows/s, median)':<44}{push['rows_per_s']:>16,.0f}")
    print(
        f"{'  best of ' + str(len(push['runs_rows_per_s'])) + ' runs (rows/s)':<44}"
        f"{push['best_rows_per_s']:>16,.0f}"
    )
    print(
        f"{'CPU: consumer events vs push rows per CPU-s':<44}"
        f"{throughput['events_per_consumer_cpu_s']:>9,.0f} / {push['rows_per_cpu_s']:,.0f}"
    )
    print(f"{'consumer / Feast push (median; best)':<44}{ratio:>11.1f}x; {ratio_best:.1f}x  >= 3x")
    print(f"{'freshness rate achieved (events/s)':<44}{fr['rate_achieved']:>16,.0f}  {args.rate:,.0f}")
    for label, key in (("p50", "p50_s"), ("p99", "p99_s"), ("max", "max_s")):
        value = fr[key]
        shown = f"{value * 1000:,.0f} ms" if value is not None else "n/a"
        print(
            f"{'freshness ' + label + ' (publish -> readable)':<44}{shown:>16}"
            f"  {'<= 1,000 ms' if label == 'p99' else ''}"
        )
    print(f"{'freshness probes (lost)':<44}{fr['probes']:>16} ({fr['probes_lost']})")
    hist = fr.get("consumer_histogram") or {}
    if "p99_le_s" in hist:
        print(f"{'consumer histogram p50 / p99 (<= bucket)':<44}{hist['p50_le_s']:>9} / {hist['p99_le_s']} s")
    print(f"{'load average during the run (2 cores)':<44}{throughput['load_average']:>16.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
