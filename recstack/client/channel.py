"""The one way the project (and a storefront backend) opens a gRPC channel to recstack.

:func:`make_channel` (sync) and :func:`make_aio_channel` (asyncio) take the same arguments:

- ``tls``: TLS towards the server; ``root_certificates`` (PEM bytes or a path) for a private CA,
  else the system's roots. ``tls_server_name`` checks the certificate for another name than the
  target's host (a server reached by IP with a certificate for its DNS name).
- ``token``: the bearer token the server's auth checks (``authorization: Bearer <token>``), sent
  with every call as gRPC call credentials. gRPC only sends call credentials over a secure
  channel; without TLS the channel uses gRPC's *local* credentials, which the library itself
  allows only to a loopback peer, so a token never crosses a network in clear. A token with a
  non-loopback target and no TLS is refused here, before any connection.
- ``retries``: a :class:`RetryPolicy` (default: :data:`DEFAULT_RETRY`), written into the
  channel's service config. Only ``UNAVAILABLE`` is retried (the server was away, restarting or
  draining; the call did no work), every attempt inside the call's one deadline. ``None`` turns
  retries off, transparent ones included: what strict callers (the chaos run, the benchmarks)
  need so that every error is counted.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

SERVICE = "recstack.v1.RankingService"
# After a failed connect the channel waits before trying again, doubling up to this bound
# (gRPC's own default is 120 s): a server back after a long outage is found within 5 s.
_MAX_RECONNECT_BACKOFF_MS = 5_000


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy for the ranking service, ``UNAVAILABLE`` only.

    gRPC waits a random time between 0 and the current backoff before each new attempt (the
    backoff starts at ``initial_backoff_s`` and grows by ``multiplier`` up to
    ``max_backoff_s``); the call's deadline ends every attempt, so retries never outlive it.
    gRPC caps ``max_attempts`` at 5.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 1.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be 2-5 (gRPC's range), got {self.max_attempts}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("initial_backoff_s must be > 0 and <= max_backoff_s")
        if self.multiplier <= 0:
            raise ValueError(f"multiplier must be > 0, got {self.multiplier}")

    def service_config(self) -> str:
        """The channel's ``grpc.service_config`` JSON."""
        return json.dumps(
            {
                "methodConfig": [
                    {
                        "name": [{"service": SERVICE}],
                        "retryPolicy": {
                            "maxAttempts": self.max_attempts,
                            "initialBackoff": f"{self.initial_backoff_s:.3f}s",
                            "maxBackoff": f"{self.max_backoff_s:.3f}s",
                            "backoffMultiplier": self.multiplier,
                            "retryableStatusCodes": ["UNAVAILABLE"],
                        },
                    }
                ]
            }
        )


DEFAULT_RETRY = RetryPolicy()
_DEFAULT = object()


def _hosts(target: str) -> list[str]:
    """The hosts of ``host:port``, ``[v6]:port``, ``dns:///host:port`` or an address list
    ``ipv4:h1:p1,h2:p2``."""
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    hosts = []
    for address in target.split(","):
        if address.startswith("["):
            hosts.append(address[1 : address.find("]")])
        else:
            hosts.append(address.rsplit(":", 1)[0] if address.count(":") == 1 else address)
    return hosts


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``. (The client stands alone: it imports nothing from
    ``services/``, so load tests and storefronts need none of the server's code.)"""
    name = host.strip("[]").lower()
    try:
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _read_pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def channel_arguments(
    target: str,
    *,
    tls: bool = False,
    root_certificates: bytes | str | Path | None = None,
    tls_server_name: str | None = None,
    token: str | None = None,
    retries: RetryPolicy | None | object = _DEFAULT,
    options: Sequence[tuple[str, Any]] = (),
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """The credentials (None: plaintext) and channel options both factories use."""
    tls = tls or root_certificates is not None
    if token is not None and not token.strip():
        raise ValueError("token is empty")
    policy = DEFAULT_RETRY if retries is _DEFAULT else retries
    opts: list[tuple[str, Any]] = [("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS)]
    if isinstance(policy, RetryPolicy):
        opts += [("grpc.enable_retries", 1), ("grpc.service_config", policy.service_config())]
    elif policy is None:
        opts.append(("grpc.enable_retries", 0))
    else:
        raise TypeError(f"retries must be a RetryPolicy or None, got {type(policy).__name__}")
    if tls_server_name:
        opts.append(("grpc.ssl_target_name_override", tls_server_name))
    opts += list(options)
    if tls:
        credentials = grpc.ssl_channel_credentials(root_certificates=_read_pem(root_certificates))
    elif token is not None:
        if not all(_is_loopback(host) for host in _hosts(target)):
            raise ValueError(
                f"a bearer token is sent only over TLS beyond loopback: give tls=True for {target!r}"
            )
        credentials = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    else:
        return None, opts
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token)
        )
    return credentials, opts


TOKEN_ENV = "RECSTACK_AUTH_TOKEN"  # the variable the server reads its token from, too
TLS_CA_ENV = "RECSTACK_TLS_CA"  # PEM of the CA (or self-signed certificate) to trust: TLS on
TLS_SERVER_NAME_ENV = "RECSTACK_TLS_SERVER_NAME"


def settings_from_env() -> dict[str, Any]:
    """``tls``, ``root_certificates``, ``tls_server_name`` and ``token`` from the environment,
    for the project's own callers (load tests, chaos run, benchmarks, demo): one shell that
    sets ``RECSTACK_AUTH_TOKEN`` for the servers it starts also gives it to their clients."""
    ca = os.environ.get(TLS_CA_ENV, "").strip()
    return {
        "tls": bool(ca),
        "root_certificates": ca or None,
        "tls_server_name": os.environ.get(TLS_SERVER_NAME_ENV, "").strip() or None,
        "token": os.environ.get(TOKEN_ENV, "").strip() or None,
    }


def make_channel(target: str, *, interceptors: Sequence[Any] = (), **kwargs: Any) -> grpc.Channel:
    """A synchronous channel to ``target`` (see the module doc for the arguments)."""
    credentials, options = channel_arguments(target, **kwargs)
    if credentials is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


def make_aio_channel(target: str, *, interceptors: Sequence[Any] = (), **kwargs: Any) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` (see the module doc for the arguments)."""
    credentials, options = channel_arguments(target, **kwargs)
    extra = {"interceptors": list(interceptors)} if interceptors else {}
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, **extra)
    return grpc.aio.secure_channel(target, credentials, options=options, **extra)
