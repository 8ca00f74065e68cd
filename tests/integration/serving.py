"""Helpers for tests that run ``recstack serve`` as a real process."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "recstack.v1.RankingService"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(
    port: int, process: subprocess.Popen, output: Callable[[], str], timeout_s: float = 120.0
) -> None:
    """Until the server on ``port`` reports SERVING (a model is loaded); fails with the process's
    ``output()`` if it exits first."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            assert process.poll() is None, output()
            try:
                got = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
                if got.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"server never became SERVING\n{output()}"
            time.sleep(0.2)
