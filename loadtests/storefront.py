"""``recstack storefront``: simulated shoppers with a hidden preference, driving a real ranking server.

The shoppers are those of :mod:`recstack.experiments.simulate` (:class:`Storefront`: each user's
hidden utility for each item, position bias, view -> cart -> purchase). Here they go through the
real stack instead of an in-process ranker: each impression is one ``Rank`` call through
:class:`recstack.client.RankingClient` (a random category page of ``candidates`` items, the
answer's first ``list_size`` shown; or, with ``recommend``, one ``Recommend`` call for
``list_size`` items the server picks from its whole catalogue), the user acts on the answer
as the hidden preference says, and the events go to Kafka through
:class:`recstack.client.EventPublisher` (validated by the event contract, keyed by ``user_id``),
so the stream consumer, attribution and per-arm metrics see exactly what a storefront would send.

Each event carries ``session_id`` = the impression's own id (``<run>-<n>``) and, when the
server's answer has one, the answer's ``request_id`` (read with a fallback: servers and clients
without the field still work, and the event goes out without it).

``seed_history`` first publishes the storefront's browsing history (:meth:`Storefront.history`,
the same events as the ``synthetic-storefront`` replay source for this world), so features exist
and a model can be trained on it before the live run.
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recstack.flags import add_flag, host_port, non_negative_int, positive_int

log = logging.getLogger(__name__)

STEPS = ("view", "add_to_cart", "purchase")


@dataclass
class StorefrontResult:
    """What a run did. ``shown_utility``/``acted_utility``: mean hidden utility of the (user, item)
    pairs shown and of those viewed; ``preferred_view_rate``/``other_view_rate``: views per shown
    item among each list's better half (by the user's hidden utility) and its worse half."""

    run_id: str
    impressions: int = 0
    failed: int = 0
    with_request_id: int = 0
    carted: int = 0  # impressions with an add_to_cart
    purchased: int = 0  # impressions with a purchase
    events: Counter = field(default_factory=Counter)
    views_by_position: list[int] = field(default_factory=list)
    history_events: int = 0
    seconds: float = 0.0
    shown_utility: float = float("nan")
    acted_utility: float = float("nan")
    preferred_view_rate: float = float("nan")
    other_view_rate: float = float("nan")

    def text(self) -> str:
        rate = self.impressions / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"storefront run {self.run_id}: {self.impressions} impressions in {self.seconds:.1f} s "
            f"({rate:,.0f}/s), {self.failed} failed calls, {self.with_request_id} answers with a request_id",
            "events published: "
            + ", ".join(f"{k} {self.events[k]}" for k in STEPS)
            + (f" (after {self.history_events} history events)" if self.history_events else ""),
            f"per impression: add_to_cart {self.carted / max(self.impressions, 1):.4f}, "
            f"purchase {self.purchased / max(self.impressions, 1):.4f}",
            "views by position: " + " ".join(str(v) for v in self.views_by_position),
            f"hidden utility: {self.shown_utility:.3f} shown, {self.acted_utility:.3f} viewed; "
            f"view rate {self.preferred_view_rate:.4f} on each list's preferred half, "
            f"{self.other_view_rate:.4f} on the other",
        ]
        return "\n".join(lines)


def request_id_of(answer: Any) -> str:
    """The answer's ``request_id``, or "" where the server or the client does not have the field."""
    return str(getattr(answer, "request_id", "") or "")


def seed_history(shop: Any, publisher: Any, progress: bool = True) -> int:
    """Publish the storefront's browsing history (every user's lists, as contract events)."""
    from tqdm import tqdm

    from services.replay.publisher import frame_to_events

    frame = shop.history()
    with tqdm(
        total=len(frame), desc="history", unit="event", disable=not progress, dynamic_ncols=True
    ) as bar:
        for k, event in enumerate(frame_to_events(frame), 1):
            publisher.publish(event)
            if k % 1000 == 0:
                bar.update(1000)
        bar.update(len(frame) % 1000)
    publisher.flush()
    return len(frame)


def drive(
    shop: Any,
    rank: Callable[[str, list[str], int], Any],
    publish: Callable[[dict[str, Any]], Any],
    impressions: int,
    *,
    candidates: int = 50,
    seed: int = 0,
    run_id: str | None = None,
    progress: bool = True,
    clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
) -> StorefrontResult:
    """``impressions`` Rank calls by users drawn uniformly from ``shop``; ``rank(user, items, k)``
    returns the answer (a :class:`recstack.client.Ranking`), ``publish(event)`` sends one event
    (the contract's JSON object). Calls that fail are counted and produce no events."""
    from tqdm import tqdm

    from recstack.client import RankingError

    c = shop.config
    if not 0 < c.list_size <= candidates <= c.n_items:
        raise ValueError(f"candidates: need list size {c.list_size} <= candidates <= {c.n_items} items")
    run_id = run_id or uuid.uuid4().hex[:8]
    result = StorefrontResult(run_id=run_id, views_by_position=[0] * c.list_size)
    rng = np.random.default_rng([seed, 0x5F0E])
    index = shop.item_index
    shown_sum = acted_sum = 0.0
    n_shown = n_acted = 0
    half = c.list_size // 2
    preferred = [0, 0]  # views, shown items: each list's better half by hidden utility
    other = [0, 0]
    started = time.perf_counter()
    bar = tqdm(total=impressions, desc="storefront", unit="impr", disable=not progress, dynamic_ncols=True)
    try:
        for n in range(impressions):
            user = int(rng.integers(0, c.n_users))
            page = rng.choice(c.n_items, size=candidates, replace=False)
            user_id = shop.user_ids[user]
            try:
                answer = rank(user_id, [shop.item_ids[i] for i in page], c.list_size)
            except RankingError as exc:
                result.failed += 1
                log.debug("Rank failed for %s: %s", user_id, exc)
                bar.update(1)
                continue
            unknown = [item for item in answer.item_ids if item not in index]
            if unknown:
                raise RuntimeError(f"the server answered items this storefront does not sell: {unknown[:5]}")
            shown = np.array([[index[item] for item in answer.item_ids[: c.list_size]]], dtype=np.int64)
            if shown.shape[1] < c.list_size:
                raise RuntimeError(f"the server answered {shown.shape[1]} items for top_k {c.list_size}")
            view, cart, buy = shop.outcomes(np.array([user]), shown, rng)
            request_id = request_id_of(answer)
            result.with_request_id += bool(request_id)
            now = clock_ms()
            session = f"{run_id}-{n}"
            for pos, item in enumerate(shown[0].tolist()):
                for kind, mask in zip(STEPS, (view, cart, buy), strict=True):
                    if not mask[0, pos]:
                        continue
                    event: dict[str, Any] = {
                        "event_id": f"sf-{session}-{pos + 1}-{kind}",
                        "user_id": user_id,
                        "item_id": shop.item_ids[item],
                        "event_type": kind,
                        "ts": now,
                        "price": float(shop.price[item]),
                        "session_id": session,
                    }
                    if request_id:
                        event["request_id"] = request_id
                    publish(event)
                    result.events[kind] += 1
            result.impressions += 1
            result.carted += bool(cart.any())
            result.purchased += bool(buy.any())
            result.views_by_position = [
                a + int(b) for a, b in zip(result.views_by_position, view[0], strict=True)
            ]
            utility = shop.utility[user, shown[0]]
            shown_sum += float(utility.sum())
            n_shown += len(utility)
            acted_sum += float(utility[view[0]].sum())
            n_acted += int(view[0].sum())
            better = np.argsort(-utility, kind="stable")
            for bucket, positions in ((preferred, better[:half]), (other, better[half:])):
                bucket[0] += int(view[0, positions].sum())
                bucket[1] += len(positions)
            bar.update(1)
    finally:
        bar.close()
    result.seconds = time.perf_counter() - started
    result.shown_utility = shown_sum / n_shown if n_shown else float("nan")
    result.acted_utility = acted_sum / n_acted if n_acted else float("nan")
    result.preferred_view_rate = preferred[0] / preferred[1] if preferred[1] else float("nan")
    result.other_view_rate = other[0] / other[1] if other[1] else float("nan")
    return result


def run_storefront(
    target: str,
    bootstrap: str,
    *,
    topic: str = "user-events",
    users: int = 1_000,
    items: int = 200,
    impressions: int = 1_000,
    candidates: int = 50,
    seed: int = 0,
    history: bool = False,
    recommend: bool = False,
    progress: bool = True,
    run_id: str | None = None,
    security: Any = None,
    client_options: dict[str, Any] | None = None,
) -> StorefrontResult:
    """The world of ``seed`` with ``users`` users and ``items`` items (optionally its history
    published first), then ``impressions`` Rank calls to ``target`` (``recommend``: Recommend calls,
    the server choosing from its whole catalogue), events to ``topic``."""
    from recstack.client import EventPublisher, RankingClient, settings_from_env
    from recstack.experiments.simulate import Storefront, StorefrontConfig

    shop = Storefront(StorefrontConfig(n_users=users, n_items=items), seed)
    options = settings_from_env() if client_options is None else client_options
    with (
        EventPublisher(bootstrap, topic, security=security, client_id="recstack-storefront") as publisher,
        RankingClient(target, **options) as client,
    ):
        history_events = seed_history(shop, publisher, progress) if history else 0
        if recommend:
            ask = lambda user, page, k: client.recommend(user, k)  # noqa: E731
        else:
            ask = lambda user, page, k: client.rank(user, page, k)  # noqa: E731
        result = drive(
            shop,
            ask,
            publisher.publish,
            impressions,
            candidates=candidates,
            seed=seed,
            run_id=run_id,
            progress=progress,
        )
        publisher.flush()
    result.history_events = history_events
    return result


# --- recstack storefront -------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    from recstack.kafka import add_kafka_security_flags

    parser = subparsers.add_parser(
        "storefront",
        help="simulated shoppers with a hidden preference: Rank calls to a server, their events to Kafka",
        description=(
            "Users of the simulated storefront (recstack/experiments/simulate.py) ask the ranking server "
            "to rank a random page of --candidates items (or, with --recommend, to recommend 10), act on "
            "the first 10 of the answer as their "
            "hidden preference says (position bias, view, add_to_cart, purchase) and publish the events "
            "to --topic, carrying the answer's request_id when it has one. --history first publishes the "
            "world's browsing history so features exist. See docs/EXPERIMENTS.md."
        ),
    )
    add_flag(parser, "--target", default="127.0.0.1:50051", type=host_port, help="ranking server HOST:PORT")
    add_flag(parser, "--bootstrap", default="127.0.0.1:9092", type=host_port, help="Kafka HOST:PORT")
    add_flag(parser, "--topic", default="user-events", metavar="NAME", help="topic for the users' events")
    add_flag(parser, "--users", default=1_000, type=positive_int, help="users in the simulated world")
    add_flag(parser, "--items", default=200, type=positive_int, help="items in the simulated world")
    add_flag(parser, "--impressions", default=1_000, type=non_negative_int, help="Rank calls (impressions)")
    add_flag(parser, "--candidates", default=50, type=positive_int, help="items per page to rank")
    add_flag(
        parser, "--seed", default=0, type=non_negative_int, help="the world (and the draws) of this seed"
    )
    add_flag(
        parser,
        "--recommend",
        type=None,
        default=False,
        help="call Recommend (the server picks from its whole catalogue) instead of Rank on a page",
    )
    add_flag(parser, "--history", type=None, default=False, help="publish the world's browsing history first")
    add_flag(parser, "--run-id", metavar="ID", help="prefix of event and session ids (default: random)")
    add_flag(parser, "--no-progress", type=None, default=False, help="no progress bar")
    add_kafka_security_flags(parser)
    parser.set_defaults(handler=_storefront)


def _storefront(args: argparse.Namespace) -> int:
    from recstack.errors import UserError
    from recstack.kafka import kafka_security_from_args

    if not 10 <= args.candidates <= args.items:
        raise UserError(
            f"--candidates: need 10 <= candidates <= --items ({args.items}), got {args.candidates}"
        )
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    result = run_storefront(
        args.target,
        args.bootstrap,
        topic=args.topic,
        users=args.users,
        items=args.items,
        impressions=args.impressions,
        candidates=args.candidates,
        seed=args.seed,
        history=args.history,
        recommend=args.recommend,
        progress=not args.no_progress,
        run_id=args.run_id,
        security=kafka_security_from_args(args),
    )
    print(result.text())
    return 0 if result.impressions or not args.impressions else 1
