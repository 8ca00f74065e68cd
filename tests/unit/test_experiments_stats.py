"""Online metrics and the decision: textbook values, the cluster-robust variance, the mSPRT."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recstack.experiments.stats import (
    METRICS,
    ArmStats,
    Moments,
    SequentialMonitor,
    compare,
    estimate,
    fixed_horizon_sample_size,
    report,
    two_proportion_z_test,
    wilson_interval,
)


def binary(successes: int, n: int) -> Moments:
    """``n`` users with one impression each, ``successes`` of them converting."""
    return Moments(
        users=n, n=n, total=successes, total_sq=successes, user_nn=n, user_yy=successes, user_ny=successes
    )


@pytest.mark.parametrize(
    ("x", "n", "low", "high"),
    # Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (Wilson score, 95%).
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_matches_newcombe(x, n, low, high):
    got = wilson_interval(x, n, level=0.95)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_fixed_horizon_sample_size_matches_the_textbook():
    # Fleiss' formula without continuity correction: 10% vs 15%, alpha 0.05, power 0.8 -> 686 per group.
    assert fixed_horizon_sample_size(0.10, 0.15, alpha=0.05, power=0.8) == 686
    assert fixed_horizon_sample_size(0.10, 0.15, alpha=0.01, power=0.8) > 686
    with pytest.raises(ValueError, match="rates must differ"):
        fixed_horizon_sample_size(0.1, 0.1)


def test_two_proportion_z_test_by_hand():
    # 52% of 1000 vs 48% of 1000: pooled 0.5, se = sqrt(0.25 * 0.002) = 0.02236, z = 1.7889
    z, p = two_proportion_z_test(520, 1000, 480, 1000)
    assert z == pytest.approx(1.78885, abs=1e-5)
    assert p == pytest.approx(0.07364, abs=1e-5)


def test_streaming_totals_equal_the_batch_totals():
    rng = np.random.default_rng(3)
    users = rng.integers(0, 50, 2_000)
    cart = rng.random(2_000) < 0.2
    buy = cart & (rng.random(2_000) < 0.5)
    rr = np.where(cart, 1 / rng.integers(1, 11, 2_000), 0.0)
    revenue = np.where(buy, rng.lognormal(2, 1, 2_000), 0.0)
    stats = ArmStats()
    for i in range(2_000):
        stats.add(f"u{users[i]}", bool(cart[i]), bool(buy[i]), float(rr[i]), float(revenue[i]))
    assert stats.impressions == 2_000 and stats.users == len(set(users))
    for metric, values in zip(METRICS, (cart, buy, rr, revenue), strict=True):
        batch = Moments.from_arrays(users, values)
        streamed = stats.moments[metric]
        for name in ("users", "n", "total", "total_sq", "user_nn", "user_yy", "user_ny"):
            assert getattr(streamed, name) == pytest.approx(getattr(batch, name), rel=1e-9), (metric, name)


def test_variance_with_one_impression_per_user_is_the_binomial_one():
    m = binary(30, 200)
    p = 0.15
    assert m.variance_of_mean() == pytest.approx(p * (1 - p) / 200 * 200 / 199)


def test_variance_grows_when_a_users_impressions_are_alike():
    # 100 users, 10 impressions each; half the users always buy, half never: 50% either way, but
    # there are really only 100 independent units, not 1000.
    users = np.repeat(np.arange(100), 10)
    alike = Moments.from_arrays(users, np.repeat(np.arange(100) % 2, 10).astype(float))
    mixed = Moments.from_arrays(users, (np.arange(1_000) % 2).astype(float))
    assert alike.mean == mixed.mean == 0.5
    assert alike.variance_of_mean() == pytest.approx(0.25 / 100 * 100 / 99)
    assert mixed.variance_of_mean() == pytest.approx(0.0)
    # Wilson at the effective sample size: the clustered arm's interval is as wide as 100 users'.
    wide = estimate("purchase", alike, level=0.95)
    assert (wide.low, wide.high) == pytest.approx(wilson_interval(0.5 * 99, 99, 0.95))


def test_mean_metric_interval_is_normal_with_the_sample_variance():
    values = np.array([0.0, 1.0, 0.5, 0.25, 0.0, 1 / 3])
    m = Moments.from_arrays(np.arange(6), values)
    e = estimate("reciprocal_rank", m, level=0.95)
    half = 1.959964 * values.std(ddof=1) / math.sqrt(6)
    assert (e.value, e.low, e.high) == pytest.approx(
        (values.mean(), values.mean() - half, values.mean() + half)
    )


def test_msprt_likelihood_ratio_by_hand():
    # 1,000 users per arm, one impression each, 12% vs 9%.
    a, b = binary(120, 1_000), binary(90, 1_000)
    tau = 0.05
    c = compare("purchase", a, b, tau=tau)
    pooled = 210 / 2_000
    # Residuals around the pooled rate, each arm K/(K-1) * sum / N^2 (written out independently).
    var0 = sum(1_000 / 999 * (x * (1 - pooled) ** 2 + (1_000 - x) * pooled**2) / 1_000**2 for x in (120, 90))
    tau2 = tau**2 * pooled * (1 - pooled)
    log_lr = 0.5 * math.log(var0 / (var0 + tau2)) + tau2 * 0.03**2 / (2 * var0 * (var0 + tau2))
    assert c.difference == pytest.approx(0.03)
    assert c.p_value == pytest.approx(min(1, math.exp(-log_lr)))
    # The always-valid p-value is larger than the fixed-horizon one for the same data: the price of
    # being allowed to look at any time.
    assert c.p_value > two_proportion_z_test(120, 1_000, 90, 1_000)[1]
    assert c.low < 0.03 < c.high


def test_verdicts_name_the_winner_or_say_no_difference_yet():
    big_a = compare("purchase", binary(1_300, 10_000), binary(1_000, 10_000), ("new", "popularity"))
    assert big_a.significant and big_a.winner == "new" and big_a.verdict == "new wins"
    assert big_a.impressions_needed is None
    assert big_a.low > 0
    big_b = compare("purchase", binary(1_000, 10_000), binary(1_300, 10_000), ("new", "popularity"))
    assert big_b.verdict == "popularity wins" and big_b.high < 0
    small = compare("purchase", binary(105, 1_000), binary(100, 1_000))
    assert small.verdict == "no difference yet" and small.winner is None
    assert small.impressions_needed and small.impressions_needed > 0


def test_no_verdict_before_the_minimum_impressions():
    c = compare("purchase", binary(200, 400), binary(0, 400))
    assert not c.ready and c.verdict == "no difference yet" and c.p_value == 1.0
    assert compare("purchase", binary(200, 400), binary(0, 400), min_impressions=100).verdict == "A wins"


def test_no_verdict_while_nothing_varies():
    c = compare("purchase", binary(0, 5_000), binary(0, 5_000))
    assert not c.ready and c.verdict == "no difference yet"


def test_impressions_needed_is_where_the_same_rates_would_decide():
    # 11% vs 10% on 5,000 each: not yet. With the estimated number more at the same rates, it is.
    now = compare("purchase", binary(550, 5_000), binary(500, 5_000))
    assert not now.significant
    more = now.impressions_needed
    assert more is not None
    per_arm = 5_000 + more // 2
    then = compare("purchase", binary(round(0.11 * per_arm), per_arm), binary(round(0.10 * per_arm), per_arm))
    assert then.significant
    short = int(5_000 + 0.8 * more / 2)
    assert not compare(
        "purchase", binary(round(0.11 * short), short), binary(round(0.10 * short), short)
    ).significant


def test_impressions_needed_plans_for_the_minimum_effect_when_the_measured_one_is_smaller():
    same = compare("purchase", binary(500, 5_000), binary(500, 5_000), mde=0.05)
    bigger_mde = compare("purchase", binary(500, 5_000), binary(500, 5_000), mde=0.10)
    assert same.impressions_needed > bigger_mde.impressions_needed > 0


def test_monitor_keeps_the_smallest_p_value_and_the_decision():
    monitor = SequentialMonitor("purchase", ("A", "B"))
    first = monitor.look(binary(1_300, 10_000), binary(1_000, 10_000))
    assert first.significant
    later = monitor.look(binary(1_300, 20_000), binary(1_300, 20_000))  # the difference vanished
    assert later is first and monitor.decided is first and monitor.looks == 2


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="alpha: must be in"):
        compare("purchase", binary(1, 10), binary(1, 10), alpha=0)
    with pytest.raises(ValueError, match="tau: must be > 0"):
        compare("purchase", binary(1, 10), binary(1, 10), tau=0)
    with pytest.raises(ValueError, match="user: must be non-negative integer codes"):
        Moments.from_arrays(np.array([-1, 0]), np.array([1.0, 0.0]))


def test_report_gives_every_arm_and_the_verdict_on_the_chosen_metric():
    rng = np.random.default_rng(0)
    arms = {"A": ArmStats(), "B": ArmStats()}
    for i in range(20_000):
        name = "A" if i % 2 else "B"
        buy = rng.random() < (0.14 if name == "A" else 0.10)
        arms[name].add(f"{name}{i % 3_000}", buy or rng.random() < 0.05, buy, 1.0 if buy else 0.0, 20.0 * buy)
    out = report(arms, "A", "B", metric="purchase")
    assert out.decision.metric == "purchase" and out.decision.verdict == "A wins"
    assert set(out.estimates) == {"A", "B"} and set(out.estimates["A"]) == set(METRICS)
    text = out.text()
    assert "verdict (purchase, alpha 0.01): A wins" in text
    with pytest.raises(ValueError, match="arm 'C': no such arm"):
        report(arms, "A", "C")
    with pytest.raises(ValueError, match="metric: must be one of"):
        report(arms, "A", "B", metric="clicks")


def test_impressions_needed_is_never_zero_while_undecided():
    # 10.2% vs 10% on 200,000 each: a 5% minimum effect (0.5 points) would already show, so the
    # plan falls back to the 0.2 points measured.
    c = compare("purchase", binary(20_400, 200_000), binary(20_000, 200_000), mde=0.05)
    assert not c.significant
    assert c.impressions_needed and c.impressions_needed > 100_000
    assert compare("purchase", binary(20_000, 200_000), binary(20_000, 200_000)).impressions_needed is None


def test_report_says_when_there_is_too_little_data():
    arms = {"A": ArmStats(), "B": ArmStats()}
    arms["A"].add("u1", True, True, 1.0, 10.0)
    text = report(arms, "A", "B").text()
    assert (
        "purchase: A - B = +1 [-inf, +inf], p = 1 -> no difference yet (too little data for the test yet)"
        in text
    )
