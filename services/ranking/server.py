"""The gRPC edge of the ranking service: servicer, boundary interceptor and the server's lifecycle.

``create_server(config)`` builds a server bound to ``config.address`` (port 0 picks a free one,
as tests do) with ``RankingService``, the standard ``grpc.health.v1`` service and server
reflection; ``await server.start()`` starts it and its background work (model watcher, Redis
probe, micro-batcher); ``await server.stop(grace)`` stops accepting calls, lets in-flight ones
finish, then stops the rest. ``serve(config)`` runs one until SIGTERM or SIGINT.

Every RankingService call crosses one boundary (:func:`service_handlers`, wrapped around each
method once at start-up): it times the call and turns the service's typed errors
(:mod:`services.ranking.errors`) into their gRPC status. Methods raise; nothing else maps
exceptions to codes. With a token configured, an interceptor (:class:`_Auth`) checks the bearer
token first; without one no interceptor runs on the call path.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recstack.errors import UserError
from recstack.v1 import ranking_pb2, ranking_pb2_grpc
from services.ranking.backend import BatchedBackend
from services.ranking.config import RankingConfig, tracing_wanted
from services.ranking.errors import RankingError, Unauthenticated
from services.ranking.gc_tuning import GcPauseRecorder, freeze_heap
from services.ranking.metrics import RankingMetrics
from services.ranking.naive import NaiveBackend
from services.ranking.validation import tolerant_deserializer, validate_rank, validate_recommend

if TYPE_CHECKING:
    from services.ranking.tracing import RankTracing

log = logging.getLogger(__name__)

SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name
_SERVICE_PREFIX = f"/{SERVICE_NAME}/"
# Load balancers probe health without credentials; everything else needs the token when auth is on.
_AUTH_EXEMPT = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Validates a call, hands it to the backend (batched or naive) and returns its response."""

    def __init__(self, backend: BatchedBackend | NaiveBackend, config: RankingConfig) -> None:
        self._backend = backend
        self._max_candidates = config.max_candidates
        self._default_k = config.default_recommend_k

    async def Rank(self, request: ranking_pb2.RankRequest, context: grpc.aio.ServicerContext):
        query = validate_rank(request, self._max_candidates)
        return await self._backend.serve(query, context.time_remaining())

    async def Recommend(self, request: ranking_pb2.RecommendRequest, context: grpc.aio.ServicerContext):
        query = validate_recommend(request, self._max_candidates, self._default_k)
        return await self._backend.serve(query, context.time_remaining())


def service_handlers(
    servicer: RankingServicer, metrics: RankingMetrics, tracing: RankTracing | None = None
) -> dict[str, grpc.RpcMethodHandler]:
    """RankingService's method handlers, each wrapped once, at start-up, in the call boundary:
    timing, and the one translation of typed errors into gRPC statuses. Wrapping the handlers
    rather than intercepting every call keeps a per-call interceptor hop off the hot path. With
    tracing on, the call's span goes around that boundary; with it off the wrapper is not there."""
    service = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_type = getattr(ranking_pb2, method.input_type.name)
        response_type = getattr(ranking_pb2, method.output_type.name)
        call = _bounded(method.name, getattr(servicer, method.name), metrics)
        if tracing is not None:
            call = _traced(method.name, call, tracing)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            call,
            # Bytes protobuf cannot parse become INVALID_ARGUMENT naming the field, not UNKNOWN.
            request_deserializer=tolerant_deserializer(request_type.FromString),
            response_serializer=_serializer(response_type),
        )
    return handlers


def _serializer(response_type: Any) -> Callable[[Any], bytes]:
    """Responses the batched backend already wrote in wire format pass through as they are."""
    serialize = response_type.SerializeToString

    def serializer(response: Any) -> bytes:
        return response if type(response) is bytes else serialize(response)

    return serializer


def _bounded(name: str, inner: Callable[[Any, Any], Awaitable[Any]], metrics: RankingMetrics):
    latency = metrics.latency
    ok = latency.labels(name, "OK")

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        try:
            response = await inner(request, context)
        except RankingError as exc:
            latency.labels(name, exc.code.name).observe(time.perf_counter() - start)
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            latency.labels(name, "CANCELLED").observe(time.perf_counter() - start)
            raise
        except Exception:
            log.exception("%s failed", name)
            latency.labels(name, "INTERNAL").observe(time.perf_counter() - start)
            await context.abort(grpc.StatusCode.INTERNAL, f"{name} failed; see the server log")
        ok.observe(time.perf_counter() - start)
        return response

    return call


def _traced(name: str, inner: Callable[[Any, Any], Awaitable[Any]], tracing: RankTracing):
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with tracing.call(SERVICE_NAME, name, request, context):
            return await inner(request, context)

    return call


class _Auth(grpc.aio.ServerInterceptor):
    """The bearer-token check, installed only when a token is configured: every method but the
    health check needs ``authorization: Bearer <token>``."""

    def __init__(self, auth_token: str) -> None:
        self._expected = f"Bearer {auth_token}".encode()
        self._refusals: dict[str, grpc.RpcMethodHandler] = {}

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method in _AUTH_EXEMPT:
            return True
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or self._authorized(details):
            return handler
        return self._refusal(details.method, handler)

    def _refusal(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        refusal = self._refusals.get(method)
        if refusal is not None:
            return refusal
        message = Unauthenticated("missing or wrong bearer token (metadata 'authorization: Bearer <token>')")

        async def refuse(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(message.code, message.message)

        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        refusal = self._refusals[method] = kind(
            refuse,
            request_deserializer=tolerant_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        return refusal


class RankingServer:
    """A grpc.aio server with the ranking service and everything it runs in the background."""

    def __init__(
        self, config: RankingConfig, metrics: RankingMetrics | None = None, tracing: RankTracing | None = None
    ) -> None:
        """``tracing``: the spans' destination (tests pass one); None builds it from the ``OTEL_*``
        variables when :func:`~services.ranking.config.tracing_wanted` says so."""
        self.config = config
        self.metrics = metrics or RankingMetrics()
        if tracing is None:
            tracing = _tracing_from_env(config.tracing)
        self.tracing = tracing
        self.backend: BatchedBackend | NaiveBackend = (
            NaiveBackend(config, self.metrics)
            if config.naive
            else BatchedBackend(config, self.metrics, tracing=tracing)
        )
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Without reuse_port a second server on the same port must fail, not share it.
            ("grpc.so_reuseport", 1 if config.reuse_port else 0),
        ]
        self.grpc = grpc.aio.server(
            interceptors=[_Auth(config.auth_token)] if config.auth_token is not None else None,
            options=options,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        handlers = service_handlers(RankingServicer(self.backend, config), self.metrics, tracing)
        self.grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self.grpc.add_registered_method_handlers(SERVICE_NAME, handlers)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        if config.tls_cert is not None and config.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())]
            )
            self.port = self.grpc.add_secure_port(config.address, credentials)
        else:
            self.port = self.grpc.add_insecure_port(config.address)
        if self.port == 0:
            raise OSError(f"cannot bind the ranking server to {config.address}")
        self._stopped = asyncio.Event()
        self._gc_pauses = GcPauseRecorder(self.metrics.gc_pause)
        self._serving = False  # the gRPC port is open

    async def start(self) -> None:
        self._gc_pauses.install()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.backend.start(on_model=self._model_loaded)
        await self.grpc.start()
        self._serving = True
        log.info(
            "ranking server on %s (port %d)%s%s%s",
            self.config.host,
            self.port,
            ", naive baseline" if self.config.naive else "",
            ", TLS" if self.config.tls_cert else "",
            ", auth on" if self.config.auth_token else "",
        )

    def _model_loaded(self, ranker: Any) -> None:
        if self.config.gc_freeze:
            # A model loaded before the port opens (only the first can be): a full collection
            # costs no call then.
            freeze_heap(collect_first=not self._serving)
        asyncio.get_running_loop().create_task(
            self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let in-flight ones finish (up to ``grace`` seconds), stop the rest."""
        if self._stopped.is_set():
            return
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(self.config.grace_period_s if grace is None else grace)
        await self.backend.stop()
        if self.tracing is not None:
            self.tracing.shutdown()  # export the spans still buffered
        self._gc_pauses.uninstall()
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


def _tracing_from_env(flag: bool) -> RankTracing | None:
    if not tracing_wanted(flag):
        return None
    try:
        from services.ranking.tracing import RankTracing
    except ImportError as exc:
        raise UserError(
            f"tracing is on but OpenTelemetry is not installed ({exc.name}): pip install 'recstack[tracing]'"
        ) from None
    try:
        return RankTracing.from_env()
    except ValueError as exc:
        raise UserError(str(exc)) from None


async def create_server(
    config: RankingConfig, metrics: RankingMetrics | None = None, tracing: RankTracing | None = None
) -> tuple[RankingServer, int]:
    """A ranking server bound to ``config.address`` but not started; returns it and its port."""
    server = RankingServer(config, metrics, tracing)
    return server, server.port


async def serve(config: RankingConfig) -> None:
    """Run a ranking server until SIGTERM/SIGINT, then shut down gracefully."""
    if config.switch_interval_ms > 0:
        sys.setswitchinterval(config.switch_interval_ms / 1000.0)
    server, _ = await create_server(config)
    if config.metrics_port:
        server.metrics.serve_http(config.metrics_port, config.metrics_host)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing in-flight calls (grace %.1f s)", config.grace_period_s)
    await server.stop()
    log.info("ranking server stopped")
