"""Redis Cluster next to one Redis server, in one run: the stream consumer and the ranking feature read.

1. **Stream.** ``--events`` synthetic events are published once to a fresh 6-partition topic. One
   ``recstack stream`` process drains that backlog into one Redis server (a free database, reserved
   as ``benchmarks/stream_bench.py`` does), then another process (its own consumer group) drains
   the same backlog into the Redis Cluster. Events/s applied (start-up excluded), consumer CPU and
   Redis CPU (summed over the cluster's nodes) per event.
2. **Ranking read.** ``read_features`` for 1 user + 100 candidate items (1,000 items written),
   ``--reads`` times each: the lean single-server transport, the lean cluster transport
   (``services.ranking.redis_client.ClusterPipelinedRedis``), and redis-py's cluster pipeline.

    infra/redis-cluster.sh start
    .venv/bin/python benchmarks/cluster_bench.py --cluster redis+cluster://127.0.0.1:7000

Needs Kafka and Redis (``make up``) and a Redis Cluster; both are flushed before and after.
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

from stream_bench import (  # noqa: E402  (after the path set-up)
    _cpu_seconds,
    _create_topic,
    _delete_topics,
    _free_port,
    _reserve_database,
)


def _primaries(client) -> list:
    """One plain client per node that owns data (the server itself when not a cluster)."""
    if getattr(client, "nodes_manager", None) is None:
        return [client]
    return [client.get_redis_connection(node) for node in client.get_primaries()]


def _redis_cpu_seconds(client) -> float:
    total = 0.0
    for node in _primaries(client):
        info = node.info("cpu")
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


def _flush(client) -> None:
    for node in _primaries(client):
        node.flushdb()


def drain(args, url: str, client, topic: str, total: int, log_dir: str) -> dict:
    """Run one consumer (its own group) over the whole backlog of ``topic`` into ``url``."""
    from services.stream.keys import applied_key

    group = f"cluster-bench-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "recstack.cli", "stream", "--bootstrap", args.bootstrap, "--redis", url]
    cmd += ["--topic", topic, "--dlq-topic", f"{topic}.dlq", "--group", group, "--event-log", log_dir]
    cmd += ["--metrics-port", str(_free_port()), "--max-batch", str(args.max_batch)]
    log_path = Path(log_dir) / f"{group}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + args.timeout
            first_t, first_n, n = None, 0, 0
            cpu0 = redis_cpu0 = 0.0
            while n < total:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text().splitlines()[-30:]
                    raise RuntimeError(
                        f"the consumer into {url} stopped at {n} of {total}:\n" + "\n".join(tail)
                    )
                n = sum(int(v) + 1 for v in client.hvals(applied_key(topic)))
                if n and first_t is None:
                    first_t, first_n = time.monotonic(), n
                    cpu0, redis_cpu0 = _cpu_seconds(proc.pid), _redis_cpu_seconds(client)
                time.sleep(0.02)
            seconds = time.monotonic() - first_t
            records = total - first_n
            consumer_cpu = _cpu_seconds(proc.pid) - cpu0
            redis_cpu = _redis_cpu_seconds(client) - redis_cpu0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return {
        "records": records,
        "seconds": seconds,
        "events_per_s": records / seconds,
        "consumer_cpu_us_per_event": consumer_cpu / records * 1e6,
        "redis_cpu_us_per_event": redis_cpu / records * 1e6,
        "load_average": os.getloadavg()[0],
    }


def reads(args, single_url: str, cluster_url: str, single, cluster) -> dict:
    from feature_store.reads import read_features
    from feature_store.values import ItemFeatures, UserFeatures
    from feature_store.writes import write_features
    from services.ranking.redis_client import ClusterPipelinedRedis, PipelinedRedis

    items = {
        f"bench-item-{k}": ItemFeatures(views=k, trending=k / 3, category=f"c{k % 20}") for k in range(1000)
    }
    users = {
        f"bench-user-{k}": UserFeatures(views=k, recent_items=[f"bench-item-{j}" for j in range(50)])
        for k in range(100)
    }
    for client in (single, cluster):
        write_features(client, users=users, items=items)
    transports = {
        "one server, lean transport": PipelinedRedis(single_url, 1.0),
        "cluster, lean transport": ClusterPipelinedRedis(cluster_url, 1.0),
        "cluster, redis-py pipeline": cluster,
    }
    out = {}
    for rnd in range(2):  # interleaved rounds: the machine's load moves for all of them alike
        for name, transport in transports.items():
            times = []
            for r in range(args.reads):
                ids = [f"bench-item-{(r * 37 + j * 7) % 1000}" for j in range(100)]
                started = time.perf_counter()
                read_features(transport, [f"bench-user-{r % 100}"], ids)
                times.append(time.perf_counter() - started)
            if rnd:  # the first round warms caches and connections
                times.sort()
                out[name] = {
                    "p50_ms": times[len(times) // 2] * 1000,
                    "p99_ms": times[int(len(times) * 0.99)] * 1000,
                }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", default=os.environ.get("RECSTACK_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument(
        "--redis",
        default=None,
        help="one Redis server's URL, flushed (default: a free database 1-14 of redis://127.0.0.1:6379)",
    )
    parser.add_argument("--cluster", required=True, metavar="URL", help="redis+cluster:// URL, flushed")
    parser.add_argument("--events", type=int, default=100_000, help="backlog drained by each consumer")
    parser.add_argument("--max-batch", type=int, default=2_000)
    parser.add_argument("--reads", type=int, default=2_000, help="timed feature reads per transport")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)

    import logging

    logging.getLogger("kafka").setLevel(logging.ERROR)
    import prometheus_client  # noqa: F401  (before Feast; see services/stream/cli.py)

    from recstack.redis_url import connect
    from recstack.sources import synthetic
    from services.replay.publisher import frame_to_events, publish

    release = None
    if args.redis is None:
        args.redis, release = _reserve_database("redis://127.0.0.1:6379")
    single, cluster = connect(args.redis), connect(args.cluster)
    topic = f"cluster-bench-{uuid.uuid4().hex[:8]}"
    log_dir = tempfile.mkdtemp(prefix="cluster-bench-")
    try:
        for client in (single, cluster):
            _flush(client)
        _create_topic(args.bootstrap, topic, 6)
        _create_topic(args.bootstrap, f"{topic}.dlq", 1)  # the consumer refuses to start without it
        frame = synthetic(args.events, seed=5)
        print(f"publishing {len(frame):,} events to {topic} ...", file=sys.stderr)
        publish(
            frame_to_events(frame), total=len(frame), bootstrap=args.bootstrap, topic=topic, progress=False
        )
        stream = {}
        for name, url, client in (("one server", args.redis, single), ("cluster", args.cluster, cluster)):
            print(f"draining into {name} ({url}) ...", file=sys.stderr)
            stream[name] = drain(args, url, client, topic, len(frame), log_dir)
        read = reads(args, args.redis, args.cluster, single, cluster)
    finally:
        _delete_topics(args.bootstrap, [topic, f"{topic}.dlq"])
        for client in (single, cluster):
            _flush(client)
        if release is not None:
            release()

    one, many = stream["one server"], stream["cluster"]
    print()
    print(f"{'stream consumer, one process':<34}{'one server':>14}{'cluster (3)':>14}{'cluster/one':>14}")
    for label, key, fmt in (
        ("events/s applied", "events_per_s", "{:,.0f}"),
        ("consumer CPU per event (us)", "consumer_cpu_us_per_event", "{:,.1f}"),
        ("Redis CPU per event (us, all nodes)", "redis_cpu_us_per_event", "{:,.1f}"),
    ):
        print(
            f"{label:<34}{fmt.format(one[key]):>14}{fmt.format(many[key]):>14}{many[key] / one[key]:>13.2f}x"
        )
    print(f"{'load average (2 cores)':<34}{one['load_average']:>14.1f}{many['load_average']:>14.1f}")
    print()
    base = read["one server, lean transport"]
    print(f"{'read 1 user + 100 items':<34}{'p50 ms':>10}{'p99 ms':>10}{'p50 vs one':>12}")
    for name, r in read.items():
        print(f"{name:<34}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['p50_ms'] / base['p50_ms']:>11.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"stream": stream, "reads": read}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
