"""How long a stream consumer started on a freshly created topic takes to apply its first events.

Each start does what the integration tests do (tests/integration/test_stream_exactly_once.py and
conftest.py): create a fresh 6-partition topic and its 1-partition DLQ (``wait_for_metadata``),
start ``recstack stream`` on it as group ``g-<topic>`` (in this process like ``consumer_thread``,
or as its own process like ``consumer_process``), publish ``--events`` events, and time how long
until the first of them, then all of them, are applied in Redis. The consumer's log (kafka-python
at DEBUG included) is kept for each start slower than ``--keep-over`` seconds.

    .venv/bin/python benchmarks/stream_start_stall.py --starts 30 --events 3000 --timeout 40
    .venv/bin/python benchmarks/stream_start_stall.py --starts 15 --mode process --timeout 40
    .venv/bin/python benchmarks/stream_start_stall.py --starts 10 --poll-timeout-ms 1   # the race, forced

It found the stall of CHANGELOG round 5, "Known issues": kafka-python leaving a rebalance half
done (``services.stream.kafka_side.finish_abandoned_rebalance``); figures in docs/FEATURES.md,
"Joining the group".

Needs Kafka and Redis (``make up``). Uses a free Redis database (flushed before and after each
start) and topics named ``stall-<run>-<n>`` (deleted after each start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from stream_bench import _delete_topics, _reserve_database

_QUIET = ("kafka.protocol", "kafka.net.transport", "kafka.net.inet", "kafka.metrics")

# ``recstack stream`` as the tests start it, but kafka-python's group and fetch logs kept at DEBUG
# (the command turns them down to WARNING).
_LAUNCHER = f"""
import logging, sys
kafka = logging.getLogger("kafka")
kafka.setLevel(logging.DEBUG)
kafka.setLevel = lambda level: None
for name in {_QUIET!r}:
    logging.getLogger(name).setLevel(logging.INFO)
from recstack.cli import main
sys.exit(main(sys.argv[1:]))
"""

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests" / "integration"))


def _create_topics(bootstrap: str, topic: str) -> None:
    """As the tests' ``fresh_topic`` fixture: returns once every partition has a leader."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="recstack-tests", request_timeout_ms=10_000
    )
    try:
        admin.create_topics({topic: {"num_partitions": 6}}, wait_for_metadata=True)
        admin.create_topics({f"{topic}.dlq": {"num_partitions": 1}}, wait_for_metadata=True)
    finally:
        admin.close()


class _Repeats(logging.Filter):
    """Drops a message repeated within a second (a stuck member logs its poll thousands of times a second)."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, tuple[str, float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text, now = record.getMessage(), time.monotonic()
        last = self._last.get(record.name)
        if last is not None and last[0] == text and now - last[1] < 1.0:
            return False
        self._last[record.name] = (text, now)
        return True


def _stream_options(config) -> list[str]:
    """The options ``consumer_process`` of the tests passes to ``recstack stream``."""
    names = ("bootstrap", "redis", "group", "topic", "dlq_topic", "event_log", "metrics_port")
    names += ("trending_half_life_s", "session_timeout_ms", "log_roll_s", "max_batch", "poll_timeout_ms")
    return [arg for name in names for arg in (f"--{name.replace('_', '-')}", str(getattr(config, name)))]


@contextlib.contextmanager
def _consumer(mode: str, config, log_path: Path):
    """The consumer running on ``config``, its log (DEBUG, kafka-python's included) in ``log_path``."""
    from test_stream_exactly_once import consumer_thread

    if mode == "process":
        with open(log_path, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, "--log-level", "DEBUG", "stream", *_stream_options(config)],
                cwd=REPO_ROOT,
                stderr=err,
            )
            try:
                yield lambda: proc.poll() is None
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        return
    handler = logging.FileHandler(log_path)
    handler.addFilter(_Repeats())
    handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger("kafka"), logging.getLogger("services.stream.consumer")]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.addHandler(handler)
    for name in _QUIET:  # bytes on the wire and sensors: megabytes a minute, nothing about the group
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        with consumer_thread(config):
            yield lambda: True
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()


def one_start(args, run: str, n: int, redis_url: str, client, work: Path) -> dict:
    from test_stream_exactly_once import Published, _config, _events, applied_records, publish

    topic = f"stall-{run}-{n}"
    log_path = work / f"{topic}.log"
    client.flushdb()
    _create_topics(args.bootstrap, topic)
    config = _config(
        args.bootstrap, redis_url, topic, work / topic / "events", poll_timeout_ms=args.poll_timeout_ms
    )
    published = Published()
    result = {"start": n, "topic": topic}
    started = time.monotonic()
    try:
        with _consumer(args.mode, config, log_path) as alive:
            if args.delay:
                time.sleep(args.delay)
            publish(args.bootstrap, topic, _events(args.events, seed=n), published, seed=n)
            result["published_s"] = round(time.monotonic() - started, 2)
            first = None
            deadline = started + args.timeout
            while time.monotonic() < deadline and alive():
                done = applied_records(client, topic)
                if first is None and done > 0:
                    first = time.monotonic() - started
                if done >= published.records:
                    result["all_s"] = round(time.monotonic() - started, 2)
                    break
                time.sleep(0.05)
            result["first_s"] = round(first, 2) if first is not None else None
            result.setdefault("all_s", None)
    finally:
        _delete_topics(args.bootstrap, [topic, f"{topic}.dlq"])
    slow = result["all_s"] is None or result["all_s"] > args.keep_over
    if slow:
        kept = Path(args.log_dir) / log_path.name
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(log_path, kept)
        result["log"] = str(kept)
    else:
        log_path.unlink(missing_ok=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--mode", choices=["thread", "process"], default="thread")
    parser.add_argument("--timeout", type=float, default=60.0, help="give a start up after this many seconds")
    parser.add_argument(
        "--poll-timeout-ms", type=int, default=100, help="the consumer's poll timeout (--poll-timeout-ms)"
    )
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between the start and publishing")
    parser.add_argument("--keep-over", type=float, default=10.0, help="keep the logs of slower starts")
    parser.add_argument("--log-dir", default="artifacts/stall-logs")
    parser.add_argument("--bootstrap", default=os.environ.get("RECSTACK_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--redis-server", default="redis://127.0.0.1:6379")
    args = parser.parse_args()

    import prometheus_client  # noqa: F401  (before Feast: see services/stream/cli.py)

    from recstack.redis_url import connect

    redis_url, release = _reserve_database(args.redis_server)
    client = connect(redis_url)
    run = uuid.uuid4().hex[:6]
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="stall-") as tmp:
            for n in range(args.starts):
                res = one_start(args, run, n, redis_url, client, Path(tmp))
                results.append(res)
                print(json.dumps(res), flush=True)
    finally:
        client.flushdb()
        client.close()
        release()
    finite = [r["all_s"] for r in results if r["all_s"] is not None]
    firsts = [r["first_s"] for r in results if r["first_s"] is not None]
    gave_up = sum(r["all_s"] is None for r in results)
    never = len(results) - len(firsts)  # starts that applied nothing within --timeout
    summary = {
        "starts": len(results),
        "mode": args.mode,
        "poll_timeout_ms": args.poll_timeout_ms,
        "events": args.events,
        "median_first_s": statistics.median(firsts) if firsts else None,
        "slowest_first_s": f">{args.timeout:.0f}" if never else (max(firsts) if firsts else None),
        "median_all_s": statistics.median(finite) if finite else None,
        # a start given up is slower than --timeout: reported as such, not as a time
        "slowest_all_s": f">{args.timeout:.0f}" if gave_up else (max(finite) if finite else None),
        "over_30s": gave_up + sum(t > 30 for t in finite),
        "gave_up": gave_up,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
