"""Real and synthetic event sources: where replay and training get their events.

Every source yields the contract's events (:mod:`recstack.events`) as a pandas frame with the
event-log columns (``ts`` in epoch milliseconds), sorted by time. Mapping of Online Retail
(see ``shared/data/README.md``):

* user = CustomerID; rows without one become the guest user ``guest-<InvoiceNo>`` (they still
  count for item popularity, and a guest never returns, so no user history is built from them);
* item = StockCode, event_type = ``purchase``, ts = InvoiceDate, price = UnitPrice, quantity = Quantity;
* cancellations (InvoiceNo ``C…``, negative quantity) are left out: the contract has no return event;
* service lines (postage, carriage, fees, discounts, manual adjustments, samples, gift vouchers:
  :mod:`recstack.catalogue`) are left out: they are not goods a shopper chose;
* event_id = ``or-<InvoiceNo>-<row>`` (row of the file), so replaying the file twice has no effect.

The data set has no views or carts; the synthetic source and the OTTO sample cover those.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from recstack.catalogue import is_service_line
from recstack.errors import UserError
from recstack.events import COLUMNS

log = logging.getLogger(__name__)

ONLINERETAIL_FILE = "onlineretail.csv.xz"
ONLINERETAIL_SHA256 = "99019388963fba5122c95a10524c5c70378cc223f27f33d5ea485e7e312fc22b"
OTTO_FILE = "otto-sample.jsonl"
# The shared data folder beside the checkout (``<repo>/../shared/data``), or RECSTACK_DATA_DIR.
SHARED_DATA_DIR = Path(
    os.environ.get("RECSTACK_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")
)
CACHE_DIR = Path(os.environ.get("RECSTACK_CACHE_DIR", Path.home() / ".cache" / "recstack")) / "data"
_OTTO_TYPES = {"clicks": "view", "carts": "add_to_cart", "orders": "purchase"}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch ``url`` into ``dest`` atomically, refusing it unless its SHA-256 is ``sha256``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    log.info("downloading %s -> %s", url, dest)
    with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
        while block := response.read(1 << 20):
            out.write(block)
    got = sha256_of(partial)
    if got != sha256:
        partial.unlink(missing_ok=True)
        raise UserError(f"download of {url} has SHA-256 {got}, expected {sha256}; file refused")
    partial.replace(dest)
    return dest


def find_onlineretail(path: str | Path | None = None) -> Path:
    """The Online Retail file: ``path`` if given, else the shared data folder, else the cache,
    else a download (``RECSTACK_ONLINERETAIL_URL``, checked against ``RECSTACK_ONLINERETAIL_SHA256``)."""
    if path is not None:
        found = Path(path)
        if not found.is_file():
            raise UserError(f"Online Retail file not found: {found}")
        return found
    for candidate in (SHARED_DATA_DIR / ONLINERETAIL_FILE, CACHE_DIR / ONLINERETAIL_FILE):
        if candidate.is_file():
            return candidate
    url = os.environ.get("RECSTACK_ONLINERETAIL_URL")
    if not url:
        raise UserError(
            f"Online Retail not found in {SHARED_DATA_DIR} or {CACHE_DIR}; give its path, or set "
            "RECSTACK_ONLINERETAIL_URL to a copy of onlineretail.csv.xz to download it"
        )
    sha = os.environ.get("RECSTACK_ONLINERETAIL_SHA256", ONLINERETAIL_SHA256)
    return download(url, CACHE_DIR / ONLINERETAIL_FILE, sha)


def load_onlineretail(path: str | Path | None = None) -> pd.DataFrame:
    """Online Retail as contract events (purchases), sorted by time; see the module docstring."""
    src = find_onlineretail(path)
    raw = pd.read_csv(
        src,
        dtype={"InvoiceNo": str, "StockCode": str, "CustomerID": str, "Description": str, "Country": str},
        keep_default_na=False,
        na_values={"CustomerID": [""]},
    )
    raw["row"] = np.arange(len(raw))
    raw["StockCode"] = raw["StockCode"].str.strip()
    keep = ~raw["InvoiceNo"].str.startswith("C") & (raw["Quantity"] > 0) & (raw["UnitPrice"] >= 0)
    keep &= ~raw["StockCode"].map(is_service_line).astype(bool)
    raw = raw[keep]
    customer = raw["CustomerID"].str.removesuffix(".0")
    frame = pd.DataFrame(
        {
            "event_id": "or-" + raw["InvoiceNo"] + "-" + raw["row"].astype(str),
            "user_id": customer.where(customer.notna(), "guest-" + raw["InvoiceNo"]),
            "item_id": raw["StockCode"],
            "event_type": "purchase",
            "ts": pd.to_datetime(raw["InvoiceDate"], utc=True).astype("int64") // 1_000_000,
            "price": raw["UnitPrice"].astype(float),
            "quantity": raw["Quantity"].astype("int64"),
            "category": None,
            "session_id": raw["InvoiceNo"],
        }
    )
    return _finish(frame)


def load_otto(path: str | Path | None = None) -> pd.DataFrame:
    """The OTTO sample (sessions of clicks, carts, orders) as contract events."""
    src = Path(path) if path else SHARED_DATA_DIR / OTTO_FILE
    if not src.is_file():
        raise UserError(f"OTTO sample not found: {src}")
    rows = []
    with src.open() as fh:
        for line in fh:
            if not line.strip():
                continue
            session = json.loads(line)
            sid = str(session["session"])
            for i, ev in enumerate(session["events"]):
                rows.append(
                    {
                        "event_id": f"otto-{sid}-{i}",
                        "user_id": f"otto-{sid}",
                        "item_id": str(ev["aid"]),
                        "event_type": _OTTO_TYPES[ev["type"]],
                        "ts": int(ev["ts"]),
                        "price": None,
                        "quantity": 1,
                        "category": None,
                        "session_id": sid,
                    }
                )
    return _finish(pd.DataFrame(rows, columns=list(COLUMNS)))


def synthetic(
    n_events: int,
    n_users: int = 2_000,
    n_items: int = 1_000,
    n_categories: int = 20,
    seed: int = 0,
    start_ms: int = 1_700_000_000_000,
    zipf_a: float = 1.1,
) -> pd.DataFrame:
    """A storefront: sessions of views with Zipf-like item popularity and a view -> cart -> purchase
    funnel (about 10% of views lead to a cart, 30% of carts to a purchase). Users lean to a few
    favourite categories, so there is signal for a recommender to find."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, n_items + 1, dtype=np.float64)
    popularity = ranks**-zipf_a
    popularity /= popularity.sum()
    item_category = rng.integers(0, n_categories, size=n_items)
    item_price = np.round(rng.lognormal(mean=2.5, sigma=0.8, size=n_items), 2)
    user_taste = rng.integers(0, n_categories, size=(n_users, 2))
    by_category = [np.flatnonzero(item_category == c) for c in range(n_categories)]
    rows: list[tuple] = []
    ts = start_ms
    session_no = 0
    while len(rows) < n_events:
        user = int(rng.integers(0, n_users))
        session_no += 1
        for _ in range(int(rng.integers(1, 12))):
            if rng.random() < 0.6:
                pool = by_category[int(user_taste[user, int(rng.integers(0, 2))])]
                weights = popularity[pool] / popularity[pool].sum()
                item = int(rng.choice(pool, p=weights))
            else:
                item = int(rng.choice(n_items, p=popularity))
            ts += int(rng.integers(50, 5_000))
            for event_type, p in (("view", 1.0), ("add_to_cart", 0.1), ("purchase", 0.3)):
                if rng.random() >= p:
                    break
                rows.append((user, item, event_type, ts, session_no))
                ts += int(rng.integers(100, 2_000))
    rows = rows[:n_events]
    users, items, types, stamps, sessions = map(np.asarray, zip(*rows, strict=True))
    frame = pd.DataFrame(
        {
            "event_id": [f"syn-{seed}-{i}" for i in range(len(rows))],
            "user_id": [f"u{u}" for u in users],
            "item_id": [f"i{i}" for i in items],
            "event_type": types,
            "ts": stamps.astype("int64"),
            "price": item_price[items],
            "quantity": 1,
            "category": [f"c{c}" for c in item_category[items]],
            "session_id": [f"s{s}" for s in sessions],
        }
    )
    return _finish(frame)


def load_event_log(paths: list[str | Path]) -> pd.DataFrame:
    """JSON Lines or Parquet event logs (files or folders of them) -> one frame, sorted by time.

    Rows are validated against the contract; a broken row is an error naming the file, line and field.
    """
    from recstack.events import InvalidEvent, validate

    files: list[Path] = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            files.extend(sorted(x for x in p.rglob("*") if x.suffix in (".parquet", ".jsonl", ".json")))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"event log not found: {p}")
    if not files:
        raise UserError(f"no .parquet or .jsonl event logs under {', '.join(map(str, paths))}")
    frames = []
    for f in files:
        if f.suffix == ".parquet":
            frame = pd.read_parquet(f)
            missing = {"event_id", "user_id", "item_id", "event_type", "ts"} - set(frame.columns)
            if missing:
                raise UserError(f"{f}: event log lacks column(s) {', '.join(sorted(missing))}")
            frames.append(frame.reindex(columns=list(COLUMNS)))
            continue
        rows = []
        with f.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    event = validate(json.loads(line))
                except (InvalidEvent, ValueError) as exc:
                    raise UserError(f"{f}:{lineno}: {exc}") from None
                d = event.to_json_dict()
                d.setdefault("quantity", event.quantity)
                rows.append(d)
        frames.append(pd.DataFrame(rows, columns=list(COLUMNS)))
    frame = pd.concat(frames, ignore_index=True)
    if frame["ts"].dtype == object:  # RFC 3339 strings in a Parquet log
        frame["ts"] = pd.to_datetime(frame["ts"], utc=True).astype("int64") // 1_000_000
    return _finish(frame)


def load_source(source: str, limit: int | None = None, seed: int = 0) -> pd.DataFrame:
    """``onlineretail`` | ``otto`` | ``synthetic`` | ``synthetic-storefront`` | a path to an event log."""
    if source == "onlineretail":
        frame = load_onlineretail()
    elif source == "otto":
        frame = load_otto()
    elif source == "synthetic":
        frame = synthetic(limit or 100_000, seed=seed)
    elif source == "synthetic-storefront":  # shoppers with a hidden preference: docs/EXPERIMENTS.md
        from recstack.experiments.simulate import storefront_events

        frame = storefront_events(limit or 100_000, seed=seed)
    else:
        frame = load_event_log([source])
    return frame.head(limit) if limit else frame


def _finish(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.reindex(columns=list(COLUMNS))
    frame["ts"] = frame["ts"].astype("int64")
    frame["quantity"] = frame["quantity"].fillna(1).astype("int64")
    return frame.sort_values("ts", kind="stable").reset_index(drop=True)
