"""The ranking server's one configuration object: every knob, its default and why, checked at start-up.

``recstack serve`` builds it from flags (which read ``RECSTACK_*``); tests build it directly.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from recstack.kafka import KafkaSecurity

# Contract limits (docs/CONTRACT.md section 5 and section 3's id rule).
MAX_ID_LENGTH = 128
DEFAULT_MAX_CANDIDATES = 1_000
AUTH_TOKEN_ENV = "RECSTACK_AUTH_TOKEN"


@dataclass(frozen=True)
class RankingConfig:
    # --- network -------------------------------------------------------------------------------
    # Loopback unless told otherwise: a server started as shipped is not on the network. Beyond
    # loopback (0.0.0.0 in a container) it needs auth_token or TLS, or an explicit `insecure`.
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = pick a free port (tests)
    # Share the port with other server processes (SO_REUSEPORT; the kernel spreads connections).
    # Off by default so that a second server started by mistake fails instead of sharing.
    reuse_port: bool = False
    tls_cert: Path | None = None  # PEM certificate chain; TLS is on when both cert and key are given
    tls_key: Path | None = None
    # Bearer token clients must send as ``authorization: Bearer <token>``; None = auth off.
    # Kept out of repr so it never reaches a log line.
    auth_token: str | None = field(default=None, repr=False)
    # Serve beyond loopback with neither a token nor TLS: only when the operator says so, e.g.
    # behind a mesh that authenticates and encrypts, or on a private network of one's own.
    insecure: bool = False
    # Calls the server holds at once, health checks included; beyond it gRPC answers
    # RESOURCE_EXHAUSTED at once ("Concurrent RPC limit exceeded!") instead of taking the call,
    # so a flood costs the server no memory per extra call (gRPC's core itself cancels calls
    # past its own queue of calls not yet taken, 1,000-3,000 by default). The micro-batcher's
    # max_queue and the shedding below act on the calls taken; this bounds how many are taken.
    max_concurrent_rpcs: int = 1_000
    # 1,000 ids of 128 chars is ~135 KB on the wire; 1 MiB leaves room and bounds memory per call.
    max_message_bytes: int = 1 << 20
    grace_period_s: float = 5.0  # SIGTERM: in-flight calls get this long to finish
    metrics_port: int = 9464  # Prometheus HTTP; 0 disables
    # Loopback unless told otherwise, like the gRPC port: containers and pods set 0.0.0.0 so a
    # Prometheus elsewhere can scrape it (docker-compose.yml, infra/k8s).
    metrics_host: str = "127.0.0.1"

    # --- request limits ------------------------------------------------------------------------
    max_candidates: int = DEFAULT_MAX_CANDIDATES  # per Rank request, and the largest Recommend k
    default_recommend_k: int = 10  # Recommend with k = 0
    # Recommend ranks this many generated candidates (or k, when larger) and returns the top k:
    # enough head for the model to reorder, small enough to stay a cheap request.
    recommend_pool: int = 200

    # --- micro-batcher -------------------------------------------------------------------------
    # A batch is capped by its total candidates: ~40 requests of 100, which the forward pass
    # still runs in about a millisecond on one core.
    max_batch_candidates: int = 4_096
    # The longest a request waits for company, and only while another batch is already being
    # computed (an idle server dispatches at once).
    max_queue_delay_ms: float = 1.0
    # More requests waiting than this: new ones are refused at once with RESOURCE_EXHAUSTED.
    # A memory and burst guard; latency under overload is bounded by max_queue_wait_ms.
    max_queue: int = 64
    # A request that waited longer than this is shed when its batch forms: with its batch's
    # compute (~1-3 ms) and gRPC's own time on top it could not make the 10 ms p99 anyway.
    # Half of it is where the model starts to trade quality for speed (load 0.5). 0 = no limit.
    max_queue_wait_ms: float = 8.0
    # ...but only while at least this many requests are waiting: a real backlog, not a lone
    # request that met a short stall (a GC pause, a model swap) on an otherwise idle server.
    shed_min_queue: int = 8
    # Calls arriving while the event loop runs this late, with at least shed_min_queue calls in
    # flight, are refused with RESOURCE_EXHAUSTED: the backlog upstream of our queue (in gRPC and
    # the loop) that max_queue_wait_ms cannot see. Half of it already counts as load 0.5 for
    # routing. 0 = off. An idle loop runs ~0-1 ms late.
    max_loop_lag_ms: float = 5.0
    # Batches computed at once. On 2 cores one worker is best (measured: a second one halves the
    # batch size and both then fight the event loop for CPU and the GIL); with more cores a
    # second lets one batch's Redis round trip overlap another's forward pass.
    max_concurrent_batches: int = 1
    # A request that finds the server idle (no batch computing, nobody queued) is computed right
    # on the event loop: no hand-off to a worker thread and back, which on an idle machine costs
    # more than the forward pass (both threads wake from cold). Concurrent requests still batch.
    inline_when_idle: bool = True

    # --- features ------------------------------------------------------------------------------
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    # A batch never waits on Redis longer than this; past it the batch is served degraded.
    redis_timeout_ms: float = 20.0
    # While Redis is down, a background probe retries this often (the hot path never waits on it).
    redis_retry_interval_s: float = 0.5
    # Item features live in process (services.ranking.catalogue); a background thread re-reads
    # the items the stream announces as changed this often: the bound on their staleness.
    # User features are always read fresh.
    item_refresh_ms: float = 250.0
    # ...and re-reads every held item this often (repairs a change whose announcement was lost).
    item_resync_s: float = 60.0
    item_cache_max_items: int = 200_000  # bounds memory; the catalogue is cleared when it grows past this

    # --- model ---------------------------------------------------------------------------------
    models_dir: Path = Path("artifacts/models")
    model_poll_interval_s: float = 2.0
    device: str = "cpu"
    # How the int8 model runs (models.quantize.DENSE_RUNTIMES). "aoti": the version's
    # AOTInductor graph, one call per batch for every path (docs/MODEL.md, "Served form"), else
    # TorchScript graphs of every path (int8 weights dequantized at load).
    dense_runtime: str = "aoti"
    torch_threads: int = 1  # per forward pass; the other core runs the event loop and gRPC
    # Python's GIL switch interval (process-wide, set by `recstack serve`). The batch workers and
    # the event loop share the GIL; with the default 5 ms a thread that wants it back can wait
    # that long, which alone would spend half the 10 ms budget. 0 keeps Python's default.
    switch_interval_ms: float = 0.5
    # Freeze the live heap out of the garbage collector's reach once a model is loaded (see
    # services.ranking.gc_tuning): a full collection otherwise pauses serving for 60-150 ms.
    gc_freeze: bool = True
    naive: bool = False  # the contract's baseline: no batching, Feast reads, fp32, full path
    # OpenTelemetry spans of every call and batch (docs/OPERATIONS.md). Off: the call path has no
    # tracing code at all. The OTEL_* variables can turn it on or off too (tracing_wanted).
    tracing: bool = False

    # --- experiments and impressions (docs/EXPERIMENTS.md) -----------------------------------------
    # Route users by the experiment state in Redis (recstack:experiment on redis_url), polled
    # this often: a GET of one small key, parsed only when it changed.
    experiments: bool = True
    experiment_poll_interval_s: float = 1.0
    # Impressions go to Kafka only with a bootstrap; without one (the default) they are off.
    # The shadow arm's scoring may cost at most this share of the CPU the rest of the server
    # process spends (per 5 s window); past it a batch gets no shadow work (counted,
    # over_budget). Spare capacity alone would let it double the forward work of every call;
    # the hand-off to a worker comes on top of the share (docs/EXPERIMENTS.md, "Cost"): 0.1 cost
    # 10.3% of the server's CPU per call at half the SLO rate, so the default keeps to half that.
    shadow_cpu_share: float = 0.05
    kafka_bootstrap: str | None = None
    impressions_topic: str = "rank-impressions"
    # Impressions waiting for the producer; beyond it they are dropped and counted, never waited on.
    impressions_buffer: int = 10_000
    impressions_linger_ms: float = 20.0  # the sender drains the buffer and the producer batches this often
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity, repr=False)

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port < 65536:
            problems.append(f"port {self.port} is not 0-65535")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("TLS needs both a certificate and a key")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                problems.append(f"{name} {path} is not a file")
        if self.auth_token is not None and not self.auth_token.strip():
            problems.append("the auth token is empty")
        positive = (
            "max_message_bytes",
            "max_candidates",
            "default_recommend_k",
            "recommend_pool",
            "max_batch_candidates",
            "max_queue",
            "max_concurrent_batches",
            "item_cache_max_items",
            "torch_threads",
            "shed_min_queue",
            "max_concurrent_rpcs",
            "impressions_buffer",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        non_negative = (
            "grace_period_s",
            "max_queue_delay_ms",
            "max_queue_wait_ms",
            "max_loop_lag_ms",
            "redis_timeout_ms",
            "redis_retry_interval_s",
            "item_refresh_ms",
            "item_resync_s",
            "model_poll_interval_s",
            "switch_interval_ms",
            "experiment_poll_interval_s",
            "impressions_linger_ms",
            "shadow_cpu_share",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                problems.append(f"{name} must be zero or more, got {getattr(self, name)}")
        if self.max_batch_candidates < self.max_candidates:
            problems.append(
                f"max_batch_candidates ({self.max_batch_candidates}) must hold one largest request "
                f"(max_candidates {self.max_candidates})"
            )
        from models.quantize import DENSE_RUNTIMES

        if self.dense_runtime not in DENSE_RUNTIMES:
            problems.append(
                f"dense_runtime must be one of {', '.join(DENSE_RUNTIMES)}, got {self.dense_runtime!r}"
            )
        if not 0 <= self.metrics_port < 65536:
            problems.append(f"metrics_port {self.metrics_port} is not 0-65535")
        if problems:
            raise ValueError("invalid ranking configuration: " + "; ".join(problems))
        if (
            not is_loopback(self.host)
            and self.auth_token is None
            and self.tls_cert is None
            and not self.insecure
        ):
            raise ValueError(
                f"refusing to serve on {self.host}, beyond loopback, with neither a bearer token "
                f"(--auth-token-file or {AUTH_TOKEN_ENV}) nor TLS (--tls-cert and --tls-key): give "
                "one of them, or --insecure (RECSTACK_INSECURE=true) to serve without, or "
                "--host 127.0.0.1 to stay on this machine"
            )

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    def replace(self, **changes: object) -> RankingConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1, ``localhost``): nothing but this
    machine can connect. Any other name may resolve to an interface others reach."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_auth_token(token_file: str | Path | None) -> str | None:
    """The bearer token: from ``token_file`` when given, else ``RECSTACK_AUTH_TOKEN``, else None (auth off).

    A file keeps the secret out of ``ps`` and shell history; surrounding whitespace is ignored.
    """
    if token_file:
        text = Path(token_file).read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"auth token file {token_file} is empty")
        return text
    env = os.environ.get(AUTH_TOKEN_ENV, "").strip()
    return env or None


def env_flag(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip().lower()


def tracing_wanted(flag: bool, env: Mapping[str, str] | None = None) -> bool:
    """The one rule for turning tracing on: ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``
    turn it off whatever else is set; otherwise ``--tracing`` (``RECSTACK_TRACING=true``),
    ``OTEL_SDK_DISABLED=false`` or any other ``OTEL_TRACES_EXPORTER`` turn it on. Here, not in
    :mod:`services.ranking.tracing`, so that deciding needs no OpenTelemetry package."""
    env = os.environ if env is None else env
    disabled, exporter = env_flag(env, "OTEL_SDK_DISABLED"), env_flag(env, "OTEL_TRACES_EXPORTER")
    if disabled == "true" or exporter == "none":
        if flag:
            logging.getLogger("services.ranking.tracing").warning(
                "--tracing is ignored: OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none"
            )
        return False
    return flag or disabled == "false" or bool(exporter)
