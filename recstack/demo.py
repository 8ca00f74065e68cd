"""``make demo``: the whole stack end to end on one machine, ending with a printed report.

Steps: replay Online Retail through Kafka -> the stream consumer builds the Feast/Redis
features and the event log -> train, quantize and evaluate a model from that event log ->
serve it over gRPC -> measure freshness (event published -> visible to Rank) -> a short
open-loop load test -> the report (quality, latency percentiles, throughput, freshness) with
its plots on disk. Every part runs as its own process through the ``recstack`` command, as
an operator would run it. The Kafka broker and Redis server are started by ``make up``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from recstack.errors import UserError
from services.ranking.config import RankingConfig

REPO = Path(__file__).resolve().parents[1]
RECSTACK = [sys.executable, "-m", "recstack.cli"]


def _step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


class Stack:
    """The processes the demo starts; all stopped on exit unless ``keep``."""

    def __init__(self, out: Path, keep: bool) -> None:
        self.out = out
        self.keep = keep
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.out / f"{name}.log").open("w")
        proc = subprocess.Popen([*RECSTACK, *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.procs[name] = proc
        print(f"    started {name} (pid {proc.pid}, log {self.out / (name + '.log')})")
        return proc

    def stop(self) -> None:
        if self.keep:
            for name, proc in self.procs.items():
                print(f"    left running: {name} (pid {proc.pid})")
            return
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _run(args: list[str]) -> None:
    print("    $ recstack " + " ".join(args), flush=True)
    result = subprocess.run([*RECSTACK, *args], cwd=REPO)
    if result.returncode != 0:
        raise UserError(f"`recstack {' '.join(args)}` failed with exit code {result.returncode}")


def _wait_applied(redis_url: str, expect_users: list[str], timeout_s: float) -> float:
    """Wait until the features of the last replayed users are visible; returns seconds waited."""
    from feature_store.reads import read_features
    from recstack.redis_url import connect

    client = connect(redis_url)
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        users, _ = read_features(client, expect_users, [])
        if all(u is not None for u in users):
            return time.monotonic() - start
        time.sleep(0.5)
    raise UserError(f"stream consumer did not apply the replayed events within {timeout_s:.0f} s")


def _measure_freshness(bootstrap: str, target: str, samples: int) -> list[float]:
    """Publish an event for a fresh user and time until ``Rank`` reflects it (cold -> warm user)."""
    from recstack.client import EventPublisher, RankingClient, settings_from_env
    from recstack.kafka import kafka_security_from_env

    security = kafka_security_from_env()  # the same RECSTACK_KAFKA_* as the stack
    publisher = EventPublisher(bootstrap, "user-events", security=security, linger_ms=0)
    client = RankingClient(target, deadline_s=1, **settings_from_env())
    items = ["85123A", "71053", "84406B", "22423", "85099B", "47566", "20725", "84879"]
    latencies: list[float] = []
    for _ in range(samples):
        user = f"demo-fresh-{uuid.uuid4().hex[:10]}"
        before = [(i.item_id, round(i.score, 5)) for i in client.rank(user, items).items]
        event = {
            "event_id": uuid.uuid4().hex,
            "user_id": user,
            "item_id": "22423",
            "event_type": "purchase",
            "ts": int(time.time() * 1000),
        }
        sent = time.monotonic()
        publisher.publish(event)
        publisher.flush()
        while time.monotonic() - sent < 10:
            after = [(i.item_id, round(i.score, 5)) for i in client.rank(user, items).items]
            if after != before:
                latencies.append(time.monotonic() - sent)
                break
            time.sleep(0.005)
    publisher.close()
    client.close()
    return latencies


def _wait_serving(target: str, timeout_s: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from recstack.client import make_channel, settings_from_env

    channel = make_channel(target, **settings_from_env())
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = stub.Check(
                health_pb2.HealthCheckRequest(service="recstack.v1.RankingService"), timeout=1
            )
            if status.status == health_pb2.HealthCheckResponse.SERVING:
                channel.close()
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise UserError(f"ranking server at {target} was not SERVING within {timeout_s:.0f} s")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--out", default=os.environ.get("RECSTACK_DEMO_OUT", "artifacts/demo"))
    # Where a plain `recstack serve` looks (its --models default, also RECSTACK_MODELS): the demo's
    # model is the one a new user serves next. Each run adds a version; the newest is served.
    parser.add_argument(
        "--models", default=os.environ.get("RECSTACK_MODELS", str(RankingConfig().models_dir))
    )
    parser.add_argument("--bootstrap", default=os.environ.get("RECSTACK_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--redis", default=os.environ.get("RECSTACK_REDIS", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("RECSTACK_PORT", "50051")))
    parser.add_argument("--until", default="2011-11-09T00:00:00Z", help="train/test cut (last month = test)")
    parser.add_argument("--keep", action="store_true", default=os.environ.get("KEEP") == "1")
    args = parser.parse_args(argv)

    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    events_dir = out / "events"
    models_dir = (REPO / args.models).resolve()
    stack = Stack(out, args.keep)
    started = time.monotonic()
    stream_args = ["stream", "--bootstrap", args.bootstrap, "--redis", args.redis, "--group", "recstack-demo",
                   "--event-log", str(events_dir), "--metrics-port", "0"]  # fmt: skip
    try:
        _step("stream consumer: Kafka user-events -> Feast/Redis features + Parquet event log")
        stack.start("stream", stream_args)
        _step("replay Online Retail (real purchases) into Kafka")
        _run(["replay", "--source", "onlineretail", "--rate", "0", "--bootstrap", args.bootstrap])
        from recstack.sources import load_onlineretail

        tail_users = list(dict.fromkeys(load_onlineretail()["user_id"].iloc[-200:]))[-5:]
        waited = _wait_applied(args.redis, tail_users, timeout_s=600)
        print(f"    features applied ({waited:.1f} s after the replay finished)")
        # The event log is flushed on shutdown; restart the consumer so the log is complete for training.
        consumer = stack.procs.pop("stream")
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(timeout=60)
        stack.start("stream", stream_args)

        _step("train, quantize and evaluate a model from the event log")
        _run(["train", "--events", str(events_dir), "--until", args.until, "--out", str(models_dir)])

        _step("serve it over gRPC")
        target = f"127.0.0.1:{args.port}"
        stack.start(
            "serve",
            [
                "serve",
                "--host",
                "127.0.0.1",  # the demo's clients are local: keep the server off the network
                "--port",
                str(args.port),
                "--models",
                str(models_dir),
                "--redis",
                args.redis,
                "--metrics-port",
                "0",
            ],
        )
        _wait_serving(target, timeout_s=120)

        _step("freshness: event published -> visible to Rank")
        fresh = _measure_freshness(args.bootstrap, target, samples=20)

        _step("short open-loop load test")
        bench_out = out / "bench"
        _run(bench_args(models_dir, args.redis, bench_out))

        _report(out, models_dir, bench_out, fresh, time.monotonic() - started)

        _step("the README's next step: grpcurl against the server")
        _grpcurl_check(target)
    finally:
        stack.stop()
    return 0


# README.md, "Next steps": the same call, checked here on the demo's server.
GRPCURL_RANK = ["-plaintext", "-d", '{"user_id":"17850","item_ids":["85123A","71053","84406B"]}']


def _grpcurl_check(target: str) -> None:
    """Call Rank with the pinned grpcurl (infra/tools.sh builds it once) as the README shows."""
    found = subprocess.run([str(REPO / "infra" / "tools.sh"), "--grpcurl"], stdout=subprocess.PIPE, text=True)
    if found.returncode != 0:  # tools.sh said why on standard error
        raise UserError("grpcurl could not be installed (infra/tools.sh --grpcurl)")
    grpcurl = found.stdout.strip()
    args = [grpcurl, *GRPCURL_RANK, target, "recstack.v1.RankingService/Rank"]
    print("    $ " + shlex.join(args), flush=True)
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise UserError(f"grpcurl Rank failed (exit {result.returncode}): {result.stderr.strip()}")
    answer = json.loads(result.stdout)
    if len(answer.get("items", [])) != 3 or not answer.get("model_version"):
        raise UserError(f"grpcurl Rank returned no ranking: {result.stdout}")
    # grpcurl leaves out fields at their default value: a score of exactly 0.0 has no "score".
    print("    " + " ".join(f"{i['item_id']}={i.get('score', 0.0):.3f}" for i in answer["items"]), flush=True)


def bench_args(models_dir: Path, redis_url: str, bench_out: Path) -> list[str]:
    """The demo's benchmark: ``recstack bench --quick`` on the model and features it just built.
    Quick means indicative figures; the targets are judged by a full ``recstack bench`` run."""
    return ["bench", "--quick", "--models", str(models_dir), "--redis", redis_url, "--out", str(bench_out)]


def _report(out: Path, models_dir: Path, bench_out: Path, fresh: list[float], took_s: float) -> None:
    from models.artifacts import list_versions

    version = list_versions(models_dir)[-1]
    metrics = json.loads((version / "metrics.json").read_text())
    lines = [
        "# recstack demo report",
        "",
        f"Model version `{version.name}`, demo took {took_s / 60:.1f} min.",
        "",
    ]
    report_md = version / "report.md"
    if report_md.is_file():
        lines += ["## Quality (temporal split, full ranking over all items)", "", report_md.read_text(), ""]
    else:
        lines += ["## Quality", "", "```", json.dumps(metrics, indent=2)[:3000], "```", ""]
    lines += [
        "## Freshness (event published -> Rank answer changes)",
        "",
        f"{len(fresh)} samples: p50 {_pct(fresh, 0.5) * 1000:.0f} ms, p99 {_pct(fresh, 0.99) * 1000:.0f} ms",
        "",
    ]
    summary = bench_out / "summary.md"
    if summary.is_file():
        lines += [
            "## Latency, throughput and CPU per call (quick open-loop benchmark, 100 candidates per Rank)",
            "",
            "Indicative figures from short steps: the targets are judged by a full `recstack bench` run "
            "(docs/LOADTESTS.md).",
            "",
            summary.read_text(),
            "",
        ]
    plots = sorted(str(p) for p in [*bench_out.glob("*.png"), *version.glob("*.png")])
    lines += ["## Plots", "", *[f"- {p}" for p in plots], ""]
    text = "\n".join(lines)
    (out / "REPORT.md").write_text(text)
    print("\n" + text)
    print(f"Report written to {out / 'REPORT.md'}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"make demo: {exc}", file=sys.stderr)
        sys.exit(2)
