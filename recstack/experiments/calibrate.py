"""Measure the decision rule on the simulated storefront: how many impressions until the trained-like
ranker is named the winner over popularity, and how often an A/A experiment (one ranker in both
arms) is wrongly called, the report being read every ``--step`` impressions.

    python -m recstack.experiments.calibrate --seeds 20 --aa-seeds 500

The figures in docs/EXPERIMENTS.md come from this command.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from recstack.experiments.simulate import (
    Ranker,
    Simulation,
    Storefront,
    StorefrontConfig,
    cooccurrence_ranker,
    popularity_ranker,
    simulate,
)
from recstack.experiments.stats import ALPHA, TAU, SequentialMonitor, two_proportion_z_test


def first_decision(
    sim: Simulation,
    step: int,
    *,
    metric: str = "purchase",
    names: tuple[str, str] = ("A", "B"),
    **options: Any,
) -> tuple[int | None, str | None]:
    """Read the report every ``step`` impressions; the first (impressions, winner) it names, or
    (None, None) if it never does within the simulation."""
    monitor = SequentialMonitor(metric, names, **options)
    for upto in range(step, len(sim) + 1, step):
        c = monitor.look(sim.moments(names[0], metric, upto), sim.moments(names[1], metric, upto))
        if c.significant:
            return upto, c.winner
    return None, None


def a_vs_popularity(
    seed: int, n_impressions: int, step: int, **options: Any
) -> tuple[int | None, str | None]:
    shop = Storefront(seed=seed)
    history = shop.history()
    rankers = {"A": cooccurrence_ranker(shop, history), "B": popularity_ranker(shop, history)}
    return first_decision(simulate(rankers, n_impressions, seed, shop), step, **options)


def a_a(
    shop: Storefront, ranker: Ranker, seed: int, n_impressions: int, step: int, **options: Any
) -> tuple[bool, bool, bool]:
    """One A/A run: the same ranker in both arms, a fresh salt (split) and fresh outcomes per seed.
    Whether (the mSPRT ever called it, an impression-level z-test at alpha read at every look ever
    did, that z-test read once at the end did)."""
    sim = simulate({"A": ranker, "B": ranker}, n_impressions, seed, shop, salt=f"aa-{seed}")
    alpha = options.get("alpha", ALPHA)
    called = first_decision(sim, step, **options)[1] is not None
    z_peeking = z_end = False
    for upto in range(step, len(sim) + 1, step):
        a, b = sim.moments("A", "purchase", upto), sim.moments("B", "purchase", upto)
        p = two_proportion_z_test(round(a.total), a.n, round(b.total), b.n)[1]
        z_peeking |= p <= alpha
        z_end = p <= alpha
    return called, z_peeking, z_end


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=20, help="A-vs-popularity runs (one world each)")
    parser.add_argument("--aa-seeds", type=int, default=200, help="A/A runs")
    parser.add_argument("--impressions", type=int, default=100_000, help="impressions per run")
    parser.add_argument("--step", type=int, default=1_000, help="read the report every N impressions")
    parser.add_argument(
        "--aa-users", type=int, default=StorefrontConfig().n_users, help="users of the A/A runs' storefront"
    )
    parser.add_argument("--alpha", type=float, default=ALPHA)
    parser.add_argument("--tau", type=float, default=TAU)
    args = parser.parse_args(argv)
    options = {"alpha": args.alpha, "tau": args.tau}

    started = time.monotonic()
    found: list[int] = []
    wrong = undecided = 0
    for seed in range(args.seeds):
        n, winner = a_vs_popularity(seed, args.impressions, args.step, **options)
        if winner == "A":
            found.append(n)  # type: ignore[arg-type]
        elif winner is None:
            undecided += 1
        else:
            wrong += 1
    if args.seeds:
        print(
            f"A vs popularity, {args.seeds} worlds: A named the winner in {len(found)} "
            f"after median {statistics.median(found or [0]):,.0f}, max {max(found or [0]):,} "
            f"impressions (min {min(found or [0]):,}); popularity named in {wrong}; undecided after "
            f"{args.impressions:,}: {undecided}"
        )
    shop = Storefront(StorefrontConfig(n_users=args.aa_users), seed=0)
    ranker = cooccurrence_ranker(shop, shop.history())
    runs = [a_a(shop, ranker, seed, args.impressions, args.step, **options) for seed in range(args.aa_seeds)]
    called, z_peeking, z_end = (sum(column) for column in zip(*runs, strict=True))
    n = max(1, args.aa_seeds)
    print(
        f"A/A, {args.aa_seeds} seeds, {args.aa_users:,} users, {args.impressions:,} impressions read every "
        f"{args.step:,}: "
        f"mSPRT significant in {called} ({called / n:.2%}); alpha {args.alpha:g}, tau {args.tau:g}. "
        f"For comparison, an impression-level z-test at the same alpha: {z_peeking} ({z_peeking / n:.2%}) "
        f"read at every look, {z_end} ({z_end / n:.2%}) read once at the end; "
        f"{time.monotonic() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
