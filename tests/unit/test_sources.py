"""Event sources: the Online Retail mapping, the OTTO sample, the synthetic storefront, downloads."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from recstack import sources
from recstack.errors import UserError
from recstack.events import COLUMNS, validate


def _valid_rows(frame, n=200):
    for row in frame.head(n).to_dict("records"):
        validate({k: v for k, v in row.items() if v is not None and v == v})


@pytest.fixture(scope="module")
def onlineretail():
    return sources.load_onlineretail()


def test_onlineretail_mapping_follows_the_data_readme(onlineretail):
    frame = onlineretail
    assert list(frame.columns) == list(COLUMNS)
    # 541,909 rows less cancellations and non-positive quantities
    assert 500_000 < len(frame) < 541_909
    assert frame["event_id"].is_unique
    assert set(frame["event_type"]) == {"purchase"}
    assert (frame["quantity"] > 0).all()
    assert frame["ts"].is_monotonic_increasing
    first = frame.iloc[0]
    assert (first.user_id, first.item_id, first.ts) == ("17850", "85123A", 1291191960000)
    guests = frame[frame["user_id"].str.startswith("guest-")]
    assert len(guests) > 100_000  # rows without CustomerID still count for item popularity
    _valid_rows(frame)


def test_onlineretail_mapping_drops_service_lines(onlineretail):
    """Postage, carriage, fees, discounts, manual adjustments, samples and gift vouchers are not
    goods: neither a shopper's purchase to learn from nor an item to recommend."""
    items = set(onlineretail["item_id"])
    service = {"POST", "DOT", "M", "m", "C2", "D", "S", "B", "BANK CHARGES", "AMAZONFEE", "CRUK"}
    assert not items & service
    assert not [i for i in items if i.startswith("gift_0001_")]
    # Codes that do not start with a digit but whose descriptions are goods stay.
    assert {"PADS", "DCGSSBOY", "DCGSSGIRL", "DCGS0004"} <= items
    # Only the service line goes: invoice 536370 (customer 12583) had 19 goods and postage.
    invoice = onlineretail[onlineretail["session_id"] == "536370"]
    assert len(invoice) == 19 and set(invoice["user_id"]) == {"12583"}


def test_otto_sample_maps_event_types():
    frame = sources.load_otto()
    assert len(frame) == 862
    assert frame["event_type"].value_counts().to_dict() == {"view": 800, "add_to_cart": 52, "purchase": 10}
    _valid_rows(frame)


def test_synthetic_is_deterministic_and_has_a_funnel():
    a = sources.synthetic(5_000, seed=3)
    b = sources.synthetic(5_000, seed=3)
    assert a.equals(b)
    counts = a["event_type"].value_counts()
    assert counts["view"] > counts["add_to_cart"] > counts["purchase"] > 0
    _valid_rows(a)


def test_event_log_jsonl_roundtrip_and_bad_line_names_file_and_field(tmp_path: Path):
    frame = sources.synthetic(100, seed=1)
    log = tmp_path / "events.jsonl"
    with log.open("w") as fh:
        for row in frame.to_dict("records"):
            fh.write(json.dumps(row) + "\n")
    back = sources.load_event_log([log])
    assert back["event_id"].tolist() == frame["event_id"].tolist()
    with log.open("a") as fh:
        fh.write(
            json.dumps({"event_id": "x", "user_id": "u", "item_id": "i", "event_type": "click", "ts": 1})
            + "\n"
        )
    with pytest.raises(UserError, match=r"events.jsonl:101: event_type"):
        sources.load_event_log([log])
    with pytest.raises(UserError, match="not found"):
        sources.load_event_log([tmp_path / "nope.jsonl"])


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass


def _serve(directory: Path):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(directory))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_checks_the_checksum(tmp_path: Path):
    served = tmp_path / "served"
    served.mkdir()
    payload = b"InvoiceNo,StockCode\n" * 100
    (served / "file.csv").write_bytes(payload)
    server = _serve(served)
    url = f"http://127.0.0.1:{server.server_address[1]}/file.csv"
    try:
        good = hashlib.sha256(payload).hexdigest()
        dest = sources.download(url, tmp_path / "cache" / "file.csv", good)
        assert dest.read_bytes() == payload
        with pytest.raises(UserError, match="SHA-256"):
            sources.download(url, tmp_path / "cache2" / "file.csv", "0" * 64)
        assert not (tmp_path / "cache2" / "file.csv").exists()
    finally:
        server.shutdown()


def test_onlineretail_is_downloaded_when_not_found_locally(tmp_path: Path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    original = sources.SHARED_DATA_DIR / sources.ONLINERETAIL_FILE
    (served / sources.ONLINERETAIL_FILE).write_bytes(original.read_bytes())
    server = _serve(served)
    try:
        monkeypatch.setattr(sources, "SHARED_DATA_DIR", tmp_path / "absent")
        monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "cache")
        monkeypatch.setenv(
            "RECSTACK_ONLINERETAIL_URL",
            f"http://127.0.0.1:{server.server_address[1]}/{sources.ONLINERETAIL_FILE}",
        )
        found = sources.find_onlineretail()
        assert found == tmp_path / "cache" / sources.ONLINERETAIL_FILE
        assert sources.sha256_of(found) == sources.ONLINERETAIL_SHA256
    finally:
        server.shutdown()


def test_missing_file_names_the_path(tmp_path: Path):
    with pytest.raises(UserError, match="nope.csv"):
        sources.find_onlineretail(tmp_path / "nope.csv")
