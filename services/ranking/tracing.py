"""Optional OpenTelemetry tracing of Rank and Recommend (docs/OPERATIONS.md, "Tracing").

Off by default. :func:`services.ranking.config.tracing_wanted` states the rule once:
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off whatever else is set;
otherwise ``--tracing``
(``RECSTACK_TRACING=true``), ``OTEL_SDK_DISABLED=false`` or any other ``OTEL_TRACES_EXPORTER``
turn it on. Where spans go is set only by the standard ``OTEL_*`` variables, read by the
OpenTelemetry SDK itself: ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``/``HEADERS``/``PROTOCOL``
(grpc, the default, or http/protobuf), ``OTEL_SERVICE_NAME`` (default ``recstack-ranking``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_BSP_*``; incoming calls
join their caller's trace through ``OTEL_PROPAGATORS`` (W3C ``traceparent`` by default).

The spans, for one call:

* ``recstack.v1.RankingService/Rank`` (or ``/Recommend``), kind SERVER: the whole call, with
  ``rpc.*`` attributes and the gRPC status;
* ``ranking.queue_wait``, its child: from entering the micro-batcher's queue to its batch's start;
* ``ranking.batch``: the batch that computed it, with its stages as children:
  ``ranking.fetch``, ``ranking.candidates`` (Recommend), ``ranking.assemble``, ``ranking.forward``,
  ``ranking.encode``.

A batch serves many calls, so it has one parent and links: the batch span is a child of its
oldest call (that call's trace shows the whole breakdown), carries a link to every call it
served, and every other call's span carries a link back to the batch.

When tracing is off nothing here is imported by the server and no span object exists: the
call boundary is the untraced function, chosen once at start-up, and the batcher and engine
pay one ``is not None`` test per call or batch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from services.ranking.config import env_flag as _flag

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "recstack-ranking"
TRACER_NAME = "recstack.ranking"


def _exporter_from_env(env: Mapping[str, str]) -> Any:
    """The span exporter the standard variables name: OTLP over gRPC (default) or HTTP, or the
    console (for a look without a collector). Endpoint, headers, TLS, timeout and compression
    are read by the exporter itself from OTEL_EXPORTER_OTLP_*."""
    kind = _flag(env, "OTEL_TRACES_EXPORTER") or "otlp"
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER: expected otlp, console or none, got {kind!r}")
    protocol = _flag(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _flag(env, "OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol in ("", "grpc"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: expected grpc or http/protobuf, got {protocol!r}")


def _wall_ns(perf: float, now_perf: float, now_wall_ns: int) -> int:
    """A perf_counter (or loop.time) reading as the epoch nanoseconds spans are stamped with."""
    return now_wall_ns - int((now_perf - perf) * 1e9)


class RankTracing:
    """The ranking server's spans. Built with a tracer provider (tests pass one that keeps spans
    in memory); :meth:`from_env` builds the one the ``OTEL_*`` variables describe."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(TRACER_NAME)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RankTracing:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        env = os.environ if env is None else env
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER
        # Spans are exported from a background thread in batches (OTEL_BSP_*), off the call path.
        provider.add_span_processor(BatchSpanProcessor(_exporter_from_env(env)))
        log.info(
            "tracing on: %s spans of service %s",
            _flag(env, "OTEL_TRACES_EXPORTER") or "otlp",
            resource.attributes.get(SERVICE_NAME),
        )
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is buffered, then stop the exporter."""
        self.provider.shutdown()

    # --- the call ------------------------------------------------------------------------------
    @contextmanager
    def call(self, service: str, method: str, request: Any, context: Any) -> Iterator[Any]:
        """The call's span, current while the call runs (the batcher finds it there)."""
        carrier = {key: value for key, value in (context.invocation_metadata() or ()) if type(value) is str}
        attributes: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        item_ids = getattr(request, "item_ids", None)
        if item_ids is not None:
            attributes["recstack.candidates"] = len(item_ids)
        k = getattr(request, "k", None)
        if k is None:
            k = getattr(request, "top_k", None)
        if k is not None:
            attributes["recstack.top_k"] = int(k)
        with self.tracer.start_as_current_span(
            f"{service}/{method}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            finally:
                code = context.code()
                # grpc.aio gives the StatusCode, or its int (an abort before any answer).
                value = code.value[0] if hasattr(code, "value") else code
                value = 0 if value is None else int(value)
                span.set_attribute("rpc.grpc.status_code", value)
                if value != 0:
                    details = context.details()
                    if isinstance(details, bytes):
                        details = details.decode("utf-8", "replace")
                    span.set_status(Status(StatusCode.ERROR, str(details or "")))

    @staticmethod
    def current_span() -> Any:
        """The calling task's span, for the batcher to link its batch to."""
        return trace.get_current_span()

    # --- the batch -----------------------------------------------------------------------------
    @contextmanager
    def batch(
        self,
        call_spans: Sequence[Any],
        enqueued: Sequence[float],
        now: float,
        *,
        candidates: int,
        load: float,
        inline: bool,
    ) -> Iterator[Any]:
        """The batch's span around its computation, current in the calling context meanwhile.

        ``enqueued`` are the calls' queue-entry times on the clock ``now`` reads (the event
        loop's); each call gets its queue wait as a child span. The batch is a child of the
        oldest call and links to all of them; every other call links back to it."""
        wall_now = time.time_ns()
        for span, entered in zip(call_spans, enqueued, strict=True):
            if span.get_span_context().is_valid:
                self.tracer.start_span(
                    "ranking.queue_wait",
                    context=trace.set_span_in_context(span),
                    start_time=_wall_ns(entered, now, wall_now),
                ).end(end_time=wall_now)
        with self.tracer.start_as_current_span(
            "ranking.batch",
            context=trace.set_span_in_context(call_spans[0]),
            links=[Link(s.get_span_context()) for s in call_spans if s.get_span_context().is_valid],
            attributes={
                "recstack.batch.requests": len(call_spans),
                "recstack.batch.candidates": candidates,
                "recstack.batch.load": load,
                "recstack.batch.inline": inline,
            },
        ) as batch:
            batch_context = batch.get_span_context()
            for span in call_spans[1:]:
                if span.is_recording():
                    span.add_link(batch_context)
            yield batch

    # --- the batch's stages (in the thread that computed it) -----------------------------------
    def stages(self, marks: Sequence[tuple[str, float, float, dict[str, Any]]]) -> None:
        """``marks``: (stage, start, end, attributes), perf_counter times, as child spans of the
        current span (the batch's)."""
        now_perf, wall_now = time.perf_counter(), time.time_ns()
        tracer = self.tracer
        for name, start, end, attributes in marks:
            tracer.start_span(
                f"ranking.{name}", start_time=_wall_ns(start, now_perf, wall_now), attributes=attributes
            ).end(end_time=_wall_ns(end, now_perf, wall_now))
