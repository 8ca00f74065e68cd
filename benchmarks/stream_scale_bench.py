"""Consumer scale-out benchmark: one against two ``recstack stream`` processes in one group, one run.

For each consumer count (``--consumers``, default ``1 2``) a fresh 6-partition topic gets the same
``--events`` synthetic events (same seed), then that many consumers join one group and consume the
backlog into a flushed Redis database. Applied events/s are measured as in
``benchmarks/stream_bench.py``: from the applied offsets the consumers store in Redis, the clock
starting at the first applied batch (start-up and the group's first assignment excluded) and
stopping when every record is applied. The run also checks that nothing was lost or applied twice:
the users' lifetime view counts must sum to the number of view events published.

    .venv/bin/python benchmarks/stream_scale_bench.py --json artifacts/bench/stream-scale.json

Needs Kafka and Redis (``make up``). Kafka, Redis, the publisher's output and every consumer share
this machine's two cores, so the second consumer can only add what the first left idle; the
figures say how much that is here, not what two machines would do (see docs/SCALING.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import stream_bench as sb  # noqa: E402  (shares the topic, Redis and consumer helpers)


def _start(args, topic: str, index: int, log_dir: Path) -> subprocess.Popen:
    """Consumer ``index`` of the group ``bench-<topic>``, with its own event log and log file."""
    log = open(log_dir / f"consumer-{index}.log", "w")  # noqa: SIM115 (the process owns it)
    return sb._start_consumer(args, topic, sb._free_port(), str(log_dir / f"events-{index}"), log)


def _views_check(client, frame) -> tuple[int, int, int]:
    """(views published, views applied, users whose count differs): every user's lifetime
    ``views`` as the consumers wrote them, read back through the serving path's reader."""
    from feature_store.reads import read_features

    truth = frame[frame["event_type"] == "view"].groupby("user_id").size()
    users = sorted(frame["user_id"].unique().tolist())
    applied, wrong = 0, 0
    for start in range(0, len(users), 1_000):
        chunk = users[start : start + 1_000]
        rows, _ = read_features(client, chunk, [])
        for user_id, row in zip(chunk, rows, strict=True):
            views = int(row.views) if row is not None else 0
            applied += views
            wrong += views != int(truth.get(user_id, 0))
    return int(truth.sum()), applied, wrong


def run_one(args, client, frame, consumers: int) -> dict:
    client.flushdb()
    topic = f"bench-scale-{uuid.uuid4().hex[:8]}"
    sb._create_topic(args.bootstrap, topic, args.partitions)
    sb._create_topic(args.bootstrap, f"{topic}.dlq", 1)  # the consumer refuses to start without it
    log_dir = Path(tempfile.mkdtemp(prefix=f"stream-scale-{consumers}-"))
    procs: list[subprocess.Popen] = []
    try:
        from services.replay.publisher import frame_to_events, publish

        print(f"[{consumers} consumer(s)] publishing {len(frame):,} events to {topic} ...", file=sys.stderr)
        publish(
            frame_to_events(frame), total=len(frame), bootstrap=args.bootstrap, topic=topic, progress=False
        )
        procs = [_start(args, topic, i, log_dir) for i in range(consumers)]
        deadline = time.monotonic() + args.timeout
        first_t, first_n, n = None, 0, 0
        cpu0: list[float] = []
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a consumer exited with code {p.returncode}; logs in {log_dir}")
            n = sb._applied_total(client, topic)
            now = time.monotonic()
            if n and first_t is None:
                first_t, first_n = now, n
                cpu0 = [sb._cpu_seconds(p.pid) for p in procs]
            if n >= len(frame):
                break
            time.sleep(0.02)
        else:
            raise RuntimeError(
                f"{consumers} consumer(s) applied {n} of {len(frame)} records in {args.timeout}s"
            )
        seconds = time.monotonic() - first_t
        records = len(frame) - first_n
        cpu = sum(sb._cpu_seconds(p.pid) for p in procs) - sum(cpu0)
        views_published, views_applied, users_wrong = _views_check(client, frame)
        result = {
            "consumers": consumers,
            "partitions": args.partitions,
            "records": records,
            "seconds": round(seconds, 3),
            "events_per_s": round(records / seconds, 1),
            "consumer_cpu_us_per_event": round(cpu / records * 1e6, 2),
            "views_published": views_published,
            "views_applied": views_applied,
            "users_with_wrong_views": users_wrong,
            "exact": views_applied == views_published and users_wrong == 0,
            "load_average": os.getloadavg()[0],
        }
        print(
            f"[{consumers} consumer(s)] {result['events_per_s']:,.0f} events/s, "
            f"views applied {views_applied:,} of {views_published:,}",
            file=sys.stderr,
        )
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        sb._delete_topics(args.bootstrap, [topic, f"{topic}.dlq"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", default=os.environ.get("RECSTACK_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument(
        "--redis", default=None, help="Redis database URL (default: a free database, flushed)"
    )
    parser.add_argument("--events", type=int, default=200_000, help="backlog per consumer count")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--consumers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-batch", type=int, default=2_000)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    if any(c < 1 or c > args.partitions for c in args.consumers):
        parser.error(f"--consumers must be between 1 and --partitions ({args.partitions})")

    import logging

    logging.getLogger("kafka").setLevel(logging.ERROR)
    import prometheus_client  # noqa: F401  (before Feast; see services/stream/cli.py)
    import redis

    from recstack.sources import synthetic

    release = None
    if args.redis is None:
        args.redis, release = sb._reserve_database("redis://127.0.0.1:6379")
    client = redis.Redis.from_url(args.redis)
    try:
        frame = synthetic(args.events, seed=3)
        runs = [run_one(args, client, frame, c) for c in args.consumers]
    finally:
        client.flushdb()
        if release is not None:
            release()

    base = runs[0]["events_per_s"]
    print()
    print(f"{'consumers':>9} {'events/s':>12} {'vs first':>9} {'CPU us/event':>13} {'exact':>6}")
    for r in runs:
        print(
            f"{r['consumers']:>9} {r['events_per_s']:>12,.0f} {r['events_per_s'] / base:>8.2f}x "
            f"{r['consumer_cpu_us_per_event']:>13.1f} {str(r['exact']):>6}"
        )
    print(f"load average at the end (2 cores): {os.getloadavg()[0]:.1f}")
    results = {"runs": runs, "events": args.events, "partitions": args.partitions}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(r["exact"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
