"""A bare ``grpc.aio`` RankingService that answers without features or a model.

``Rank`` echoes one float per candidate, best first; ``Recommend`` answers ``k`` made-up items.
Its throughput is the ceiling a single Python gRPC process reaches on this machine, so the
saturation benchmark measures it in the same run as the real server and reports the ratio.
The optional delay and in-flight cap turn it into a stand-in with a known latency or a known
shedding point, for testing the load tools themselves.

Run: ``python -m loadtests.echo_server --port 0`` (prints ``listening on HOST:PORT``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recstack.logs import add_log_flags, configure
from recstack.v1 import ranking_pb2, ranking_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "recstack.v1.RankingService"
PATH_NAME = "echo"


class EchoRankingService(ranking_pb2_grpc.RankingServiceServicer):
    """Scores are ``1 - i/n`` for the i-th candidate: already best first, no work per item."""

    def __init__(self, delay_ms: float = 0.0, max_inflight: int = 0) -> None:
        self._delay_s = delay_ms / 1000.0
        self._max_inflight = max_inflight
        self._inflight = 0

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        if self._max_inflight and self._inflight >= self._max_inflight:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "echo server: too many calls in flight")
        self._inflight += 1

    async def Rank(  # noqa: N802 (gRPC method name)
        self, request: ranking_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankResponse:
        if not request.user_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id: must not be empty")
        if not request.item_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "item_ids: at least one candidate needed")
        await self._admit(context)
        try:
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            ids = request.item_ids
            if request.top_k > 0:
                ids = ids[: request.top_k]
            n = len(request.item_ids)
            items = [ranking_pb2.ScoredItem(item_id=x, score=1.0 - i / n) for i, x in enumerate(ids)]
            return ranking_pb2.RankResponse(items=items, model_version="echo", path=PATH_NAME)
        finally:
            self._inflight -= 1

    async def Recommend(  # noqa: N802 (gRPC method name)
        self, request: ranking_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankResponse:
        if not request.user_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id: must not be empty")
        await self._admit(context)
        try:
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            k = request.k or 10
            items = [ranking_pb2.ScoredItem(item_id=f"echo-{i}", score=1.0 - i / k) for i in range(k)]
            return ranking_pb2.RankResponse(items=items, model_version="echo", path=PATH_NAME)
        finally:
            self._inflight -= 1


async def create_server(
    address: str = "127.0.0.1:0", *, delay_ms: float = 0.0, max_inflight: int = 0
) -> tuple[grpc.aio.Server, int]:
    """A started echo server bound to ``address`` (port 0: any free port) and its port."""
    server = grpc.aio.server()
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(
        EchoRankingService(delay_ms=delay_ms, max_inflight=max_inflight), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"echo server: cannot bind {address}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


async def serve(host: str, port: int, delay_ms: float, max_inflight: int) -> None:
    server, bound = await create_server(f"{host}:{port}", delay_ms=delay_ms, max_inflight=max_inflight)
    print(f"listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.echo_server", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind, 0 = any free port (default: 0)")
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="sleep this long in every call (default: 0)"
    )
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=0,
        help="answer RESOURCE_EXHAUSTED above this many calls (0 = no cap)",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use the standard asyncio event loop")
    # Only trouble by default: this server runs beside measurements.
    add_log_flags(parser, top_level=True, level_default="WARNING")
    args = parser.parse_args(argv)
    configure(args.log_level, args.log_format)
    run_event_loop(serve(args.host, args.port, args.delay_ms, args.max_inflight), uvloop=not args.no_uvloop)
    return 0


def run_event_loop(coro, *, uvloop: bool = True):  # type: ignore[no-untyped-def]
    """``asyncio.run`` on uvloop when it is installed and wanted."""
    if uvloop:
        try:
            import uvloop as _uvloop
        except ImportError:
            pass
        else:
            return _uvloop.run(coro)
    return asyncio.run(coro)


if __name__ == "__main__":
    sys.exit(main())
