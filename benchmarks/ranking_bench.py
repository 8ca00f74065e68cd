"""Ranking saturation benchmark: a bare gRPC echo server, the naive baseline and the real server, in one run.

Each server runs in its own process; this process is the load generator: open loop (requests
leave on a fixed schedule whatever the server does, and each latency is measured from the
request's *scheduled* send time, so a server that falls behind cannot hide its queue), stepped
rates, ``--candidates`` per Rank call. Printed per server: every step's achieved throughput,
p50/p99, errors and the server's CPU time per answered call (user + system, all threads: a
figure a busy shared machine distorts far less than latency); then the highest rate served
with p99 <= the SLO and no errors, the saturation throughput, and the ratios the design
targets (real >= 0.6x echo, >= 5x naive).

    .venv/bin/python benchmarks/ranking_bench.py                     # all three, default steps
    .venv/bin/python benchmarks/ranking_bench.py --targets real --rates 400,800,1200

Needs Redis (``make up``). Features are written into ``--redis`` (database 6 by default, flushed);
the model is ``--models`` (newest valid version) or, without it, a randomly initialised model of
the default architecture over ``--items`` items (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SLO_S = 0.010
ECHO_METHOD = "/bench.Echo/Echo"


# ------------------------------------------------------------------------------ the echo server
def _echo_messages():
    """``EchoRequest {repeated int64 ids}`` and ``EchoResponse {repeated float scores}``."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="bench_echo.proto", package="bench", syntax="proto3")
    req = fdp.message_type.add(name="EchoRequest")
    req.field.add(
        name="ids",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    resp = fdp.message_type.add(name="EchoResponse")
    resp.field.add(
        name="scores",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    pool = descriptor_pool.DescriptorPool()
    fd = pool.Add(fdp)
    return (
        message_factory.GetMessageClass(fd.message_types_by_name["EchoRequest"]),
        message_factory.GetMessageClass(fd.message_types_by_name["EchoResponse"]),
    )


async def _serve_echo(port: int) -> None:
    import grpc

    EchoRequest, EchoResponse = _echo_messages()

    async def echo(request, context):
        return EchoResponse(scores=[float(x) for x in request.ids])

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo,
                request_deserializer=EchoRequest.FromString,
                response_serializer=EchoResponse.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0.5)


# ------------------------------------------------------------------------------------- set-up
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_model(models: str | None, n_items: int, workdir: Path) -> tuple[Path, list[str]]:
    """The models folder to serve and the catalogue (item ids) requests draw from."""
    import json

    from models.artifacts import VOCAB, list_versions, publish_version

    if models:
        versions = list_versions(models)
        if not versions:
            sys.exit(f"no model version in {models}")
        return Path(models), json.loads((versions[-1] / VOCAB).read_text())
    import torch

    from models.model import ItemEmbeddingConfig, RankerConfig, TwoPathRanker
    from models.vocab import ItemVocab

    items = [f"item-{i:05d}" for i in range(n_items)]
    vocab = ItemVocab(items)
    torch.manual_seed(0)
    model = TwoPathRanker(RankerConfig(embedding=ItemEmbeddingConfig(num_rows=len(vocab))))
    stats = np.random.default_rng(0).gamma(1.0, 20.0, size=(len(vocab), 4)).astype(np.float32)
    out = workdir / "models"
    publish_version(out, model, vocab, stats, {"note": "random weights for the ranking benchmark"})
    return out, items


def _prepare_features(redis_url: str, items: list[str], n_users: int, seed: int = 0) -> list[str]:
    """Warm users (50 recent items, counters) and every item's counters, written the way the stream does."""
    import redis

    from feature_store.values import ItemFeatures, UserFeatures
    from feature_store.writes import write_features

    rng = np.random.default_rng(seed)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    now_ms = int(time.time() * 1000)
    item_rows = {
        item: ItemFeatures(
            views=int(v),
            add_to_carts=int(v // 8),
            purchases=int(v // 20),
            trending=float(v) / 10,
            last_event_ts=now_ms - 60_000,
        )
        for item, v in zip(items, rng.gamma(1.0, 50.0, size=len(items)), strict=True)
    }
    users = [f"bench-user-{u}" for u in range(n_users)]
    user_rows = {
        u: UserFeatures(
            views=int(rng.integers(5, 500)),
            add_to_carts=int(rng.integers(0, 50)),
            purchases=int(rng.integers(0, 20)),
            last_event_ts=now_ms - int(rng.integers(1_000, 86_400_000)),
            recent_items=list(rng.choice(items, 50, replace=False)),
            purchased_items=list(rng.choice(items, 5, replace=False)),
        )
        for u in users
    }
    chunk = 500
    keys = list(item_rows)
    for i in range(0, len(keys), chunk):
        write_features(client, items={k: item_rows[k] for k in keys[i : i + chunk]})
    for i in range(0, len(users), chunk):
        write_features(client, users={k: user_rows[k] for k in users[i : i + chunk]})
    client.close()
    return users


def _requests(
    target: str, users: list[str], items: list[str], n_candidates: int, count: int = 2000
) -> list[bytes]:
    from recstack.v1 import ranking_pb2

    rng = np.random.default_rng(1)
    if target == "echo":
        EchoRequest, _ = _echo_messages()
        return [
            EchoRequest(ids=rng.integers(0, 1 << 40, n_candidates).tolist()).SerializeToString()
            for _ in range(count)
        ]
    return [
        ranking_pb2.RankRequest(
            user_id=str(rng.choice(users)), item_ids=list(rng.choice(items, n_candidates, replace=False))
        ).SerializeToString()
        for _ in range(count)
    ]


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    port: int
    method: str


def _start(target: str, models: Path, redis_url: str, extra: list[str]) -> Server:
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    from loadtests.servers import serve_command

    if target == "echo":
        cmd = [sys.executable, __file__, "--serve-echo", str(port)]
        method = ECHO_METHOD
    else:
        cmd = serve_command(
            port, models, redis_url, naive=target == "naive", extra_args=["--log-level", "WARNING", *extra]
        )
        method = "/recstack.v1.RankingService/Rank"
    process = subprocess.Popen(cmd, cwd=REPO, env=env)
    server = Server(target, process, port, method)
    try:
        _wait_ready(server)
    except BaseException:
        _stop(server)
        raise
    return server


def _wait_ready(server: Server, timeout_s: float = 180.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from recstack.client import make_channel, settings_from_env

    deadline = time.monotonic() + timeout_s
    with make_channel(f"127.0.0.1:{server.port}", retries=None, **settings_from_env()) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        echo = channel.unary_unary(ECHO_METHOD)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise SystemExit(f"{server.name} server exited with {server.process.returncode}")
            try:
                if server.name == "echo":
                    echo(b"", timeout=1)
                    return
                got = health.Check(
                    health_pb2.HealthCheckRequest(service="recstack.v1.RankingService"), timeout=1
                )
                if got.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"{server.name} server not ready within {timeout_s:.0f} s")


def _stop(server: Server) -> None:
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


# ------------------------------------------------------------------------------- load generator
def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Step:
    rate: float
    sent: int
    ok: int
    errors: dict[str, int]
    achieved: float  # answered OK per second over the step
    p50_ms: float
    p99_ms: float
    cpu_ms_per_call: float = float("nan")  # server CPU time per answered call: robust to a busy machine

    @property
    def error_share(self) -> float:
        return sum(self.errors.values()) / max(self.sent, 1)


async def _run_step(
    channels, method: str, requests: list[bytes], rate: float, duration_s: float, timeout_s: float = 1.0
) -> Step:
    import grpc

    loop = asyncio.get_running_loop()
    clock = time.perf_counter  # the loop's own clock is cached per iteration at 1 ms resolution
    calls = [ch.unary_unary(method) for ch in channels]  # raw bytes both ways: the client stays lean
    n = max(1, int(rate * duration_s))
    latency = np.full(n, np.nan)
    done_at = np.full(n, np.nan)
    errors: dict[str, int] = {}
    start = clock() + 0.05

    async def one(i: int, scheduled: float) -> None:
        try:
            await calls[i % len(calls)](requests[i % len(requests)], timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
            return
        now = clock()
        latency[i] = now - scheduled
        done_at[i] = now

    tasks = []
    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - clock()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    warm = int(n * 0.1)  # the first tenth of a step settles the queue; not measured
    measured = latency[warm:]
    ok_lat = measured[~np.isnan(measured)]
    ok = int((~np.isnan(latency)).sum())
    span = (np.nanmax(done_at) - start) if ok else duration_s
    return Step(
        rate=rate,
        sent=n,
        ok=ok,
        errors=errors,
        achieved=ok / max(span, 1e-9),
        p50_ms=float(np.percentile(ok_lat, 50) * 1000) if len(ok_lat) else float("nan"),
        p99_ms=float(np.percentile(ok_lat, 99) * 1000) if len(ok_lat) else float("nan"),
    )


async def _drive(server: Server, requests: list[bytes], rates: list[float], step_s: float) -> list[Step]:
    from recstack.client import make_aio_channel, settings_from_env

    # Strict (no retries): every failed call is counted. TLS/token from RECSTACK_TLS_CA and
    # RECSTACK_AUTH_TOKEN, which the servers this benchmark starts inherit too.
    channels = [
        make_aio_channel(
            f"127.0.0.1:{server.port}",
            retries=None,
            options=[("grpc.use_local_subchannel_pool", 1)],
            **settings_from_env(),
        )
        for _ in range(4)
    ]
    try:
        await _run_step(channels, server.method, requests, min(rates[0], 200.0), 1.0)  # warm-up, not reported
        steps: list[Step] = []
        misses = 0
        for rate in rates:
            cpu0 = _cpu_seconds(server.process.pid)
            step = await _run_step(channels, server.method, requests, rate, step_s)
            step.cpu_ms_per_call = (_cpu_seconds(server.process.pid) - cpu0) * 1000 / max(step.ok, 1)
            steps.append(step)
            errs = ", ".join(f"{k} {v}" for k, v in sorted(step.errors.items())) or "-"
            print(
                f"  {server.name:5s} offered {rate:7.0f}/s  achieved {step.achieved:7.0f}/s  "
                f"p50 {step.p50_ms:7.2f} ms  p99 {step.p99_ms:8.2f} ms  "
                f"cpu/call {step.cpu_ms_per_call:5.2f} ms  errors {errs}",
                flush=True,
            )
            # Stop once the server is clearly past saturation: two steps in a row that fall short of
            # the offered rate or shed over 5% (a latency spike alone is noise on a shared machine).
            saturated = step.achieved < 0.85 * rate or step.error_share > 0.05
            misses = misses + 1 if saturated else 0
            if misses >= 2:
                break
            await asyncio.sleep(0.5)
        return steps
    finally:
        for ch in channels:
            await ch.close()


def _slo_rate(steps: list[Step]) -> float:
    """Highest throughput of a step with p99 within the SLO and (almost) no errors."""
    good = [s.achieved for s in steps if s.p99_ms <= SLO_S * 1000 and s.error_share < 0.001]
    return max(good, default=0.0)


def _saturation(steps: list[Step]) -> float:
    return max((s.achieved for s in steps), default=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-echo", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--targets", default="echo,naive,real", help="comma list of echo, naive, real")
    parser.add_argument(
        "--rates",
        default="100,200,400,600,800,1000,1200,1400,1600,1800,2000,2400",
        help="offered rates (calls/s) stepped through, ascending",
    )
    parser.add_argument(
        "--naive-rates",
        default="25,50,75,100,150,200,300,400",
        help="steps for the naive server (it saturates far lower)",
    )
    parser.add_argument("--step-s", type=float, default=5.0, help="seconds per step")
    parser.add_argument("--candidates", type=int, default=100, help="candidates per Rank call")
    parser.add_argument(
        "--models", default=None, help="models folder (default: a random model, --items items)"
    )
    parser.add_argument("--items", type=int, default=4000, help="catalogue size of the random model")
    parser.add_argument("--users", type=int, default=2000, help="warm users written to Redis")
    parser.add_argument(
        "--redis", default="redis://127.0.0.1:6379/6", help="Redis database to fill (flushed)"
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra flag for the real server, e.g. --server-arg=--max-queue=32",
    )
    args = parser.parse_args(argv)

    if args.serve_echo:
        import uvloop

        uvloop.run(_serve_echo(args.serve_echo))
        return 0

    import uvloop

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    rates = [float(r) for r in args.rates.split(",")]
    naive_rates = [float(r) for r in args.naive_rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="ranking-bench-") as tmp:
        models, items = _prepare_model(args.models, args.items, Path(tmp))
        users = _prepare_features(args.redis, items, args.users)
        print(
            f"bench: {len(items)} items, {len(users)} warm users, {args.candidates} candidates/call, "
            f"{args.step_s:.0f} s steps, SLO p99 <= {SLO_S * 1000:.0f} ms; cpus {os.cpu_count()}",
            flush=True,
        )
        results: dict[str, list[Step]] = {}
        for target in targets:
            server = _start(target, models, args.redis, args.server_arg if target == "real" else [])
            try:
                requests = _requests(target, users, items, args.candidates)
                steps_for = naive_rates if target == "naive" else rates
                results[target] = uvloop.run(_drive(server, requests, steps_for, args.step_s))
            finally:
                _stop(server)

    print("\nsummary (calls/s)")
    print(f"  {'server':6s} {'at p99<=10ms':>13s} {'saturation':>11s}")
    for target, steps in results.items():
        print(f"  {target:6s} {_slo_rate(steps):13.0f} {_saturation(steps):11.0f}")
    if "real" in results:
        real_slo, real_sat = _slo_rate(results["real"]), _saturation(results["real"])
        if "echo" in results:
            echo = _slo_rate(results["echo"])
            print(f"  real / echo at p99<=10ms: {real_slo / max(echo, 1e-9):.2f}x  (target >= 0.6x)")
        if "naive" in results:
            naive = _saturation(results["naive"])
            print(f"  real / naive saturation:  {real_sat / max(naive, 1e-9):.2f}x  (target >= 5x)")
            print(f"  real at p99<=10ms / naive saturation: {real_slo / max(naive, 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
