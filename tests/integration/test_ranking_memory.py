"""A flood of random ids cannot grow a ranking server's memory without bound.

A real ``recstack serve`` with its default settings (a subprocess on loopback, its resident memory
read from /proc/PID/status) is sent 100,000 random user and item ids in 10,000 calls, all in flight
at once; its resident memory may grow by less than 200 MB. Past ``--max-concurrent-rpcs`` calls
are refused at once with RESOURCE_EXHAUSTED ("Concurrent RPC limit exceeded!") instead of being
taken, and gRPC's core cancels calls past its own queue of calls not yet taken (about 1,000 to
3,000 by default: ``grpc.server.max_pending_requests`` and its hard limit), so a flood is answered
with OK, RESOURCE_EXHAUSTED or CANCELLED, and nothing piles up in memory.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recstack.v1 import ranking_pb2, ranking_pb2_grpc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RANDOM_IDS = 100_000
IDS_PER_CALL = 10  # one random user id and nine random item ids per Rank call: 10,000 calls
MAX_GROWTH_MB = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _start(models: Path, redis_url: str, *flags: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "recstack.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--models", str(models), "--redis", redis_url, *flags],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 180
        request = health_pb2.HealthCheckRequest(service="recstack.v1.RankingService")
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if health.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return process, port
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the server never became SERVING"
            time.sleep(0.2)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _random_id(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits, k=rng.randint(8, 64)))


async def _flood(port: int, calls: list[ranking_pb2.RankRequest]) -> dict[str, int]:
    """Every call in flight at once; ``{status code name: count}``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)

        async def one(request: ranking_pb2.RankRequest) -> str:
            try:
                await stub.Rank(request, timeout=120)
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        codes: dict[str, int] = {}
        for code in await asyncio.gather(*(one(r) for r in calls)):
            codes[code] = codes.get(code, 0) + 1
        return codes


def test_random_ids_do_not_grow_the_servers_memory(redis_url, tmp_path):
    from test_ranking_server import ITEMS, V1, publish_model

    models = tmp_path / "models"
    publish_model(models, V1, seed=1)
    process, port = _start(models, redis_url)
    try:
        rng = random.Random(14)
        asyncio.run(_flood(port, [ranking_pb2.RankRequest(user_id="u1", item_ids=ITEMS[:99])] * 50))
        before_kb = _status_kb(process.pid, "VmRSS")
        calls = [
            ranking_pb2.RankRequest(
                user_id=_random_id(rng), item_ids=[_random_id(rng) for _ in range(IDS_PER_CALL - 1)]
            )
            for _ in range(RANDOM_IDS // IDS_PER_CALL)
        ]
        codes = asyncio.run(_flood(port, calls))
        peak_kb, after_kb = _status_kb(process.pid, "VmHWM"), _status_kb(process.pid, "VmRSS")
        print(f"codes {codes}; RSS before {before_kb / 1024:.0f} MB, peak {peak_kb / 1024:.0f} MB, "
              f"after {after_kb / 1024:.0f} MB")  # fmt: skip
        assert process.poll() is None, "the server died under the flood"
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "CANCELLED"}, codes
        assert codes.get("OK", 0) > 0
        growth_mb = (peak_kb - before_kb) / 1024
        assert growth_mb < MAX_GROWTH_MB, f"resident memory grew by {growth_mb:.0f} MB under random ids"
    finally:
        _stop(process)


def test_calls_past_the_bound_are_refused_at_once(redis_url, tmp_path):
    from test_ranking_server import ITEMS, V1, ServerThread, publish_model, wait_for

    from services.ranking.config import RankingConfig

    models = tmp_path / "models"
    publish_model(models, V1, seed=1)
    config = RankingConfig(
        host="127.0.0.1", port=0, metrics_port=0, models_dir=models, redis_url=redis_url,
        max_concurrent_rpcs=2, max_queue=1_000, max_queue_wait_ms=0.0, max_loop_lag_ms=0.0,
    )  # fmt: skip
    server = ServerThread(config)
    try:
        _burst(server, ITEMS, V1, wait_for)
    finally:
        server.close()


def _burst(server, items: list[str], version: str, wait_for) -> None:
    def answers() -> bool:
        try:
            reply = server.stub.Rank(ranking_pb2.RankRequest(user_id="u0", item_ids=items[:5]), timeout=5)
            return reply.model_version == version
        except grpc.RpcError:
            return False

    wait_for(answers, "the model to load")
    # A burst of calls of 300 candidates arrives far faster than two at a time are ranked.
    calls = [
        server.stub.Rank.future(ranking_pb2.RankRequest(user_id=f"u{k}", item_ids=items), timeout=60)
        for k in range(100)
    ]
    outcomes = []
    for call in calls:
        try:
            call.result()
            outcomes.append(("OK", ""))
        except grpc.RpcError as exc:
            outcomes.append((exc.code().name, exc.details()))
    codes = {code for code, _ in outcomes}
    assert codes <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    refused = [details for code, details in outcomes if code == "RESOURCE_EXHAUSTED"]
    assert refused and all("Concurrent RPC limit exceeded" in d for d in refused), outcomes
    assert sum(code == "OK" for code, _ in outcomes) >= 2
