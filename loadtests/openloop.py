"""Open-loop gRPC load generator: a fixed arrival rate, whatever the server does.

Requests are sent on a schedule fixed before the step starts (Poisson or evenly spaced), never
"after the previous answer", so a slow server cannot slow the generator down and hide its own
queueing (coordinated omission). Each latency is measured from the request's scheduled time;
see :meth:`loadtests.stats.StepRecord.latencies`.

The load comes from several generator processes (one ``grpc.aio`` client on uvloop each, with
several channels, i.e. several TCP connections) that share one schedule: a Python client is
about as expensive per call as a Python server, so one process could not outrun the server it
measures. Every request's scheduled, sent and answered times, status code, ``path`` and
``degraded`` flag are recorded, and each step is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from loadtests.stats import StepRecord

log = logging.getLogger(__name__)

SERVICE_PATH = "/recstack.v1.RankingService/"
METHODS = ("Rank", "Recommend")
SCHEDULES = ("poisson", "uniform")
# The event loop's timers wake in whole milliseconds, so a call due within this much is sent
# now; an early call is timed from its actual send, so this never flatters the figures.
SEND_LEAD_S = 0.001
# Time given to every generator process to receive the step before its first call is due.
START_DELAY_S = 0.25
# The most requests one step may schedule (bounds memory and run time whatever the flags say).
MAX_REQUESTS_PER_STEP = 2_000_000


def make_schedule(rate: float, duration_s: float, kind: str = "poisson", seed: int = 0) -> np.ndarray:
    """Sorted send offsets in seconds from the step start: ``round(rate * duration)`` arrivals.

    ``poisson``: the arrival times of a Poisson process of that rate, conditioned on its count
    (independent uniform times, sorted), so the offered rate is exact and the gaps are
    exponential. ``uniform``: evenly spaced.
    """
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration must be positive, got {rate}/s for {duration_s} s")
    n = max(1, int(round(rate * duration_s)))
    if n > MAX_REQUESTS_PER_STEP:
        raise ValueError(f"{rate}/s for {duration_s} s is {n} requests, more than {MAX_REQUESTS_PER_STEP}")
    if kind == "uniform":
        return np.arange(n, dtype=np.float64) / rate
    if kind == "poisson":
        return np.sort(np.random.default_rng(seed).uniform(0.0, duration_s, size=n))
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")


def _client_settings() -> dict[str, Any]:
    from recstack.client import settings_from_env

    return settings_from_env()


@dataclass(frozen=True)
class GeneratorConfig:
    """How the load is produced: ``workers`` processes with ``channels`` connections each."""

    workers: int = 2
    channels: int = 4
    timeout_s: float = 1.0  # per-call deadline: a call unanswered by then counts as DEADLINE_EXCEEDED
    connect_timeout_s: float = 30.0
    uvloop: bool = True
    # Extra gRPC channel options, e.g. (("grpc.lb_policy_name", "round_robin"),) with an address
    # listing several servers ("ipv4:127.0.0.1:50061,127.0.0.1:50062").
    channel_options: tuple[tuple[str, Any], ...] = ()
    # TLS and token for recstack.client's channel factory (tls, root_certificates,
    # tls_server_name, token); by default from RECSTACK_TLS_CA and RECSTACK_AUTH_TOKEN.
    client_settings: dict[str, Any] = field(default_factory=_client_settings, repr=False, compare=False)


class GeneratorError(RuntimeError):
    """A generator process failed (cannot connect, crashed): the message carries its reason."""


class OpenLoopGenerator:
    """Generator processes connected to one server, ready to run steps at given rates.

    ``requests`` are serialized request messages for ``method``, sent in turn. Use as a
    context manager: the processes are started on enter and stopped on exit.
    """

    def __init__(
        self, address: str, method: str, requests: list[bytes], config: GeneratorConfig | None = None
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if not requests:
            raise ValueError("no requests to send")
        self.address = address
        self.method = method
        self.config = config or GeneratorConfig()
        self._requests = requests
        self._workers: list[tuple[Any, Connection]] = []

    def __enter__(self) -> OpenLoopGenerator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that may hold gRPC state
        cfg = self.config
        for worker_id in range(cfg.workers):
            parent, child = ctx.Pipe()
            # Each process starts at its own place in the request list.
            offset = worker_id * len(self._requests) // cfg.workers
            process = ctx.Process(
                target=_worker_main,
                args=(child, self.address, self.method, self._requests, offset, cfg),
                name=f"openloop-{worker_id}",
                daemon=True,
            )
            process.start()
            child.close()
            self._workers.append((process, parent))
        for _, conn in self._workers:
            self._expect(conn, "ready", cfg.connect_timeout_s + 30.0)

    @property
    def pids(self) -> list[int]:
        """The generator processes' ids (their CPU time is the client's cost of the load)."""
        return [process.pid for process, _ in self._workers if process.pid is not None]

    def run_step(
        self, rate: float, duration_s: float, schedule: str = "poisson", seed: int = 0
    ) -> StepRecord:
        """Offer ``rate`` calls/s for ``duration_s`` seconds; return every call's record once all
        calls have been answered or have timed out."""
        if not self._workers:
            raise GeneratorError("generator is not started")
        offsets = make_schedule(rate, duration_s, schedule, seed)
        start = time.monotonic() + START_DELAY_S
        n_workers = len(self._workers)
        for k, (_, conn) in enumerate(self._workers):
            conn.send(("run", offsets[k::n_workers], start))
        wait = START_DELAY_S + duration_s + self.config.timeout_s + 30.0
        parts = [self._expect(conn, "result", wait) for _, conn in self._workers]
        return StepRecord.merge(parts)

    def close(self) -> None:
        for _, conn in self._workers:
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for process, conn in self._workers:
            process.join(timeout=5.0)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5.0)
            conn.close()
        self._workers = []

    def _expect(self, conn: Connection, kind: str, timeout_s: float) -> Any:
        if not conn.poll(timeout_s):
            raise GeneratorError(f"generator process sent nothing for {timeout_s:.0f} s")
        try:
            message = conn.recv()
        except EOFError:
            raise GeneratorError("generator process exited unexpectedly") from None
        if message[0] == "error":
            raise GeneratorError(message[1])
        if message[0] != kind:
            raise GeneratorError(f"generator process answered {message[0]!r}, expected {kind!r}")
        return message[1]


# --- inside each generator process ---------------------------------------------------------------


def _worker_main(
    conn: Connection, address: str, method: str, requests: list[bytes], offset: int, cfg: GeneratorConfig
) -> None:
    try:
        loop = _new_event_loop(cfg.uvloop)
        asyncio.set_event_loop(loop)
        client = loop.run_until_complete(_Client.connect(address, method, requests, offset, cfg))
    except TimeoutError:
        conn.send(("error", f"cannot connect to {address} within {cfg.connect_timeout_s:g} s"))
        return
    except BaseException as exc:  # report the reason to the parent instead of dying silently
        conn.send(("error", f"cannot connect to {address}: {exc!r}"))
        return
    conn.send(("ready", None))
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            _, offsets, start = message
            conn.send(("result", loop.run_until_complete(client.run(offsets, start))))
    except EOFError:
        pass  # the parent went away
    except BaseException:
        conn.send(("error", traceback.format_exc(limit=5)))
    finally:
        loop.run_until_complete(client.close())
        loop.close()


def _new_event_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class _Client:
    """One process's channels and the loop that fires calls on schedule."""

    def __init__(
        self, channels: list[Any], calls: list[Any], requests: list[bytes], offset: int, timeout_s: float
    ):
        self._channels = channels
        self._calls = calls
        self._requests = requests
        self._next = offset
        self._timeout_s = timeout_s
        self._path_index: dict[str, int] = {}

    @classmethod
    async def connect(
        cls, address: str, method: str, requests: list[bytes], offset: int, cfg: GeneratorConfig
    ) -> _Client:
        from recstack.client import make_aio_channel

        channels, calls = [], []
        for i in range(cfg.channels):
            # A distinct argument per channel gives each its own TCP connection. No retries:
            # every failed call is counted (the client's strict mode).
            channel = make_aio_channel(
                address,
                retries=None,
                options=[
                    ("grpc.use_local_subchannel_pool", 1),
                    ("recstack.loadtest.channel", i),
                    *cfg.channel_options,
                ],
                **cfg.client_settings,
            )
            await asyncio.wait_for(channel.channel_ready(), cfg.connect_timeout_s)
            channels.append(channel)
            # No (de)serializers: requests go out as prepared bytes, answers come back as bytes.
            calls.append(channel.unary_unary(SERVICE_PATH + method))
        return cls(channels, calls, requests, offset, cfg.timeout_s)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def run(self, offsets: np.ndarray, start: float) -> StepRecord:
        import grpc

        from recstack.v1 import ranking_pb2

        n = len(offsets)
        due = start + offsets
        sent = np.zeros(n)
        done = np.zeros(n)
        code = np.full(n, -1, dtype=np.int16)
        path = np.full(n, -1, dtype=np.int16)
        degraded = np.zeros(n, dtype=bool)
        parse = ranking_pb2.RankResponse.FromString
        clock = time.monotonic
        timeout = self._timeout_s
        path_index = self._path_index
        details: dict[int, str] = {}  # status value -> the first error message seen with it

        async def one(i: int, call: Any, payload: bytes) -> None:
            sent[i] = clock()
            try:
                raw = await call(payload, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                done[i] = clock()
                code[i] = value = exc.code().value[0]
                if value not in details:
                    details[value] = (exc.details() or "")[:200]
                return
            except Exception as exc:  # anything else is the client's fault: recorded as UNKNOWN
                done[i] = clock()
                code[i] = value = grpc.StatusCode.UNKNOWN.value[0]
                details.setdefault(value, f"client: {exc!r}"[:200])
                return
            done[i] = clock()
            code[i] = 0
            response = parse(raw)
            idx = path_index.get(response.path)
            if idx is None:
                idx = path_index[response.path] = len(path_index)
            path[i] = idx
            degraded[i] = response.degraded

        loop = asyncio.get_running_loop()
        tasks = []
        calls, requests = self._calls, self._requests
        n_calls, n_requests = len(calls), len(requests)
        i = 0
        while i < n:
            horizon = clock() + SEND_LEAD_S
            while i < n and due[i] <= horizon:
                k = self._next
                self._next += 1
                tasks.append(loop.create_task(one(i, calls[k % n_calls], requests[k % n_requests])))
                i += 1
            if i < n:
                await asyncio.sleep(max(0.0, due[i] - clock() - SEND_LEAD_S))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout + 5.0)
            for task in pending:  # left as NO_ANSWER in the record
                task.cancel()
        names = [""] * len(path_index)
        for name, idx in path_index.items():
            names[idx] = name
        return StepRecord(
            scheduled=due,
            sent=sent,
            done=done,
            code=code,
            path=path,
            degraded=degraded,
            path_names=names,
            error_details=details,
        )
