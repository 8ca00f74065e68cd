"""Abuse of the ranking server over a real channel: a `recstack serve` process with a real model
and the real Redis, sent hostile bodies through a generic (serializer-free) channel call.

Every bad request gets a status the contract allows (INVALID_ARGUMENT naming the field, the
same answer local validation gives; RESOURCE_EXHAUSTED past the message size), a flood from
one client leaves another client served, and the server's memory stays bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recstack.v1 import ranking_pb2
from services.ranking.errors import InvalidArgument
from services.ranking.validation import tolerant_deserializer, validate_rank, validate_recommend

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MAX_CANDIDATES = 1_000
MAX_MESSAGE = 1 << 20  # the server's default --max-message-bytes
WAIT_S = 120.0
RANK = "/recstack.v1.RankingService/Rank"
RECOMMEND = "/recstack.v1.RankingService/Recommend"
# Grown resident memory after the flood that still counts as bounded: a leak of the flood's
# bytes (hundreds of MB of 10 MB messages) would be far above it.
RSS_GROWTH_LIMIT_MB = 150


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Server:
    def __init__(self, process: subprocess.Popen, port: int) -> None:
        self.process = process
        self.port = port
        self.target = f"127.0.0.1:{port}"

    def channel(self) -> grpc.Channel:
        # The client itself sends anything (10 MB too); the server's limits are under test.
        return grpc.insecure_channel(
            self.target,
            options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
        )


@pytest.fixture(scope="module")
def server(redis_server: str, tmp_path_factory) -> Iterator[Server]:
    from test_ranking_server import V1, publish_model

    models = tmp_path_factory.mktemp("fuzz-models")
    publish_model(models, V1, seed=1)
    port = _free_port()
    log = tmp_path_factory.mktemp("fuzz-log") / "serve.log"
    with open(log, "w") as out:
        # Database 0 is only read (unknown users and items are cold starts, served all the same).
        process = subprocess.Popen(
            [sys.executable, "-m", "recstack.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--models", str(models), "--redis", f"{redis_server}/0", "--metrics-port", "0"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ),
        )  # fmt: skip
    served = Server(process, port)
    try:
        with served.channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + WAIT_S
            while True:
                assert process.poll() is None, log.read_text()
                try:
                    status = health.Check(
                        health_pb2.HealthCheckRequest(service="recstack.v1.RankingService"), timeout=2
                    ).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "server never became SERVING"
                time.sleep(0.2)
        yield served
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


def _call(channel: grpc.Channel, method: str, body: bytes) -> tuple[grpc.StatusCode, str]:
    try:
        channel.unary_unary(method)(body, timeout=30)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def _expected(method: str, body: bytes) -> InvalidArgument | None:
    """What local validation says of this body (None: a valid request)."""
    try:
        if method == RANK:
            validate_rank(tolerant_deserializer(ranking_pb2.RankRequest.FromString)(body), MAX_CANDIDATES)
        else:
            request = tolerant_deserializer(ranking_pb2.RecommendRequest.FromString)(body)
            validate_recommend(request, MAX_CANDIDATES, 10)
    except InvalidArgument as exc:
        return exc
    return None


def _check_answer(method: str, body: bytes, code: grpc.StatusCode, details: str) -> None:
    if len(body) > MAX_MESSAGE:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        return
    expected = _expected(method, body)
    if expected is None:
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED), (code, details)
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details, str(expected))
        assert details == str(expected)


def _field(number: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


ids = st.one_of(
    st.text(min_size=0, max_size=130).map(str.encode).filter(lambda b: len(b) < 128),
    st.sampled_from([b"", b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"ok", b"x" * 127]),
)


@st.composite
def rank_bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["proto", "hand", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "proto":
        request = ranking_pb2.RankRequest(
            user_id=draw(st.text(max_size=130)),
            item_ids=draw(st.lists(st.text(max_size=130), max_size=30)),
            top_k=draw(st.integers(-(2**31), 2**31 - 1)),
        )
        return request.SerializeToString()
    parts = [
        _field(draw(st.sampled_from([1, 2, 2, 2, 9])), draw(ids)) for _ in range(draw(st.integers(0, 8)))
    ]
    return b"".join(parts)


_FUZZ = settings(suppress_health_check=list(HealthCheck), deadline=None)


@_FUZZ
@given(body=rank_bodies())
def test_fuzz_rank_over_the_wire(server, body):
    with server.channel() as channel:
        _check_answer(RANK, body, *_call(channel, RANK, body))


@_FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=100),
        st.builds(
            lambda user, k: ranking_pb2.RecommendRequest(user_id=user, k=k).SerializeToString(),
            st.text(max_size=130),
            st.integers(-(2**31), 2**31 - 1),
        ),
        st.lists(ids, max_size=3).map(lambda xs: b"".join(_field(1, x) for x in xs)),
    )
)
def test_fuzz_recommend_over_the_wire(server, body):
    with server.channel() as channel:
        _check_answer(RECOMMEND, body, *_call(channel, RECOMMEND, body))


def _rank(user: str, items: list[str], top_k: int = 0) -> bytes:
    return ranking_pb2.RankRequest(user_id=user, item_ids=items, top_k=top_k).SerializeToString()


BAD, TOO_BIG = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("body", "code", "needle"),
    [
        (_rank("u", ["x" * 1000] * 10_000), TOO_BIG, "larger than max"),  # 10 MB
        (_rank("u", [str(i) for i in range(100_000)]), BAD, "item_ids: has 100000"),
        (_rank("u", [f"{i:0128d}" for i in range(1_001)]), BAD, "item_ids: has 1001"),
        (_rank("u", ["a", "x" * 129]), BAD, "item_ids[1]: is 129 characters"),
        (_rank("u", ["a", ""]), BAD, "item_ids[1]: must not be empty"),
        (_rank("", ["a"]), BAD, "user_id: must not be empty"),
        (_rank("u" * 129, ["a"]), BAD, "user_id: is 129"),
        (_rank("u", []), BAD, "item_ids: needs at least one"),
        (_rank("u", ["a"], top_k=-1), BAD, "top_k"),
        (_field(1, b"u") + _field(2, b"ok") + _field(2, b"\xff\xfe"), BAD,
         "item_ids[1]: is not valid UTF-8"),
        (_field(1, b"\xc3\x28") + _field(2, b"a"), BAD, "user_id: is not valid UTF-8"),
        (b"\xff" * 64, BAD, "request: is not a valid RankRequest"),
    ],
)  # fmt: skip
def test_named_abuse(server, body, code, needle):
    with server.channel() as channel:
        got_code, details = _call(channel, RANK, body)
    assert got_code == code, (got_code, details)
    assert needle in details, details


def test_negative_k_and_k_past_the_limit(server):
    with server.channel() as channel:
        for k, needle in ((-1, "k: must be zero"), (MAX_CANDIDATES + 1, "k: is 1001")):
            body = ranking_pb2.RecommendRequest(user_id="u", k=k).SerializeToString()
            code, details = _call(channel, RECOMMEND, body)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, (code, details)


def test_a_flood_from_one_client_leaves_another_served_and_memory_bounded(server):
    from test_ranking_server import ITEMS

    good_body = _rank("steady-shopper", ITEMS[:20])
    flood_bodies = [
        _rank("flooder", ["x" * 1000] * 10_000),  # 10 MB: refused by size
        _rank("flooder", [f"{i:0100d}" for i in range(1_000)]),  # the largest valid request
        _rank("flooder", [str(i) for i in range(100_000)]),  # too many candidates
        b"\xff" * 1000,  # not a RankRequest
        _field(1, b"\xff") + _field(2, b"a"),  # not UTF-8
    ]
    with server.channel() as warm:  # the first calls allocate what the server keeps anyway
        for _ in range(20):
            for body in flood_bodies[1:]:
                _call(warm, RANK, body)
    rss_before = _rss_mb(server.process.pid)

    flood_codes: Counter[str] = Counter()
    good_codes: Counter[str] = Counter()
    flooding = threading.Event()
    flooding.set()
    lock = threading.Lock()

    def flood(worker: int) -> None:
        with server.channel() as channel:
            for n in range(80):
                body = flood_bodies[(n + worker) % len(flood_bodies)]
                code, details = _call(channel, RANK, body)
                _check_answer(RANK, body, code, details)
                with lock:
                    flood_codes[code.name] += 1

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(flood, w) for w in range(8)]
        with server.channel() as channel:
            while not all(f.done() for f in futures):
                code, details = _call(channel, RANK, good_body)
                good_codes[code.name] += 1
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED), (code, details)
        for future in futures:
            future.result()
    rss_after = _rss_mb(server.process.pid)

    print(
        f"\nflood: {dict(flood_codes)}; steady client during the flood: {dict(good_codes)}; "
        f"server RSS {rss_before:.0f} MB before, {rss_after:.0f} MB after"
    )
    assert sum(flood_codes.values()) == 8 * 80
    assert flood_codes["RESOURCE_EXHAUSTED"] >= 8 * 80 // len(flood_bodies)  # every 10 MB body
    assert flood_codes["INVALID_ARGUMENT"] >= 3 * 8 * 80 // len(flood_bodies) - 8
    assert good_codes["OK"] >= 1, good_codes
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB, (rss_before, rss_after)
    assert server.process.poll() is None
