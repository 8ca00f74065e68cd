"""Per-arm online metrics, their confidence intervals, and the decision between two arms.

Every metric is a rate per impression, ``sum of y / impressions``, where ``y`` is what one
impression earned: 1 if it led to an add-to-cart (``add_to_cart``), 1 if it led to a purchase
(``purchase``), the reciprocal rank of the best-placed item acted on or 0 (``reciprocal_rank``,
so its mean is the mean reciprocal rank), the revenue of its purchases (``revenue``).

Users, not impressions, are assigned to arms, and one user's impressions are alike; treating them
as independent understates the variance and lets an A/A test "find" differences. So variances
here are cluster-robust, with the user as the cluster (the delta method for a ratio of sums):
``Var(Y/N) = K/(K-1) * sum_u (y_u - R n_u)**2 / N**2`` over the ``K`` users of the arm. With one
impression per user it is the familiar ``p(1-p)/n``.

The decision is a mixture sequential probability ratio test (mSPRT; Robbins' normal mixture, as
used for always-valid A/B inference by Johari, Pekelis and Walsh, 2017). Its p-value stays valid
however often the report is read and whenever one stops, which a fixed-horizon z-test does not:
see docs/EXPERIMENTS.md, "How the decision is made".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

METRICS: tuple[str, ...] = ("add_to_cart", "purchase", "reciprocal_rank", "revenue")
PROPORTIONS = frozenset({"add_to_cart", "purchase"})
ALPHA = 0.01
# Mixing scale of the mSPRT, as a standardised effect (difference / per-impression standard
# deviation). Any value keeps the test valid; the test is quickest for effects near it. 0.05 is a
# small effect (Cohen's h of 0.05: a purchase rate of 5.0% against 6.1%), the size a ranking change
# is expected to make.
TAU = 0.05
# Minimum effect of interest, relative to the pooled rate: the effect that "impressions still
# needed" plans for while the measured difference is smaller.
MDE = 0.05
# Before this many impressions in each arm, no verdict: the normal approximation behind the
# test needs some mass.
MIN_IMPRESSIONS = 500
_Z = NormalDist()


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # einsum rather than BLAS: a threaded BLAS takes milliseconds to wake for a vector this short
    # on a busy machine, and the report recomputes these at every look.
    return float(np.einsum("i,i->", a, b))


@dataclass(slots=True)
class Moments:
    """Sufficient statistics of one metric in one arm, with the user as the unit of randomisation.

    ``n`` impressions, ``total`` = sum of y, ``total_sq`` = sum of y**2 over impressions; over the
    ``users``: ``user_nn`` = sum of n_u**2, ``user_yy`` = sum of y_u**2, ``user_ny`` = sum of n_u*y_u."""

    users: int = 0
    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    user_nn: float = 0.0
    user_yy: float = 0.0
    user_ny: float = 0.0

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    def residual_sq(self, rate: float) -> float:
        """sum over users of (y_u - rate * n_u)**2, never negative (rounding)."""
        return max(0.0, self.user_yy - 2 * rate * self.user_ny + rate * rate * self.user_nn)

    def variance_of_mean(self, rate: float | None = None) -> float:
        """Cluster-robust variance of :attr:`mean` (around ``rate``, default the arm's own mean)."""
        if self.users < 2 or not self.n:
            return math.inf
        rate = self.mean if rate is None else rate
        return self.users / (self.users - 1) * self.residual_sq(rate) / (self.n * self.n)

    @classmethod
    def from_arrays(cls, user: np.ndarray, value: np.ndarray) -> Moments:
        """One row per impression: ``user`` (non-negative integer codes) and the metric's ``value``."""
        value = np.asarray(value, dtype=np.float64)
        user = np.asarray(user)
        if user.dtype.kind not in "iu" or (len(user) and user.min() < 0):
            raise ValueError("user: must be non-negative integer codes")
        n_u = np.bincount(user).astype(np.float64)
        y_u = np.bincount(user, weights=value, minlength=len(n_u))
        return cls(
            users=int(np.count_nonzero(n_u)),
            n=len(value),
            total=float(value.sum()),
            total_sq=_dot(value, value),
            user_nn=_dot(n_u, n_u),
            user_yy=_dot(y_u, y_u),
            user_ny=_dot(n_u, y_u),
        )


@dataclass(slots=True)
class ArmStats:
    """Running totals of one arm, fed one impression at a time (``add``) in O(1), readable any time."""

    moments: dict[str, Moments] = field(default_factory=lambda: {m: Moments() for m in METRICS})
    # user -> [impressions, then y_u of each metric in METRICS order]
    _per_user: dict[str, list[float]] = field(default_factory=dict)
    unpriced_purchases: int = 0

    @property
    def impressions(self) -> int:
        return self.moments["purchase"].n

    @property
    def users(self) -> int:
        return len(self._per_user)

    def add(
        self,
        user_id: str,
        added_to_cart: bool,
        purchased: bool,
        reciprocal_rank: float = 0.0,
        revenue: float = 0.0,
    ) -> None:
        """One impression's outcome. ``reciprocal_rank``: 1/position (1-based) of the best-placed
        item acted on, 0 if none; ``revenue``: its purchases' value (prices that are known)."""
        totals = self._per_user.get(user_id)
        new_user = totals is None
        if totals is None:
            totals = self._per_user[user_id] = [0.0] * (1 + len(METRICS))
        n = totals[0]
        totals[0] = n + 1
        for i, (name, v) in enumerate(
            zip(METRICS, (float(added_to_cart), float(purchased), reciprocal_rank, revenue), strict=True), 1
        ):
            m = self.moments[name]
            y = totals[i]
            m.users += new_user
            m.n += 1
            m.total += v
            m.total_sq += v * v
            m.user_nn += 2 * n + 1  # (n+1)**2 - n**2
            m.user_yy += 2 * y * v + v * v  # (y+v)**2 - y**2
            m.user_ny += y + n * v + v  # (n+1)(y+v) - n*y
            totals[i] = y + v


def wilson_interval(successes: float, n: float, level: float = 1 - ALPHA) -> tuple[float, float]:
    """Wilson score interval of a proportion (``n`` may be an effective, non-integer sample size)."""
    if n <= 0:
        return (0.0, 1.0)
    z = _Z.inv_cdf(0.5 + level / 2)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True, slots=True)
class Estimate:
    """A metric of one arm: ``value`` and its ``low``-``high`` confidence interval."""

    metric: str
    value: float
    low: float
    high: float
    impressions: int
    users: int


def estimate(metric: str, m: Moments, level: float = 1 - ALPHA) -> Estimate:
    """Proportions: Wilson at the effective sample size ``p(1-p)/Var`` (the clustering shrinks it,
    never grows it past the impressions); means: normal interval with the cluster-robust variance."""
    rate = m.mean
    var = m.variance_of_mean()
    if metric in PROPORTIONS:
        n_eff = m.n if not var or math.isinf(var) else min(m.n, rate * (1 - rate) / var)
        low, high = wilson_interval(rate * n_eff, n_eff, level)
    elif math.isinf(var):
        low, high = -math.inf, math.inf
    else:
        half = _Z.inv_cdf(0.5 + level / 2) * math.sqrt(var)
        low, high = rate - half, rate + half
    return Estimate(metric, rate, low, high, m.n, m.users)


# --- the sequential test -------------------------------------------------------------------------


def _log_lr(diff: float, var: float, tau2: float) -> float:
    """log of the normal-mixture likelihood ratio for H0 (no difference) given an estimated
    ``diff`` with variance ``var``, mixing the alternative over N(0, tau2)."""
    return 0.5 * math.log(var / (var + tau2)) + tau2 * diff * diff / (2 * var * (var + tau2))


@dataclass(frozen=True, slots=True)
class Comparison:
    """Arm ``a`` against arm ``b`` on one metric at one look."""

    metric: str
    a: str
    b: str
    difference: float  # rate of a minus rate of b
    low: float  # always-valid (1 - alpha) interval of the difference
    high: float
    p_value: float  # always-valid p-value at this look (1 / likelihood ratio, at most 1)
    alpha: float
    ready: bool  # enough data in both arms for a verdict
    impressions_needed: int | None  # more impressions (both arms) to a verdict; None: no estimate

    @property
    def significant(self) -> bool:
        return self.ready and self.p_value <= self.alpha

    @property
    def winner(self) -> str | None:
        if not self.significant:
            return None
        return self.a if self.difference > 0 else self.b

    @property
    def verdict(self) -> str:
        winner = self.winner
        return f"{winner} wins" if winner else "no difference yet"


def compare(
    metric: str,
    a: Moments,
    b: Moments,
    names: tuple[str, str] = ("A", "B"),
    alpha: float = ALPHA,
    tau: float = TAU,
    mde: float = MDE,
    min_impressions: int = MIN_IMPRESSIONS,
) -> Comparison:
    """The mSPRT of "arm a's rate equals arm b's" on ``metric`` with the totals so far.

    The test statistic uses the variance under the null (both arms' residuals around the pooled
    rate, cluster-robust); the interval uses each arm's own. ``tau`` is the mixing scale as a
    standardised effect; ``mde`` the relative effect that ``impressions_needed`` plans for when the
    measured one is smaller."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: must be in (0, 1), got {alpha}")
    if not tau > 0:
        raise ValueError(f"tau: must be > 0, got {tau}")
    diff = a.mean - b.mean
    n = a.n + b.n
    pooled = (a.total + b.total) / n if n else 0.0
    ready = a.n >= min_impressions and b.n >= min_impressions and a.users >= 2 and b.users >= 2
    var0 = a.variance_of_mean(pooled) + b.variance_of_mean(pooled) if ready else math.inf
    sigma2 = (a.total_sq + b.total_sq) / n - pooled * pooled if n else 0.0
    tau2 = tau * tau * sigma2
    if not ready or var0 <= 0 or math.isinf(var0) or tau2 <= 0:
        # Nothing varies yet (e.g. no purchase at all): no evidence either way.
        return Comparison(metric, *names, diff, -math.inf, math.inf, 1.0, alpha, False, None)
    log_lr = _log_lr(diff, var0, tau2)
    p_value = min(1.0, math.exp(-log_lr))
    var = a.variance_of_mean() + b.variance_of_mean()
    if var > 0:
        half = math.sqrt(var * (var + tau2) / tau2 * (math.log((var + tau2) / var) + 2 * math.log(1 / alpha)))
    else:
        half = 0.0
    needed = None
    if p_value > alpha:
        needed = _impressions_needed(max(abs(diff), mde * abs(pooled)), var0, n, tau2, alpha)
        if needed == 0:
            # The minimum effect would already show, so the true one is smaller: plan for the
            # difference measured (None when it is exactly 0).
            needed = _impressions_needed(abs(diff), var0, n, tau2, alpha)
    return Comparison(metric, *names, diff, diff - half, diff + half, p_value, alpha, True, needed)


def _impressions_needed(effect: float, var_now: float, n_now: int, tau2: float, alpha: float) -> int | None:
    """More impressions until the likelihood ratio would reach 1/alpha if the difference measured
    were ``effect``, the variance falling as 1/impressions (the split unchanged)."""
    if effect <= 0:
        return None
    target = math.log(1 / alpha)

    def reached(total: float) -> bool:
        return _log_lr(effect, var_now * n_now / total, tau2) >= target

    high = float(n_now)
    while not reached(high):
        high *= 2
        if high > 1e15:
            return None
    low = high / 2 if high > n_now else float(n_now)
    while high - low > max(1.0, high * 1e-4):
        mid = (low + high) / 2
        low, high = (low, mid) if reached(mid) else (mid, high)
    return max(0, math.ceil(high) - n_now)


class SequentialMonitor:
    """Reads of one comparison as the experiment goes: the always-valid p-value is the smallest
    seen so far, and once a winner is declared the verdict stands (the test has stopped)."""

    def __init__(self, metric: str = "purchase", names: tuple[str, str] = ("A", "B"), **options: float):
        self.metric = metric
        self.names = names
        self.options = options
        self.p_value = 1.0
        self.decided: Comparison | None = None
        self.looks = 0

    def look(self, a: Moments, b: Moments) -> Comparison:
        self.looks += 1
        now = compare(self.metric, a, b, self.names, **self.options)  # type: ignore[arg-type]
        if self.decided is not None:
            return self.decided
        if now.ready:
            self.p_value = min(self.p_value, now.p_value)
        if now.significant:
            self.decided = now
        return now


# --- fixed-horizon reference (planning, and a cross-check of the sequential test) ---------------


def two_proportion_z_test(x_a: int, n_a: int, x_b: int, n_b: int) -> tuple[float, float]:
    """Pooled two-proportion z-test: (z, two-sided p-value), independent observations assumed."""
    pooled = (x_a + x_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 0.0, 1.0
    z = (x_a / n_a - x_b / n_b) / se
    return z, 2 * _Z.cdf(-abs(z))


def fixed_horizon_sample_size(p_base: float, p_test: float, alpha: float = ALPHA, power: float = 0.8) -> int:
    """Impressions per arm for a two-sided two-proportion z-test to detect ``p_base`` vs ``p_test``."""
    if not (0 < p_base < 1 and 0 < p_test < 1) or p_base == p_test:
        raise ValueError(f"rates must differ and lie in (0, 1), got {p_base} and {p_test}")
    za = _Z.inv_cdf(1 - alpha / 2)
    zb = _Z.inv_cdf(power)
    mean = (p_base + p_test) / 2
    root = za * math.sqrt(2 * mean * (1 - mean)) + zb * math.sqrt(
        p_base * (1 - p_base) + p_test * (1 - p_test)
    )
    return math.ceil(root * root / (p_base - p_test) ** 2)


# --- the report's numbers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    estimates: dict[str, dict[str, Estimate]]  # arm -> metric -> estimate
    comparisons: tuple[Comparison, ...]  # the decision metric first
    decision: Comparison

    def text(self) -> str:
        lines = []
        for arm, by_metric in self.estimates.items():
            first = next(iter(by_metric.values()))
            lines.append(f"{arm}: {first.impressions:,} impressions, {first.users:,} users")
            for e in by_metric.values():
                lines.append(f"  {e.metric:<16} {e.value:.5g}  [{e.low:.5g}, {e.high:.5g}]")
        for c in self.comparisons:
            if not c.ready:
                more = " (too little data for the test yet)"
            elif c.impressions_needed:
                more = f", about {c.impressions_needed:,} more impressions"
            else:
                more = ""
            lines.append(
                f"{c.metric}: {c.a} - {c.b} = {c.difference:+.5g} [{c.low:+.5g}, {c.high:+.5g}], "
                f"p = {c.p_value:.3g} -> {c.verdict}{more if not c.significant else ''}"
            )
        d = self.decision
        lines.append(f"verdict ({d.metric}, alpha {d.alpha:g}): {d.verdict}")
        return "\n".join(lines)


def report(
    arms: Mapping[str, ArmStats],
    a: str,
    b: str,
    metric: str = "purchase",
    metrics: Iterable[str] = METRICS,
    **options: float,
) -> Report:
    """Estimates of every arm and the comparison of ``a`` with ``b``; the verdict is on ``metric``
    alone (testing several metrics and taking the best would raise the false-positive rate)."""
    if metric not in METRICS:
        raise ValueError(f"metric: must be one of {', '.join(METRICS)}, got {metric!r}")
    for name in (a, b):
        if name not in arms:
            raise ValueError(f"arm {name!r}: no such arm (have {', '.join(arms) or 'none'})")
    shown = [metric] + [m for m in metrics if m != metric]
    estimates = {
        name: {m: estimate(m, stats.moments[m], 1 - options.get("alpha", ALPHA)) for m in shown}
        for name, stats in arms.items()
    }
    comparisons = tuple(
        compare(m, arms[a].moments[m], arms[b].moments[m], (a, b), **options)  # type: ignore[arg-type]
        for m in shown
    )
    return Report(estimates, comparisons, comparisons[0])
