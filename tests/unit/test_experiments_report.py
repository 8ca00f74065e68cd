"""``recstack experiment report``'s pure parts: the join into per-impression outcomes, the per-user
aggregation (cluster-robust), the comparison with the consumer's totals, the verdict on simulated
A/B and A/A data, the plot, and the errors. Kafka and Redis:
tests/integration/test_experiments_report_kafka.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from recstack.errors import UserError
from recstack.events import Event
from recstack.experiments import report as R
from recstack.experiments.simulate import Storefront, cooccurrence_ranker, popularity_ranker, simulate
from recstack.experiments.stats import Moments
from services.attribution.rule import offline_join

T = 1_700_000_000_000
MIN = 60_000
WINDOW = 30 * MIN


def imp(rid, user, items, ts, arm, experiment="hand", shadow=None):
    # Positions 0-based, as services/attribution/rule.py reads them (1 / (position + 1)).
    value = {"request_id": rid, "user_id": user, "experiment": experiment, "arm": arm, "model_version": "v"}
    value |= {"ts": ts, "items": [{"item_id": it, "position": k} for k, it in enumerate(items, 1)]}
    if shadow:
        value["shadow"] = {
            "version": "s1",
            "items": [{"item_id": it, "position": k} for k, it in enumerate(shadow, 1)],
        }
    return json.dumps(value).encode()


def ev(eid, user, item, kind, ts, request_id=None, price=None):
    return Event(
        eid, user, item, kind, ts, price=price, quantity=2 if price else 1, request_id=request_id
    ).to_json_bytes()


def hand_case():
    """Impressions and events whose per-impression outcomes are worked out by hand below."""
    imps = [
        imp("r1", "h1", ["a", "b", "c"], T, "A", shadow=["c", "a", "b"]),
        imp("r2", "h1", ["b", "d"], T + MIN, "A"),
        imp("r3", "h2", ["a"], T, "A"),
        imp("r4", "h3", ["x", "y"], T, "B"),
        imp("r5", "h4", ["y"], T, "B"),
        imp("r6", "h5", ["a"], T, "A", experiment="other"),
        b"{not an impression",
    ]
    events = [
        ev("e1", "h1", "b", "add_to_cart", T + 5 * MIN),  # latest impression holding b: r2, position 0
        ev("e2", "h1", "b", "purchase", T + 6 * MIN, price=10.0),  # r2, revenue 2 x 10
        ev("e3", "h1", "c", "add_to_cart", T + 2 * MIN, request_id="r1"),  # r1 by id: 1/3; shadow: 1
        ev("e4", "h2", "a", "view", T + MIN),  # r3: a view, neither cart nor purchase
        ev("e5", "h3", "y", "add_to_cart", T + 40 * MIN),  # outside the window
        ev("e6", "h3", "y", "purchase", T + 10 * MIN),  # r4, no price: no revenue
        ev("e7", "h4", "y", "add_to_cart", T + MIN),  # r5, position 0
        ev("e8", "h4", "y", "add_to_cart", T + 2 * MIN),  # r5 again: still one carting impression
        b'{"event_id": 1}',
    ]
    return [(0, k, v) for k, v in enumerate(imps)], [(0, k, v) for k, v in enumerate(events)]


def test_join_gives_the_hand_computed_outcomes_and_the_offline_join_counters():
    imps, events = hand_case()
    joined = R.join(imps, events, WINDOW)
    got = {i.request_id: o for i, o in zip(joined.impressions, joined.outcomes, strict=True)}
    # Reciprocal ranks in the rule's millionths: 1/3 is 0.333333.
    assert got["r1"] == R.Outcome(True, False, 0.333333, 0, shadow_rr=1.0, live_rr=0.333333)
    assert got["r2"] == R.Outcome(True, True, 1.0, 20_000_000)
    assert got["r3"] == R.Outcome()
    assert got["r4"] == R.Outcome(False, True, 0.0, 0)
    assert got["r5"] == R.Outcome(True, False, 1.0, 0)
    assert (joined.events, joined.attributed) == (8, 7)
    # The same rule, the same counters as the attribution consumer's offline join.
    assert joined.metrics == offline_join(imps, events, WINDOW)
    assert joined.metrics["hand"]["B"]["totals"]["add_to_cart"] == 2  # counted per event there


def test_per_user_aggregation_is_cluster_robust():
    joined = R.join(*hand_case(), WINDOW)
    arms = R.arm_stats(joined, "hand")
    assert set(arms) == {"A", "B"}  # "other" is another experiment
    a = arms["A"]
    assert (a.impressions, a.users) == (3, 2)
    # h1: 2 impressions, 1 purchase; h2: 1 impression, none.
    p = a.moments["purchase"]
    assert (p.n, p.users, p.total, p.user_nn, p.user_yy, p.user_ny) == (3, 2, 1.0, 5.0, 1.0, 2.0)
    assert p == Moments.from_arrays(np.array([0, 0, 1]), np.array([0.0, 1.0, 0.0]))
    assert a.moments["reciprocal_rank"].mean == pytest.approx((0.333333 + 1 + 0) / 3)
    assert a.moments["revenue"].mean == pytest.approx(20 / 3)
    assert a.moments["add_to_cart"].mean == pytest.approx(2 / 3)
    b = arms["B"]
    assert (b.impressions, b.users, b.moments["purchase"].mean, b.moments["add_to_cart"].mean) == (
        2,
        2,
        0.5,
        0.5,
    )
    # The variance is per user: h1's two impressions are one cluster, not two observations.
    r = p.mean
    assert p.variance_of_mean() == pytest.approx(2 / 1 * ((1 - 2 * r) ** 2 + (0 - r) ** 2) / 9)


def test_shadow_mrr_against_the_live_lists_on_the_same_impressions():
    (s,) = R.shadow_figures(R.join(*hand_case(), WINDOW), "hand")
    assert (s.version, s.impressions, s.shadow_mrr, s.live_mrr) == ("s1", 1, 1.0, pytest.approx(1 / 3))
    assert s.difference == pytest.approx(2 / 3)


def test_consumer_totals_that_differ_are_flagged():
    joined = R.join(*hand_case(), WINDOW)
    same = json.loads(json.dumps(joined.metrics))  # a copy
    assert R.compare_totals(joined.metrics, same, "hand") == []
    behind = json.loads(json.dumps(joined.metrics))
    behind["hand"]["B"]["totals"]["purchase"] = 0
    assert R.compare_totals(joined.metrics, behind, "hand") == [("B", "purchase", 1, 0)]
    rep = R.build(joined, "hand", consumer=behind)
    text = rep.text()
    assert "DIFFERENT in 1 counters" in text and "B purchase: offline 1, consumer 0" in text
    assert "every counter agrees" in R.build(joined, "hand", consumer=same).text()


def test_errors_name_the_bad_argument():
    joined = R.join(*hand_case(), WINDOW)
    with pytest.raises(
        UserError, match=r"--experiment 'nope': no impressions of it .*hand \(5\), other \(1\)"
    ):
        R.build(joined, "nope")
    with pytest.raises(UserError, match="no impressions yet"):
        R.build(R.join([], [], WINDOW), "hand")
    with pytest.raises(UserError, match="--metric 'ctr'"):
        R.build(joined, "hand", metric="ctr")
    with pytest.raises(UserError, match="one arm only"):
        R.build(joined, "other")


def _records(sim, experiment):
    imps = [(0, k, v) for k, v in enumerate(sim.impression_values(experiment))]
    return imps, [(0, k, e.to_json_bytes()) for k, e in enumerate(sim.events())]


@pytest.fixture(scope="module")
def world():
    shop = Storefront(seed=0)
    history = shop.history()
    return shop, cooccurrence_ranker(shop, history), popularity_ranker(shop, history)


def test_verdict_names_the_better_arm_and_the_plot_is_written(world, tmp_path):
    shop, trained, popular = world
    sim = simulate({"B": popular, "A": trained}, 8_000, 0, shop)
    rep = R.build(R.join(*_records(sim, "ab"), WINDOW), "ab", arm_order=("A", "B"))
    assert rep.pair == ("A", "B") and rep.verdict == "A wins"
    # Join and simulation agree on what happened (events credited by item to the latest list).
    assert rep.arms["A"].moments["purchase"].mean == pytest.approx(
        sim.values["purchase"][sim.arm == 1].mean(), abs=0.01
    )
    path = R.plot(rep, "purchase", tmp_path / "p" / "purchase.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = R.series(rep.joined, "ab", rep.pair, "purchase")
    assert data["p"][-1] <= 0.01 and all(
        x >= y for x, y in zip(data["p"], data["p"][1:], strict=False)
    )  # never rises
    assert all(
        lo <= r <= hi
        for lo, r, hi in zip(data["A"]["low"], data["A"]["rate"], data["A"]["high"], strict=True)
    )


def test_a_a_says_no_difference_yet(world):
    shop, trained, _ = world
    rep = R.build(
        R.join(*_records(simulate({"A": trained, "B": trained}, 8_000, 5, shop), "aa"), WINDOW), "aa"
    )
    assert rep.verdict.startswith("no difference yet — about ")
    assert rep.verdict.endswith(" more impressions needed")
    assert not math.isinf(rep.stats.decision.p_value) and rep.stats.decision.p_value > 0.01


def test_progress_is_shown_for_large_topics_only():
    import io

    out = io.StringIO()
    meter = R.Progress("rank-impressions", 120_000, out, every_s=0.0)
    meter.advance(30_000)
    meter.finish()
    assert out.getvalue().splitlines()[0] == "reading rank-impressions: 30,000 / 120,000 records (25%)"
    small = io.StringIO()
    meter = R.Progress("user-events", 1_000, small, every_s=0.0)
    meter.advance(1_000)
    meter.finish()
    assert small.getvalue() == ""
