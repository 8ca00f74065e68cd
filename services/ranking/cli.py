"""``recstack serve``: run the ranking gRPC server (every flag also reads ``RECSTACK_<FLAG>``).

The flags map one to one onto :class:`~services.ranking.config.RankingConfig` fields, whose
defaults (and the reasons for them) are written once, there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recstack.credentials import add_redis_auth_flags, check_redis_auth, resolve_redis_args
from recstack.errors import UserError
from recstack.flags import add_flag, non_negative_float, positive_int, redis_url
from recstack.kafka import add_kafka_security_flags, kafka_security_from_args
from services.ranking.config import AUTH_TOKEN_ENV, RankingConfig, read_auth_token


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535, got {text}")
    return value


def _dense_runtime(text: str) -> str:
    from models.quantize import DENSE_RUNTIMES

    if text not in DENSE_RUNTIMES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DENSE_RUNTIMES)}, got {text!r}")
    return text


def _on_off(text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


# (flag, config field, type, help) per group; type None is an on/off switch.
_Flag = tuple[str, str, Callable[[str], Any] | None, str]
_GROUPS: dict[str, list[_Flag]] = {
    "network": [
        ("--host", "host", str,
         "address to listen on; beyond loopback (0.0.0.0) it needs a token or TLS, or --insecure"),
        ("--port", "port", _port, "gRPC port (0 = any free port)"),
        ("--reuse-port", "reuse_port", None,
         "share the port with other server processes (SO_REUSEPORT); --workers sets it"),
        ("--metrics-port", "metrics_port", _port, "Prometheus /metrics HTTP port (0 disables)"),
        ("--metrics-host", "metrics_host", str, "address of /metrics (0.0.0.0: every interface)"),
        ("--tls-cert", "tls_cert", str, "TLS certificate chain, PEM (with --tls-key)"),
        ("--tls-key", "tls_key", str, "TLS private key, PEM (with --tls-cert)"),
        ("--auth-token-file", "", str,
         f"require 'authorization: Bearer <token>', the token read from this file (or ${AUTH_TOKEN_ENV})"),
        ("--insecure", "insecure", None,
         "serve beyond loopback with neither a bearer token nor TLS (an explicit choice)"),
        ("--max-concurrent-rpcs", "max_concurrent_rpcs", positive_int,
         "calls held at once; beyond it new calls get RESOURCE_EXHAUSTED at once"),
        ("--max-message-bytes", "max_message_bytes", positive_int, "largest request or response accepted"),
        ("--grace-period-s", "grace_period_s", non_negative_float,
         "on SIGTERM, the time in-flight calls get to finish"),
        ("--tracing", "tracing", None,
         "OpenTelemetry spans of every call and batch stage, exported as the standard OTEL_* "
         "variables say (OTLP); OTEL_SDK_DISABLED=true turns it off (docs/OPERATIONS.md)"),
    ],
    "model and features": [
        ("--models", "models_dir", str,
         "model versions folder: the newest valid one is served, newer ones picked up"),
        ("--redis", "redis_url", redis_url, "Redis online store (the Feast feature store)"),
        ("--device", "device", str, "torch device: cpu, or cuda where a GPU exists"),
        ("--dense-runtime", "dense_runtime", _dense_runtime,
         "how the int8 model runs: aoti (the version's compiled graph, else torchscript), torchscript, "
         "fp32, torch-dynamic"),
        ("--naive", "naive", None,
         "the baseline: no batching, Feast reads per call, fp32, always the full path"),
        ("--model-poll-interval-s", "model_poll_interval_s", non_negative_float,
         "how often the models folder is checked for a newer version"),
        ("--torch-threads", "torch_threads", positive_int, "torch intra-op threads per forward pass"),
        ("--switch-interval-ms", "switch_interval_ms", non_negative_float,
         "Python GIL switch interval of this process (0 = Python's default, 5 ms)"),
    ],
    "micro-batching, shedding and limits": [
        ("--max-batch-candidates", "max_batch_candidates", positive_int,
         "cap of one micro-batch, in candidates summed over its requests"),
        ("--max-queue-delay-ms", "max_queue_delay_ms", non_negative_float,
         "longest a request waits for company, and only while another batch is computing"),
        ("--max-queue", "max_queue", positive_int,
         "with this many requests waiting, new ones get RESOURCE_EXHAUSTED"),
        ("--max-queue-wait-ms", "max_queue_wait_ms", non_negative_float,
         "requests that waited longer are shed with RESOURCE_EXHAUSTED (0 = no limit)"),
        ("--shed-min-queue", "shed_min_queue", positive_int,
         "wait-based shedding applies only with at least this many requests waiting"),
        ("--max-loop-lag-ms", "max_loop_lag_ms", non_negative_float,
         "calls arriving while the event loop runs this late get RESOURCE_EXHAUSTED (0 = off)"),
        ("--max-concurrent-batches", "max_concurrent_batches", positive_int,
         "micro-batches computed at once (worker threads)"),
        ("--max-candidates", "max_candidates", positive_int,
         "most candidates per Rank call (and the largest Recommend k)"),
        ("--recommend-pool", "recommend_pool", positive_int,
         "candidates Recommend generates and ranks before returning its top k"),
        ("--item-refresh-ms", "item_refresh_ms", non_negative_float,
         "how often changed item features are re-read into the in-process catalogue (their staleness bound)"),
        ("--item-resync-s", "item_resync_s", non_negative_float,
         "how often every item of the in-process catalogue is re-read"),
        ("--inline-when-idle", "inline_when_idle", _on_off,
         "on|off: compute a request that finds the server idle on the event loop, without a thread hand-off"),
        ("--redis-timeout-ms", "redis_timeout_ms", non_negative_float,
         "feature reads slower than this are abandoned and the batch served degraded"),
        ("--redis-retry-interval-s", "redis_retry_interval_s", non_negative_float,
         "while Redis is down, how often a background probe tries it"),
    ],
    "experiments and impressions": [
        ("--experiments", "experiments", _on_off,
         "on|off: route users by the experiment in Redis (recstack experiment start)"),
        ("--experiment-poll-interval-s", "experiment_poll_interval_s", non_negative_float,
         "how often the experiment state is read from Redis"),
        ("--shadow-cpu-share", "shadow_cpu_share", non_negative_float,
         "the shadow arm may spend at most this share of the rest of the server's CPU; past it, "
         "batches go unscored by the shadow"),
        ("--kafka-bootstrap", "kafka_bootstrap", str,
         "Kafka brokers for impressions, HOST:PORT[,HOST:PORT]; impressions are off without it"),
        ("--impressions-topic", "impressions_topic", str, "topic of one impression per served list"),
        ("--impressions-buffer", "impressions_buffer", positive_int,
         "impressions waiting for Kafka; beyond it they are dropped and counted"),
        ("--impressions-linger-ms", "impressions_linger_ms", non_negative_float,
         "how often buffered impressions are sent (and the producer's linger)"),
    ],
}  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the newest model version over gRPC (Rank, Recommend), hot-reloading newer ones",
        description=(
            "Serve the ranking gRPC API (recstack.v1.RankingService, plus grpc.health.v1 and server "
            "reflection). Calls are micro-batched: one Redis pipeline and one forward pass per batch. "
            "Stops gracefully on SIGTERM/SIGINT. Keep the bearer token off the command line: give it "
            f"in a file (--auth-token-file) or in {AUTH_TOKEN_ENV}."
        ),
    )
    p.set_defaults(handler=run)
    add_flag(
        p,
        "--workers",
        type=positive_int,
        default=1,
        help="server processes sharing the gRPC port (SO_REUSEPORT), one per core; worker i "
        "exports metrics on --metrics-port + i",
    )
    defaults = RankingConfig()
    for title, flags in _GROUPS.items():
        group = p.add_argument_group(title)
        for flag, field, kind, help_text in flags:
            default = getattr(defaults, field) if field else None
            if kind is None:
                add_flag(group, flag, type=None, default=bool(default), help=help_text)
            else:
                add_flag(group, flag, type=kind, default=None if default is None else default, help=help_text)
            if flag == "--redis":
                add_redis_auth_flags(group)
    add_kafka_security_flags(p)


def config_from_args(args: argparse.Namespace) -> RankingConfig:
    values: dict[str, Any] = {}
    for flags in _GROUPS.values():
        for flag, field, _, _ in flags:
            if field:
                values[field] = getattr(args, flag.lstrip("-").replace("-", "_"))
    for field in ("tls_cert", "tls_key", "models_dir"):
        if values[field] is not None:
            values[field] = Path(values[field])
    values["redis_url"] = resolve_redis_args(args)
    try:
        values["auth_token"] = read_auth_token(args.auth_token_file)
        values["kafka_security"] = kafka_security_from_args(args)
        return RankingConfig(**values)
    except (OSError, ValueError) as exc:
        raise UserError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    import asyncio

    config = config_from_args(args)
    check_redis_auth(config.redis_url)  # a wrong password stops here, with the setting to fix
    if args.workers > 1:
        if config.port == 0:
            raise UserError("--workers needs a fixed --port: with port 0 each worker would pick its own")
        from services.ranking.workers import run_workers

        return run_workers(args.workers, config.metrics_port)
    from services.ranking.server import serve

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
    return 0
