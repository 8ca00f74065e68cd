"""What experiments cost a batch: the ranking engine's CPU per call with and without them, in process.

A shared machine's load makes ``recstack bench``'s latency figures noise; the CPU a batch costs
its worker thread (``time.thread_time``) moves far less. This runs the server's own
:class:`~services.ranking.engine.BatchEngine` on batches of ``--requests`` Rank calls of
``--candidates`` candidates (warm users; features from an in-memory stub instead of Redis, so the
figure is the engine's own work) for these variants, interleaved round-robin so the machine's
load hits them alike:

* ``before``: the engine and wire encoder of a git revision (``--before``, default the commit
  before the experiments work), loaded from ``git show`` into a private package;
* ``off``: this checkout, no experiment, impressions off (the path every call takes by default);
* ``impressions``: no experiment, impressions on (offered to a real
  :class:`~services.ranking.impressions.ImpressionPublisher` with no sender thread running);
* ``ab``: an experiment splitting users 50/50 between two versions (two forward passes a batch
  when both arms are present), impressions on;
* ``ab+shadow``: ``ab`` and a shadow version scoring the batch after it (``followup(True)``);
* ``ab+shadow@.25``: the same within a CPU share for the shadow (``--shadow-cpu-share 0.25``:
  batches go unscored once the shadow has spent a quarter of the rest of the process's CPU in
  the current 5 s window; here the process is this benchmark).

    .venv/bin/python benchmarks/experiment_overhead_bench.py --models DIR_WITH_2_VERSIONS
    .venv/bin/python benchmarks/experiment_overhead_bench.py --publish /tmp/bench-models  # makes 3 small ones

Prints the mean, median and p90 CPU per call (us) of each variant over ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _old_engine(revision: str) -> type:
    """BatchEngine of ``revision``, importing that revision's encoding module too."""
    package = types.ModuleType("_before")
    package.__path__ = []  # type: ignore[attr-defined]
    sys.modules["_before"] = package
    modules = {}
    for name in ("encoding", "engine"):
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{revision}:services/ranking/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        source = source.replace("from services.ranking.encoding import", "from _before.encoding import")
        spec = importlib.util.spec_from_loader(f"_before.{name}", loader=None)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[f"_before.{name}"] = module
        exec(compile(source, f"{revision}:{name}.py", "exec"), module.__dict__)
        modules[name] = module
    return modules["engine"].BatchEngine


def _publish(folder: Path) -> list[Path]:
    import torch

    from models.artifacts import publish_version
    from models.model import ItemEmbeddingConfig, RankerConfig, TwoPathRanker
    from models.vocab import ItemVocab

    items = [f"item-{k}" for k in range(2_000)]
    out = []
    for seed, version in enumerate(("v20240101-000000", "v20240102-000000", "v20240103-000000"), 1):
        torch.manual_seed(seed)
        model = TwoPathRanker(RankerConfig(embedding=ItemEmbeddingConfig(num_rows=len(items) + 2, dim=32)))
        stats = np.random.default_rng(seed).gamma(1.0, 10.0, size=(len(items) + 2, 4)).astype(np.float32)
        out.append(
            publish_version(folder, model, ItemVocab(items), stats, {"note": "bench"}, version=version)
        )
    return out


class _Fetcher:
    """Features from memory: every user warm with 30 recent items, every item known."""

    def __init__(self, items: list[str]) -> None:
        from feature_store.values import UserFeatures

        rng = np.random.default_rng(0)
        self._user = UserFeatures(
            views=40, add_to_carts=6, purchases=2, last_event_ts=int(time.time() * 1000) - 3_600_000,
            recent_items=list(rng.choice(items, 30)),
        )  # fmt: skip
        self._stats = {i: tuple(float(x) for x in rng.gamma(1.0, 10.0, 4)) for i in items}

    def fetch(self, user_ids, item_ids):
        return SimpleNamespace(users={u: self._user for u in user_ids}, items=self._stats, degraded=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", type=Path, help="a models folder with at least 3 versions (newest: default)"
    )
    parser.add_argument("--publish", type=Path, help="publish 3 small versions here first")
    parser.add_argument("--before", default="b0b49a0", help="git revision of the 'before' engine")
    parser.add_argument("--requests", type=int, default=1, help="Rank calls per batch (1: an idle server)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from models.artifacts import list_versions, load_version
    from recstack.experiments.assign import Arm
    from recstack.experiments.state import new_experiment
    from services.ranking.engine import BatchEngine
    from services.ranking.experiments import Routing, ShadowModel
    from services.ranking.impressions import ImpressionPublisher
    from services.ranking.lifecycle import ModelSlot
    from services.ranking.metrics import RankingMetrics
    from services.ranking.validation import Query

    folders = _publish(args.publish) if args.publish else list_versions(args.models)[-3:]
    if len(folders) < 3:
        parser.error("--models needs 3 versions (or use --publish DIR)")
    r1, r2, r3 = (load_version(f, dense_runtime="torchscript") for f in folders)
    for r in (r1, r2, r3):
        r.warmup()
    items = list(r3.vocab.item_ids)
    fetcher = _Fetcher(items)
    slot = ModelSlot(r3)
    rng = np.random.default_rng(1)

    def query() -> Query:
        return Query(f"user-{rng.integers(1 << 30)}", [str(i) for i in rng.choice(items, args.candidates)], 0)

    batches = [[query() for _ in range(args.requests)] for _ in range(64)]

    publisher = ImpressionPublisher(lambda: None, "bench", max_buffer=1 << 30, metrics=RankingMetrics())
    ab = new_experiment("ab", [Arm("A", r1.version, 0.5), Arm("B", r2.version, 0.5)])
    abs_ = new_experiment(
        "ab", [Arm("A", r1.version, 0.5), Arm("B", r2.version, 0.5), Arm("C", r3.version, shadow=True)]
    )
    by_arm = {"A": r1, "B": r2, "C": r3}
    routing_ab = SimpleNamespace(current=Routing(ab, by_arm, None))
    routing_abs = SimpleNamespace(current=Routing(abs_, by_arm, ShadowModel("C", r3.version, r3)))

    def engine(cls, **kw):
        return cls(fetcher, slot, recommend_pool=200, metrics=RankingMetrics(), **kw)

    variants = {
        "before": engine(_old_engine(args.before)),
        "off": engine(BatchEngine),
        "impressions": engine(BatchEngine, impressions=publisher),
        "ab": engine(BatchEngine, experiments=routing_ab, impressions=publisher),
        "ab+shadow": engine(BatchEngine, experiments=routing_abs, impressions=publisher),
        "ab+shadow@.25": engine(
            BatchEngine, experiments=routing_abs, impressions=publisher, shadow_cpu_share=0.25
        ),
    }
    names = list(variants)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(args.rounds):
        batch = batches[round_ % len(batches)]
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            start = time.thread_time()
            results = variants[name](batch, 0.0)
            followup = getattr(results, "followup", None)
            if followup is not None:
                followup(True)
            samples[name].append((time.thread_time() - start) / len(batch))
        publisher._buffer.clear()
    print(
        f"CPU per call, us (batches of {args.requests} x {args.candidates} candidates, {args.rounds} rounds)"
    )
    print(f"{'variant':<14} {'mean':>8} {'median':>8} {'p90':>8}")
    for name in names:
        values = sorted(samples[name])
        p90 = values[int(0.9 * (len(values) - 1))]
        mean, median = statistics.fmean(values), statistics.median(values)
        print(f"{name:<14} {mean * 1e6:8.0f} {median * 1e6:8.0f} {p90 * 1e6:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
