"""A simulated storefront whose shoppers follow a hidden preference that the tests know.

Each user ``u`` and item ``i`` has a latent vector; the item also has an appeal of its own. The
user's utility for the item is ``appeal_i + taste_u . style_i`` plus fresh noise at every showing.
Shown a ranked list, the user looks at position ``r`` (1-based) with probability ``r**-0.8``
(position bias), views a looked-at item with probability ``sigmoid(VIEW_BIAS + utility)``, adds a
viewed item to the cart with ``sigmoid(CART_BIAS + utility)`` and buys a carted one with
``sigmoid(BUY_BIAS + utility)``. So a ranker that puts a user's high-utility items first sells more,
and how much more is known exactly.

Two ways in:

* :func:`storefront_events` (the ``synthetic-storefront`` source of ``recstack replay``): the
  history of shoppers browsing the shop (lists drawn by item appeal, not personalised), as
  contract events; what a recommender is trained on.
* :func:`simulate`: an experiment without the network. Users are split between arms by the real
  :class:`~recstack.experiments.assign.Assignment`, each impression's list comes from its arm's
  ranker (``user_id -> item ids, best first``) and the outcome from the hidden preference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import pandas as pd

from recstack.events import COLUMNS, Event
from recstack.experiments.assign import Arm, Assignment
from recstack.experiments.stats import METRICS, ArmStats, Moments

Ranker = Callable[[str], Sequence[str]]

POSITION_DECAY = 0.8  # P(look at position r) = r ** -POSITION_DECAY
VIEW_BIAS = -3.0  # a looked-at item of average utility is viewed 1 time in 20
CART_BIAS = -4.0  # a viewed item of average utility is carted 1 time in 55
BUY_BIAS = -3.0  # a carted item of average utility is bought 1 time in 20
START_MS = 1_700_000_000_000
BROWSE_LISTS = 2_000
# History events are weighted by intent when a ranker counts them.
EVENT_WEIGHT = {"view": 1.0, "add_to_cart": 3.0, "purchase": 5.0}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True, slots=True)
class StorefrontConfig:
    n_users: int = 10_000
    n_items: int = 200
    dim: int = 8  # latent dimensions of taste
    taste: float = 1.2  # standard deviation of taste . style: how much users differ
    appeal: float = 0.3  # standard deviation of an item's own appeal, shared by all users
    noise: float = 0.5  # standard deviation of the utility's noise at each showing
    list_size: int = 10
    browse_sessions: int = 30  # browsing lists per user in the history


class Storefront:
    """The hidden world of one ``seed``: users' tastes, items' styles, appeal and prices."""

    def __init__(self, config: StorefrontConfig | None = None, seed: int = 0) -> None:
        self.config = c = config or StorefrontConfig()
        self.seed = seed
        rng = np.random.default_rng([seed, 0x5702])
        taste = rng.normal(0, 1, (c.n_users, c.dim))
        style = rng.normal(0, 1, (c.n_items, c.dim))
        affinity = taste @ style.T
        self.appeal = rng.normal(0, c.appeal, c.n_items)
        # The known truth: mean utility of every (user, item).
        self.utility = self.appeal + affinity * (c.taste / affinity.std())
        self.price = np.round(rng.lognormal(2.5, 0.8, c.n_items), 2)
        self.user_ids = [f"u{u}" for u in range(c.n_users)]
        self.item_ids = [f"i{i}" for i in range(c.n_items)]
        self.item_index = {item: i for i, item in enumerate(self.item_ids)}
        self.look = np.arange(1, c.list_size + 1, dtype=np.float64) ** -POSITION_DECAY

    def outcomes(
        self, users: np.ndarray, items: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views, carts and purchases (each ``impressions x list_size`` booleans) of ``users``
        shown the lists ``items`` (item indices, best first)."""
        # Each stage is drawn only where the previous one happened: most items are never looked at.
        shape = items.shape
        looked = np.flatnonzero(rng.random(shape) < self.look[: shape[1]])
        rows = looked // shape[1]
        util = self.utility[users[rows], items.ravel()[looked]] + rng.normal(
            0, self.config.noise, len(looked)
        )
        viewed = rng.random(len(looked)) < _sigmoid(VIEW_BIAS + util)
        looked, util = looked[viewed], util[viewed]
        carted = rng.random(len(looked)) < _sigmoid(CART_BIAS + util)
        bought = rng.random(carted.sum()) < _sigmoid(BUY_BIAS + util[carted])
        view = np.zeros(shape, dtype=bool)
        cart = np.zeros(shape, dtype=bool)
        buy = np.zeros(shape, dtype=bool)
        view.ravel()[looked] = True
        cart.ravel()[looked[carted]] = True
        buy.ravel()[looked[carted][bought]] = True
        return view, cart, buy

    def history(self, seed: int | None = None) -> pd.DataFrame:
        """Every user's browsing: ``browse_sessions`` lists each, drawn by item appeal (what a
        shop's category pages show), and what the user did with them, as contract events."""
        c = self.config
        rng = np.random.default_rng([self.seed if seed is None else seed, 0xB20E])
        n = c.n_users * c.browse_sessions
        users = np.repeat(np.arange(c.n_users), c.browse_sessions)
        rng.shuffle(users)
        weights = np.exp(self.appeal)
        weights /= weights.sum()
        # A pool of browsing lists, each a weighted draw without replacement (Gumbel top-k), and
        # each session one of them: the same pages are shown to many users, as in a real shop.
        keys = np.log(weights) - np.log(-np.log(rng.random((BROWSE_LISTS, c.n_items))))
        pages = np.argsort(-keys, axis=1)[:, : c.list_size]
        items = pages[rng.integers(0, BROWSE_LISTS, n)]
        view, cart, buy = self.outcomes(users, items, rng)
        ts = START_MS + np.cumsum(rng.integers(1_000, 60_000, n))
        return _events_frame(self, f"sf{self.seed}", users, items, view, cart, buy, ts)


def storefront_events(n_events: int, seed: int = 0, config: StorefrontConfig | None = None) -> pd.DataFrame:
    """The ``synthetic-storefront`` source: at least ``n_events`` events of shoppers browsing
    (the history of as many storefront users as it takes), the first ``n_events`` by time."""
    c = config or StorefrontConfig()
    shop = Storefront(c, seed)
    frame = shop.history()
    if len(frame) < n_events:
        # About 1.1 events per browsing list: grow the number of users to reach n_events.
        scale = n_events / max(1, len(frame)) * 1.1
        c = replace(c, n_users=int(c.n_users * scale) + 1)
        frame = Storefront(c, seed).history()
    return frame.head(n_events).reset_index(drop=True)


def _events_frame(
    shop: Storefront,
    prefix: str,
    users: np.ndarray,
    items: np.ndarray,
    view: np.ndarray,
    cart: np.ndarray,
    buy: np.ndarray,
    ts: np.ndarray,
) -> pd.DataFrame:
    frames = []
    order_keys = []
    # A viewed item's view, cart and purchase follow the list's time by 2, 30 and 60 s per
    # position, so events of one list stay in position order.
    steps = (("view", view, 2_000), ("add_to_cart", cart, 30_000), ("purchase", buy, 60_000))
    for kind_no, (kind, mask, after) in enumerate(steps):
        rows, pos = np.nonzero(mask)
        item = items[rows, pos]
        order_keys.append(rows * (4 * items.shape[1]) + kind_no * items.shape[1] + pos)
        frames.append(
            pd.DataFrame(
                {
                    "event_id": [f"{prefix}-{r}-{p}-{kind}" for r, p in zip(rows, pos, strict=True)],
                    "user_id": np.asarray(shop.user_ids, dtype=object)[users[rows]],
                    "item_id": np.asarray(shop.item_ids, dtype=object)[item],
                    "event_type": kind,
                    "ts": ts[rows] + after + pos * 100,
                    "price": shop.price[item],
                    "quantity": 1,
                    "category": None,
                    "session_id": [f"{prefix}-{r}" for r in rows],
                }
            )
        )
    frame = pd.concat(frames, ignore_index=True).reindex(columns=list(COLUMNS))
    frame["ts"] = frame["ts"].astype("int64")
    # By time, then list, step and position: the same order on every run.
    order = np.lexsort((np.concatenate(order_keys), frame["ts"].to_numpy()))
    return frame.take(order).reset_index(drop=True)


# --- rankers built from history (not from the hidden truth) --------------------------------------


def _interactions(shop: Storefront, history: pd.DataFrame) -> np.ndarray:
    x = np.zeros((shop.config.n_users, shop.config.n_items))
    users = history["user_id"].str.slice(1).astype(int).to_numpy()
    items = history["item_id"].map(shop.item_index).to_numpy()
    np.add.at(x, (users, items), history["event_type"].map(EVENT_WEIGHT).to_numpy())
    return x


def popularity_ranker(shop: Storefront, history: pd.DataFrame) -> Ranker:
    """Arm B: every user gets the items most acted on in the history (intent-weighted)."""
    counts = _interactions(shop, history).sum(axis=0)
    top = [shop.item_ids[i] for i in np.argsort(-counts, kind="stable")[: shop.config.list_size]]
    return lambda user_id: top


def cooccurrence_ranker(shop: Storefront, history: pd.DataFrame) -> Ranker:
    """Arm A of the pure tests: item-to-item cosine similarity of the history's users, so a user
    gets items like those they acted on (plus a little popularity to break ties)."""
    x = _interactions(shop, history)
    norms = np.linalg.norm(x, axis=0) + 1e-9
    similarity = (x.T @ x) / np.outer(norms, norms)
    np.fill_diagonal(similarity, 0)
    popularity = x.sum(axis=0) / x.sum()
    scores = x @ similarity
    scores = scores / (scores.max(axis=1, keepdims=True) + 1e-9) + 0.1 * popularity / popularity.max()
    k = shop.config.list_size
    lists = {
        shop.user_ids[u]: [shop.item_ids[i] for i in row]
        for u, row in enumerate(np.argsort(-scores, axis=1, kind="stable")[:, :k])
    }
    return lists.__getitem__


def oracle_ranker(shop: Storefront) -> Ranker:
    """The hidden truth itself: an upper bound for tests, never a stand-in for a model."""
    k = shop.config.list_size
    order = np.argsort(-shop.utility, axis=1)[:, :k]
    lists = {shop.user_ids[u]: [shop.item_ids[i] for i in row] for u, row in enumerate(order)}
    return lists.__getitem__


# --- an experiment in process --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImpressionRecord:
    """One served list and what the user did with it."""

    request_id: str
    user_id: str
    arm: str
    items: tuple[str, ...]
    ts_ms: int
    viewed: tuple[int, ...]  # 1-based positions
    carted: tuple[int, ...]
    purchased: tuple[int, ...]
    revenue: float


@dataclass(frozen=True)
class Simulation:
    """An experiment's impressions, column-wise: ``user``/``arm`` codes, ``items`` (impressions x
    list_size item indices) and the view/cart/buy masks."""

    shop: Storefront
    arm_names: tuple[str, ...]
    user: np.ndarray
    arm: np.ndarray
    items: np.ndarray
    view: np.ndarray
    cart: np.ndarray
    buy: np.ndarray
    ts: np.ndarray
    seed: int

    def __len__(self) -> int:
        return len(self.user)

    @cached_property
    def values(self) -> dict[str, np.ndarray]:
        """Each metric's value per impression (see :mod:`recstack.experiments.stats`); the item
        acted on is one added to the cart."""
        positions = np.arange(1, self.items.shape[1] + 1)
        first = np.where(self.cart.any(axis=1), np.argmax(self.cart, axis=1), -1)
        rr = np.where(first >= 0, 1.0 / positions[np.maximum(first, 0)], 0.0)
        revenue = (self.buy * self.shop.price[self.items]).sum(axis=1)
        return {
            "add_to_cart": self.cart.any(axis=1).astype(np.float64),
            "purchase": self.buy.any(axis=1).astype(np.float64),
            "reciprocal_rank": rr,
            "revenue": revenue,
        }

    def moments(self, arm: str, metric: str, upto: int | None = None) -> Moments:
        """The arm's totals over the first ``upto`` impressions (all by default)."""
        end = len(self) if upto is None else upto
        mine = self.arm[:end] == self.arm_names.index(arm)
        return Moments.from_arrays(self.user[:end][mine], self.values[metric][:end][mine])

    def arm_stats(self) -> dict[str, ArmStats]:
        """The same totals built one impression at a time, as a streaming consumer would."""
        out = {name: ArmStats() for name in self.arm_names}
        columns = [self.values[m] for m in METRICS]
        for i in range(len(self)):
            out[self.arm_names[self.arm[i]]].add(
                self.shop.user_ids[self.user[i]],
                bool(columns[0][i]),
                bool(columns[1][i]),
                float(columns[2][i]),
                float(columns[3][i]),
            )
        return out

    def records(self) -> Iterator[ImpressionRecord]:
        shop = self.shop
        for i in range(len(self)):
            items = self.items[i]
            yield ImpressionRecord(
                request_id=f"sim{self.seed}-{i}",
                user_id=shop.user_ids[self.user[i]],
                arm=self.arm_names[self.arm[i]],
                items=tuple(shop.item_ids[j] for j in items),
                ts_ms=int(self.ts[i]),
                viewed=tuple(int(p) + 1 for p in np.flatnonzero(self.view[i])),
                carted=tuple(int(p) + 1 for p in np.flatnonzero(self.cart[i])),
                purchased=tuple(int(p) + 1 for p in np.flatnonzero(self.buy[i])),
                revenue=float(self.values["revenue"][i]),
            )

    def impression_values(
        self,
        experiment: str,
        versions: Mapping[str, str] | None = None,
        shadow: tuple[str, Ranker] | None = None,
    ) -> Iterator[bytes]:
        """The impressions as the ranking server publishes them to ``rank-impressions`` (its own
        encoder), with each arm's model version (default: the arm's name) and, given ``shadow``
        = (version, ranker), that ranker's list of every impression as a shadow's."""
        from services.ranking.impressions import impression_json

        for r in self.records():
            version = (versions or {}).get(r.arm, r.arm)
            shown: tuple = (r.request_id, r.user_id, r.arm, version, list(r.items), r.ts_ms, experiment)
            if shadow is not None:
                shown += ((shadow[0], list(shadow[1](r.user_id))[: len(r.items)]),)
            yield impression_json(shown)

    def events(self) -> Iterator[Event]:
        """The users' events in the contract's form (``session_id`` = the impression's request id)."""
        frame = _events_frame(
            self.shop, f"sim{self.seed}", self.user, self.items, self.view, self.cart, self.buy, self.ts
        )
        for row in frame.itertuples(index=False):
            yield Event(
                row.event_id,
                row.user_id,
                row.item_id,
                row.event_type,
                int(row.ts),
                float(row.price),
                1,
                None,
                row.session_id,
            )


def simulate(
    rankers: Mapping[str, Ranker],
    n_impressions: int,
    seed: int,
    shop: Storefront | None = None,
    shares: Mapping[str, float] | None = None,
    salt: str | None = None,
) -> Simulation:
    """Serve ``n_impressions`` lists to users drawn uniformly at random, each user's arm by the
    experiment's hash split (equal shares unless given), and draw what they do."""
    if not rankers:
        raise ValueError("rankers: need at least one arm")
    if n_impressions < 0:
        raise ValueError(f"n_impressions: must be >= 0, got {n_impressions}")
    shop = shop or Storefront(seed=seed)
    names = tuple(rankers)
    shares = shares or {name: 1 / len(names) for name in names}
    split = Assignment(salt or f"sim-{seed}", [Arm(n, n, shares.get(n, 0.0)) for n in names])
    arm_of_user = np.array([names.index(split.arm_for(u).name) for u in shop.user_ids])
    rng = np.random.default_rng([seed, 0x51A1])
    users = rng.integers(0, shop.config.n_users, n_impressions)
    arms = arm_of_user[users]
    k = shop.config.list_size
    items = np.empty((n_impressions, k), dtype=np.int64)
    index = shop.item_index
    serve = [rankers[n] for n in names]
    user_ids = shop.user_ids
    for i in range(n_impressions):
        shown = serve[arms[i]](user_ids[users[i]])
        if len(shown) < k:
            raise ValueError(f"ranker of arm {names[arms[i]]!r} returned {len(shown)} items, need {k}")
        items[i] = [index[item] for item in shown[:k]]
    view, cart, buy = shop.outcomes(users, items, rng)
    ts = START_MS + np.cumsum(rng.integers(50, 2_000, n_impressions))
    return Simulation(shop, names, users, arms, items, view, cart, buy, ts, seed)
