"""Storefront journeys for Locust: shoppers who browse, rank and leave events behind.

Each simulated shopper is a warm user of the data set. Weighted tasks read like a visit: the
home page asks ``Recommend``; a category page ranks 50-200 items of one product family; a
product page publishes a ``view`` event to Kafka and ranks a few related items, and sometimes
leads to ``add_to_cart`` and ``purchase`` events. Events are the contract's JSON with the user
id as key, so the stream consumer updates the features the next ``Rank`` reads.

Run through ``recstack loadtest`` (a separate process, so gevent patches nothing else), or
directly: ``python -m locust -f loadtests/locustfile.py --headless --host 127.0.0.1:50051
--recstack-workload workload.json``. gRPC calls are timed by a client interceptor that fires
Locust's request event; Kafka publishes are timed from send to broker acknowledgement.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import time
import uuid
from typing import Any

from locust import User, between, events, task  # first: Locust patches the standard library

# isort: split
import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent

from loadtests.workload import Workload
from recstack.client import make_channel, settings_from_env
from recstack.events import Event
from recstack.v1 import ranking_pb2, ranking_pb2_grpc

grpc_gevent.init_gevent()  # gRPC's own threads must cooperate with gevent's hub

log = logging.getLogger("recstack.locust")

HOME_K = 20
CATEGORY_CANDIDATES = (50, 200)
CATEGORY_PAGE_SIZE = 24
PRODUCT_CANDIDATES = (3, 8)
CART_PROBABILITY = 0.1  # of product views
PURCHASE_PROBABILITY = 0.3  # of carts


class _Shared:
    """What every shopper of this Locust process shares: the workload, the producer, the tallies."""

    workload: Workload | None = None
    category_of: dict[str, str] = {}
    producer: Any = None
    topic = "user-events"
    timeout_s = 1.0
    paths: collections.Counter[str] = collections.Counter()
    degraded = 0
    events_sent = 0
    events_failed = 0
    paths_out = ""


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("recstack")
    group.add_argument("--recstack-workload", default="", help="workload JSON (users, items, categories)")
    group.add_argument(
        "--recstack-source", default="onlineretail", help="data set when no workload file is given"
    )
    group.add_argument("--recstack-bootstrap", default="", help="Kafka HOST:PORT for events ('' = no events)")
    group.add_argument("--recstack-topic", default="user-events", help="Kafka topic for events")
    group.add_argument("--recstack-timeout", type=float, default=1.0, help="per-call gRPC deadline, seconds")
    group.add_argument("--recstack-wait", default="0.2,1.0", help="think time between pages: MIN,MAX seconds")
    group.add_argument("--recstack-paths-out", default="", help="write served path counts to this JSON file")


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    if options.recstack_workload:
        _Shared.workload = Workload.read(options.recstack_workload)
    else:
        from loadtests import workload

        _Shared.workload = workload.load(options.recstack_source)
    _Shared.category_of = {item: c for c, members in _Shared.workload.categories.items() for item in members}
    low, high = (float(x) for x in options.recstack_wait.split(","))
    StorefrontUser.wait_time = between(low, high)
    _Shared.topic = options.recstack_topic
    _Shared.timeout_s = options.recstack_timeout
    _Shared.paths_out = options.recstack_paths_out
    if options.recstack_bootstrap:
        _Shared.producer = _make_producer(options.recstack_bootstrap, options.recstack_topic)
    # Locust's --run-time timer starts from the event loop's cached clock, which went stale while
    # the above blocked the loop: refresh it, or the run ends early by that much.
    gevent.get_hub().loop.update_now()


def _make_producer(bootstrap: str, topic: str) -> Any:
    from kafka.errors import KafkaError

    from recstack.client import EventPublisher
    from recstack.kafka import kafka_security_from_env

    try:
        return EventPublisher(
            bootstrap, topic, security=kafka_security_from_env(), client_id="recstack-locust", linger_ms=5
        )
    except KafkaError as exc:
        log.warning("no events will be published: cannot reach Kafka at %s (%s)", bootstrap, exc)
        return None


@events.quitting.add_listener
def _on_quitting(environment: Any, **_: Any) -> None:
    if _Shared.producer is not None:
        from recstack.client import PublishError

        try:
            _Shared.producer.flush(timeout_s=10)
        except PublishError:
            pass  # each failed publish is already reported to Locust (StorefrontUser.publish)
        _Shared.producer.close(timeout_s=10)
        _Shared.producer = None
    if _Shared.paths_out:
        # One file per Locust process (``--processes`` forks several); the runner adds them up.
        stem, _dot, suffix = _Shared.paths_out.rpartition(".")
        with open(f"{stem}-{os.getpid()}.{suffix}" if stem else f"{suffix}-{os.getpid()}", "w") as fh:
            json.dump(
                {
                    "paths": dict(_Shared.paths),
                    "degraded": _Shared.degraded,
                    "events_sent": _Shared.events_sent,
                    "events_failed": _Shared.events_failed,
                },
                fh,
                indent=1,
            )


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Times every unary call and reports it to Locust as ``<Method> <page>``; counts served paths."""

    def __init__(self, environment: Any) -> None:
        self.environment = environment
        self.page = ""

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        method = client_call_details.method.rsplit("/", 1)[-1]
        started = time.perf_counter()
        call = continuation(client_call_details, request)
        response, exception = None, None
        try:
            response = call.result()
        except grpc.RpcError as exc:
            exception = exc
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        if response is not None:
            _Shared.paths[response.path or "(none)"] += 1
            _Shared.degraded += int(response.degraded)
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"{method} {self.page}".strip(),
            response_time=elapsed_ms,
            response_length=response.ByteSize() if response is not None else 0,
            exception=exception,
            context={"path": getattr(response, "path", None)},
        )
        return call


class GrpcUser(User):
    """A Locust user with a RankingService stub on its own channel, timed by :class:`LocustInterceptor`."""

    abstract = True

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.interceptor = LocustInterceptor(environment)
        # Strict (no retries): Locust counts every failed call. TLS and token from the
        # environment (RECSTACK_TLS_CA, RECSTACK_AUTH_TOKEN), as every client of the project.
        self._channel = make_channel(
            self.host, retries=None, interceptors=[self.interceptor], **settings_from_env()
        )
        self.stub = ranking_pb2_grpc.RankingServiceStub(self._channel)

    def on_stop(self) -> None:
        self._channel.close()

    def call(self, page: str, method: str, request: Any) -> ranking_pb2.RankResponse | None:
        """One timed call; a failed call is already counted by the interceptor, so it is not raised."""
        self.interceptor.page = page
        try:
            return getattr(self.stub, method)(request, timeout=_Shared.timeout_s)
        except grpc.RpcError:
            return None


class StorefrontUser(GrpcUser):
    """A warm shopper browsing the store; see the module docstring for the journey."""

    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        assert _Shared.workload is not None, "no workload loaded"
        self.workload = _Shared.workload
        self.user_id = random.choice(self.workload.users)
        self.session_id = uuid.uuid4().hex
        self.categories = sorted(self.workload.categories)
        self.seen: list[tuple[str, str]] = []  # (item, category) on the last page

    @task(3)
    def home_page(self) -> None:
        response = self.call(
            "home", "Recommend", ranking_pb2.RecommendRequest(user_id=self.user_id, k=HOME_K)
        )
        if response is not None and response.items:
            self.seen = [(x.item_id, "") for x in response.items]

    @task(4)
    def category_page(self) -> None:
        category = random.choice(self.categories)
        members = self.workload.categories[category]
        count = min(random.randint(*CATEGORY_CANDIDATES), len(members))
        candidates = random.sample(members, count)
        request = ranking_pb2.RankRequest(user_id=self.user_id, item_ids=candidates, top_k=CATEGORY_PAGE_SIZE)
        response = self.call("category", "Rank", request)
        if response is not None:
            self.seen = [(x.item_id, category) for x in response.items]

    @task(6)
    def product_page(self) -> None:
        if self.seen:
            item, category = random.choice(self.seen)
        else:
            item, category = random.choice(self.workload.items), ""
        category = category or _Shared.category_of.get(item, "")
        self.publish("view", item, category)
        pool = self.workload.categories.get(category) or self.workload.items
        related = random.sample(pool, min(random.randint(*PRODUCT_CANDIDATES), len(pool)))
        self.call("product", "Rank", ranking_pb2.RankRequest(user_id=self.user_id, item_ids=related))
        if random.random() < CART_PROBABILITY:
            self.publish("add_to_cart", item, category)
            if random.random() < PURCHASE_PROBABILITY:
                self.publish("purchase", item, category)

    def publish(self, event_type: str, item_id: str, category: str) -> None:
        producer = _Shared.producer
        if producer is None:
            return
        event = Event(
            event_id=uuid.uuid4().hex,
            user_id=self.user_id,
            item_id=item_id,
            event_type=event_type,
            ts_ms=int(time.time() * 1000),
            category=category or None,
            session_id=self.session_id,
        )
        started = time.perf_counter()
        name = f"publish {event_type}"
        fire = self.environment.events.request.fire

        def acked(_metadata: Any) -> None:
            _Shared.events_sent += 1
            fire(
                request_type="kafka",
                name=name,
                response_time=(time.perf_counter() - started) * 1000.0,
                response_length=0,
                exception=None,
            )

        def failed(exc: BaseException) -> None:
            _Shared.events_failed += 1
            fire(
                request_type="kafka",
                name=name,
                response_time=(time.perf_counter() - started) * 1000.0,
                response_length=0,
                exception=exc,
            )

        future = producer.publish(event)
        future.add_callback(acked)
        future.add_errback(failed)
