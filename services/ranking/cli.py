"""``recstack serve``: run the ranking gRPC server (every flag also reads ``RECSTACK_<FLAG>``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from recstack.errors import UserError
from recstack.flags import add_flag, non_negative_float, positive_int, redis_url
from services.ranking.config import AUTH_TOKEN_ENV, RankingConfig, read_auth_token

_DEFAULTS = RankingConfig.__dataclass_fields__


def _default(name: str):
    return _DEFAULTS[name].default


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the newest model version over gRPC (Rank, Recommend), hot-reloading newer ones",
        description=(
            "Serve the ranking gRPC API (recstack.v1.RankingService, plus grpc.health.v1 and server "
            "reflection). Calls are micro-batched: one Redis pipeline and one forward pass per batch. "
            "Stops gracefully on SIGTERM/SIGINT. The bearer token for --auth-token-file can also come "
            f"from {AUTH_TOKEN_ENV} (never put it on the command line)."
        ),
    )
    p.set_defaults(handler=run)
    g = p.add_argument_group("network")
    add_flag(
        g, "--host", default=_default("host"), help="address to listen on; 127.0.0.1 keeps the server local"
    )
    add_flag(g, "--port", type=_port, default=_default("port"), help="gRPC port (0 = any free port)")
    add_flag(
        g,
        "--metrics-port",
        type=_port,
        default=_default("metrics_port"),
        help="Prometheus /metrics HTTP port (0 disables)",
    )
    add_flag(g, "--tls-cert", default=None, metavar="PEM", help="TLS certificate chain (with --tls-key)")
    add_flag(g, "--tls-key", default=None, metavar="PEM", help="TLS private key (with --tls-cert)")
    add_flag(
        g,
        "--auth-token-file",
        default=None,
        metavar="FILE",
        help=f"require 'authorization: Bearer <token>', the token read from FILE (or ${AUTH_TOKEN_ENV})",
    )
    add_flag(
        g,
        "--max-message-bytes",
        type=positive_int,
        default=_default("max_message_bytes"),
        help="largest request or response accepted",
    )
    add_flag(
        g,
        "--grace-period-s",
        type=non_negative_float,
        default=_default("grace_period_s"),
        help="on SIGTERM, time in-flight calls get to finish",
    )

    g = p.add_argument_group("model and features")
    add_flag(
        g,
        "--models",
        default=str(_default("models_dir")),
        metavar="DIR",
        help="model versions folder: the newest valid version is served, newer ones picked up",
    )
    add_flag(
        g,
        "--redis",
        type=redis_url,
        default=_default("redis_url"),
        metavar="URL",
        help="Redis online store (the Feast feature store)",
    )
    add_flag(g, "--device", default=_default("device"), help="torch device: cpu, or cuda where a GPU exists")
    add_flag(
        g,
        "--naive",
        type=None,
        default=False,
        help="the baseline: no batching, Feast reads per call, fp32, always the full path",
    )
    add_flag(
        g,
        "--model-poll-interval-s",
        type=non_negative_float,
        default=_default("model_poll_interval_s"),
        help="how often the models folder is checked for a newer version",
    )
    add_flag(
        g,
        "--torch-threads",
        type=positive_int,
        default=_default("torch_threads"),
        help="torch intra-op threads per forward pass",
    )

    add_flag(
        g,
        "--switch-interval-ms",
        type=non_negative_float,
        default=_default("switch_interval_ms"),
        help="Python GIL switch interval for this process (0 = Python's default, 5 ms)",
    )
    g = p.add_argument_group("micro-batching and limits")
    add_flag(
        g,
        "--max-batch-candidates",
        type=positive_int,
        default=_default("max_batch_candidates"),
        help="cap of one micro-batch, in candidates summed over its requests",
    )
    add_flag(
        g,
        "--max-queue-delay-ms",
        type=non_negative_float,
        default=_default("max_queue_delay_ms"),
        help="longest a request waits for company, only while another batch is computing",
    )
    add_flag(
        g,
        "--max-queue",
        type=positive_int,
        default=_default("max_queue"),
        help="requests waiting beyond this are refused with RESOURCE_EXHAUSTED",
    )
    add_flag(
        g,
        "--max-concurrent-batches",
        type=positive_int,
        default=_default("max_concurrent_batches"),
        help="micro-batches computed at once (worker threads)",
    )
    add_flag(
        g,
        "--max-candidates",
        type=positive_int,
        default=_default("max_candidates"),
        help="most candidates per Rank call (and largest Recommend k)",
    )
    add_flag(
        g,
        "--recommend-pool",
        type=positive_int,
        default=_default("recommend_pool"),
        help="candidates Recommend generates and ranks before returning its top k",
    )
    add_flag(
        g,
        "--item-cache-ttl-s",
        type=non_negative_float,
        default=_default("item_cache_ttl_s"),
        help="how long item features are cached in-process (user features: never)",
    )
    add_flag(
        g,
        "--redis-timeout-ms",
        type=non_negative_float,
        default=_default("redis_timeout_ms"),
        help="feature reads slower than this are abandoned and the batch served degraded",
    )
    add_flag(
        g,
        "--redis-retry-interval-s",
        type=non_negative_float,
        default=_default("redis_retry_interval_s"),
        help="while Redis is down, how often a background probe tries it",
    )


def config_from_args(args: argparse.Namespace) -> RankingConfig:
    try:
        token = read_auth_token(args.auth_token_file)
        return RankingConfig(
            host=args.host,
            port=args.port,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            auth_token=token,
            max_message_bytes=args.max_message_bytes,
            grace_period_s=args.grace_period_s,
            metrics_port=args.metrics_port,
            max_candidates=args.max_candidates,
            recommend_pool=args.recommend_pool,
            max_batch_candidates=args.max_batch_candidates,
            max_queue_delay_ms=args.max_queue_delay_ms,
            max_queue=args.max_queue,
            max_concurrent_batches=args.max_concurrent_batches,
            redis_url=args.redis,
            redis_timeout_ms=args.redis_timeout_ms,
            redis_retry_interval_s=args.redis_retry_interval_s,
            item_cache_ttl_s=args.item_cache_ttl_s,
            models_dir=Path(args.models),
            model_poll_interval_s=args.model_poll_interval_s,
            device=args.device,
            torch_threads=args.torch_threads,
            switch_interval_ms=args.switch_interval_ms,
            naive=args.naive,
        )
    except (OSError, ValueError) as exc:
        raise UserError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    import asyncio

    config = config_from_args(args)
    from services.ranking.server import serve

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
    return 0
