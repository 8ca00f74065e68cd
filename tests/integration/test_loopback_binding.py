"""The local setup listens on loopback only: the Kafka broker and Redis server of `make up`, and
the metrics endpoints, by default and when asked to (``--metrics-host 127.0.0.1``). Checked in
the kernel's own table of listening sockets (/proc/net/tcp, tcp6), not in configuration files."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

LISTEN = "0A"


def _listening(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port`` (IPv4 dotted, IPv6 as hex)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, _, port_hex = local.partition(":")
            if state != LISTEN or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(packed)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # Java listens on ::ffff:127.0.0.1
            found.add(str(ip))
    return found


def _ports() -> dict[str, int]:
    return {
        "kafka": int(os.environ.get("RECSTACK_KAFKA_PORT", "9092")),
        "redis": int(os.environ.get("RECSTACK_REDIS_PORT", "6379")),
    }


def test_kafka_and_redis_of_make_up_listen_on_loopback_only(kafka_bootstrap, redis_server, infra_control):
    running = {"kafka": infra_control.kafka_running(), "redis": infra_control.redis_running()}
    for service, port in _ports().items():
        if not running[service]:
            pytest.fail(f"{service} on port {port} was not started by `make up`; cannot check its binding")
        addresses = _listening(port)
        assert addresses == {"127.0.0.1"}, f"{service} listens on {addresses}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_metrics_endpoints_bind_where_they_are_told():
    from services.ranking.metrics import RankingMetrics
    from services.stream.metrics import StreamMetrics

    ranking, stream = _free_port(), _free_port()
    RankingMetrics().serve_http(ranking, "127.0.0.1")
    StreamMetrics().serve(stream, "127.0.0.1")
    assert _listening(ranking) == {"127.0.0.1"}
    assert _listening(stream) == {"127.0.0.1"}


def test_metrics_endpoints_bind_loopback_by_default():
    from services.ranking.metrics import RankingMetrics
    from services.stream.metrics import StreamMetrics

    ranking, stream = _free_port(), _free_port()
    RankingMetrics().serve_http(ranking)
    StreamMetrics().serve(stream)
    assert _listening(ranking) == {"127.0.0.1"}
    assert _listening(stream) == {"127.0.0.1"}
