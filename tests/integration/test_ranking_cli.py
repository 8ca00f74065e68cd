"""``recstack serve`` as an operator runs it: flags, Prometheus metrics, graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtests.servers import serve_command
from recstack.v1 import ranking_pb2, ranking_pb2_grpc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_help_lists_every_flag_with_its_environment_variable():
    out = subprocess.run(
        [sys.executable, "-m", "recstack.cli", "serve", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--port",
        "--host",
        "--models",
        "--redis",
        "--naive",
        "--metrics-port",
        "--max-batch-candidates",
        "--max-queue-delay-ms",
        "--max-queue",
        "--item-refresh-ms",
        "--inline-when-idle",
        "--redis-timeout-ms",
        "--tls-cert",
        "--tls-key",
        "--auth-token-file",
        "--device",
    ):
        assert flag in out, flag
        assert "RECSTACK_" + flag.lstrip("-").replace("-", "_").upper() in " ".join(out.split()), flag


def test_serve_exports_metrics_and_stops_gracefully_on_sigterm(redis_url, tmp_path):
    from test_ranking_server import ITEMS, V1, publish_model

    models = tmp_path / "models"
    publish_model(models, V1, seed=1)
    port, metrics_port = _free_port(), _free_port()
    # Flags read the environment too; no shedding by queue wait on a busy shared test machine.
    env = dict(os.environ, RECSTACK_MAX_QUEUE="500", RECSTACK_MAX_QUEUE_WAIT_MS="0")
    process = subprocess.Popen(
        serve_command(port, models, redis_url, metrics_port=metrics_port),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                try:
                    got = health.Check(
                        health_pb2.HealthCheckRequest(service="recstack.v1.RankingService"), timeout=2
                    )
                    if got.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "server never became SERVING"
                time.sleep(0.2)
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            assert stub.Rank(ranking_pb2.RankRequest(user_id="u1", item_ids=ITEMS[:20]), timeout=30).items

            text = (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            )
            assert 'recstack_ranking_request_seconds_count{code="OK",method="Rank"} 1.0' in text
            assert f'recstack_ranking_model_info{{version="{V1}"}} 1.0' in text

            calls = [
                stub.Rank.future(ranking_pb2.RankRequest(user_id=f"u{k}", item_ids=ITEMS[:50]), timeout=60)
                for k in range(30)
            ]
            process.send_signal(signal.SIGTERM)
            codes = []
            for call in calls:
                try:
                    call.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        assert process.wait(timeout=60) == 0
        # Calls still in gRPC's own queue when the signal came were never accepted: the core
        # cancels or refuses them. Calls inside the service finish (the in-process test of
        # graceful stop in test_ranking_server.py holds them there to prove it).
        allowed = {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
        assert set(codes) <= allowed, [c.name for c in codes]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_workers_share_one_port_and_stop_together(redis_url, tmp_path):
    from test_ranking_server import ITEMS, V1, publish_model

    models = tmp_path / "models"
    publish_model(models, V1, seed=1)
    port, metrics_port = _free_port(), _free_port()
    while metrics_port + 1 == port:
        metrics_port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "recstack.cli", "serve", "--workers", "2", "--host", "127.0.0.1",
         "--port", str(port), "--models", str(models), "--redis", redis_url,
         "--metrics-port", str(metrics_port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        pages: list[str] = []
        while len(pages) < 2:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "the two workers never both exported metrics"
            pages = []
            for worker_port in (metrics_port, metrics_port + 1):
                try:
                    url = f"http://127.0.0.1:{worker_port}/metrics"
                    pages.append(urllib.request.urlopen(url, timeout=2).read().decode())
                except OSError:
                    break
            time.sleep(0.5)
        # Each worker has its own process and metrics, and every new channel lands on one of them.
        answered = 0
        while answered < 40 and time.monotonic() < deadline:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = ranking_pb2_grpc.RankingServiceStub(channel)
                try:
                    reply = stub.Rank(ranking_pb2.RankRequest(user_id="u1", item_ids=ITEMS[:10]), timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE  # a worker still loading its model
                    time.sleep(0.5)
                    continue
                assert reply.model_version == V1
                answered += 1
        assert answered == 40
        counts = []
        for worker_port in (metrics_port, metrics_port + 1):
            text = (
                urllib.request.urlopen(f"http://127.0.0.1:{worker_port}/metrics", timeout=10).read().decode()
            )
            line = next(
                (
                    x
                    for x in text.splitlines()
                    if x.startswith('recstack_ranking_request_seconds_count{code="OK",method="Rank"}')
                ),
                None,
            )
            counts.append(float(line.split()[-1]) if line else 0.0)
        assert sum(counts) == answered
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
