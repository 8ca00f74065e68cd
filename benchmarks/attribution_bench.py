"""Attribution consumer throughput: records (impressions + events) applied per second by one
``recstack attribute`` process reading a backlog, and its CPU time per record.

``--impressions`` impressions (10 items each, 1,000 users, arms A/B, a shadow ranking on A) and
about as many events (half with request_id) are published to two fresh 6-partition topics; then one
consumer reads them. The clock starts at its first applied batch and stops when Redis holds both
topics' last offsets as applied (the tail of events waits ``--max-wait`` for the impressions'
watermark, which is excluded: the rate is measured up to the last impression applied).

    .venv/bin/python benchmarks/attribution_bench.py --impressions 20000

Needs Kafka and Redis (``make up``). Uses a free Redis database (flushed before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid

from stream_bench import _create_topic, _delete_topics, _reserve_database


def _records(n: int, seed: int = 1) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    rng = random.Random(seed)
    t0 = 1_700_000_000_000
    imps, events = [], []
    for k in range(n):
        user, ts = f"u{rng.randrange(1000)}", t0 + k * 100
        items = [f"i{j}" for j in rng.sample(range(500), 10)]
        arm = "A" if k % 2 else "B"
        value = {"request_id": f"r{k}", "user_id": user, "arm": arm, "model_version": arm, "ts": ts}
        value["items"] = [{"item_id": it, "position": p, "score": 0.0} for p, it in enumerate(items, 1)]
        if arm == "A":
            value["shadow"] = {"version": "s", "items": value["items"][::-1]}
        imps.append((user.encode(), json.dumps(value).encode()))
        event = {"event_id": f"e{k}", "user_id": user, "item_id": rng.choice(items), "ts": ts + 5_000}
        event["event_type"] = rng.choice(("view", "add_to_cart", "purchase"))
        if k % 2:
            event["request_id"] = f"r{k}"
        events.append((user.encode(), json.dumps(event).encode()))
    return imps, events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument(
        "--redis", default=None, help="Redis URL (default: a free database of 127.0.0.1:6379)"
    )
    parser.add_argument("--impressions", type=int, default=20_000)
    args = parser.parse_args()
    import redis
    from kafka import KafkaProducer

    from services.attribution import keys

    release = None
    if args.redis is None:
        args.redis, release = _reserve_database("redis://127.0.0.1:6379")
    client = redis.Redis.from_url(args.redis)
    client.flushdb()
    run = uuid.uuid4().hex[:8]
    imp_topic, ev_topic = f"bench-imps-{run}", f"bench-events-{run}"
    for topic in (imp_topic, ev_topic):
        _create_topic(args.bootstrap, topic, 6)
    producer = KafkaProducer(bootstrap_servers=args.bootstrap, linger_ms=20)
    imps, events = _records(args.impressions)
    for topic, records in ((imp_topic, imps), (ev_topic, events)):
        for key, value in records:
            producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()
    cmd = [sys.executable, "-m", "recstack.cli", "attribute", f"--bootstrap={args.bootstrap}"]
    cmd += [f"--redis={args.redis}", f"--group=bench-{run}", f"--impressions-topic={imp_topic}"]
    cmd += [f"--events-topic={ev_topic}", "--metrics-port=0", "--max-wait=2s"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = done_imps = None
        while True:
            offsets = {k.decode(): int(v) for k, v in client.hgetall(keys.OFFSETS).items()}
            applied = sum(v + 1 for k, v in offsets.items() if not k.startswith("wm:"))
            if started is None and applied > 0:
                started, first = time.monotonic(), applied
            imps_applied = sum(v + 1 for k, v in offsets.items() if k.startswith("imp:"))
            if done_imps is None and imps_applied == len(imps):
                done_imps, at_done = time.monotonic(), applied
            if applied == len(imps) + len(events):
                break
            if proc.poll() is not None:
                raise RuntimeError("the consumer exited")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(proc.pid, 0)
        cpu = usage.ru_utime + usage.ru_stime
        rate = (at_done - first) / (done_imps - started)
        print(
            json.dumps(
                {
                    "records": len(imps) + len(events),
                    "records_per_s_until_last_impression": round(rate),
                    "cpu_ms_per_record_whole_run": round(1000 * cpu / (len(imps) + len(events)), 3),
                    "exit_status": status,
                }
            )
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        _delete_topics(args.bootstrap, [imp_topic, ev_topic])
        client.flushdb()
        if release is not None:
            release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
