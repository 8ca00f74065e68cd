"""The servers a benchmark measures, each started as its own process on a free port.

A server counts as up once the standard gRPC health service reports
``recstack.v1.RankingService`` as SERVING (the ranking server does so once a model is loaded).
Every server's output goes to a log file; a server that exits or never becomes healthy is
reported with the tail of that log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVICE_NAME = "recstack.v1.RankingService"
# RECSTACK_* variables that would change what a server under test is; never passed on.
_WITHHELD_ENV = ("RECSTACK_NAIVE", "RECSTACK_PORT", "RECSTACK_METRICS_PORT")


class ServerFailed(RuntimeError):
    """A server exited early or did not become healthy in time; the message has its log tail."""


@dataclass(frozen=True)
class ServerSpec:
    """``name`` is what reports call it; ``argv`` may hold ``{port}``, replaced by the chosen port."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


def echo_spec() -> ServerSpec:
    return ServerSpec(
        "echo", (sys.executable, "-m", "loadtests.echo_server", "--host", "127.0.0.1", "--port", "{port}")
    )


def serve_command(
    port: int | str,
    models: str | Path,
    redis: str,
    *,
    metrics_port: int | str = 0,
    naive: bool = False,
    extra_args: tuple[str, ...] | list[str] = (),
) -> list[str]:
    """``recstack serve`` on loopback (through ``python -m recstack.cli``, so no console script is
    needed); ``port`` may be the ``{port}`` placeholder of a :class:`ServerSpec`."""
    argv = [sys.executable, "-m", "recstack.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--models", str(models), "--redis", redis, "--metrics-port", str(metrics_port)]
    if naive:
        argv.append("--naive")
    return [*argv, *extra_args]


def ranking_spec(
    name: str, models: str, redis: str, *, naive: bool, extra_args: tuple[str, ...] = ()
) -> ServerSpec:
    return ServerSpec(name, tuple(serve_command("{port}", models, redis, naive=naive, extra_args=extra_args)))


def free_port() -> int:
    """A TCP port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A running server: ``address`` to call, :meth:`stop` to end it (SIGTERM, then SIGKILL)."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.argv = [part.replace("{port}", str(self.port)) for part in spec.argv]
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs (the root of its process tree)."""
        return None if self._process is None else self._process.pid

    def start(self, ready_timeout_s: float) -> float:
        """Start the server and wait until it is healthy; returns the seconds that took."""
        env = {k: v for k, v in os.environ.items() if k not in _WITHHELD_ENV}
        env.update(self.spec.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        self._wait_healthy(began + ready_timeout_s)
        return time.monotonic() - began

    def _wait_healthy(self, deadline: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from recstack.client import make_channel, settings_from_env

        status = "no answer"
        with make_channel(self.address, retries=None, **settings_from_env()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self._process is not None and self._process.poll() is not None:
                    raise ServerFailed(
                        f"{self.spec.name} server exited with code {self._process.returncode} before it was "
                        f"healthy; {self.log_tail()}"
                    )
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1.0)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                except grpc.RpcError as exc:
                    status = exc.code().name if hasattr(exc, "code") else str(exc)
                time.sleep(0.2)
        self.stop()
        raise ServerFailed(
            f"{self.spec.name} server was not healthy in time (last health answer: {status}); "
            f"{self.log_tail()}"
        )

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"no log at {self.log_path}"
        return f"last lines of {self.log_path}:\n" + "\n".join(text)

    def stop(self, grace_s: float = 10.0) -> int | None:
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5.0)
        return process.returncode
