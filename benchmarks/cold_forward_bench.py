"""Cold forward pass: what one request's forward pass costs after the process was idle.

A ranking server at a few dozen calls per second is idle between calls; this measures how much
slower the served model's ``Ranker.rank_batch`` (one request, 100 candidates, served int8
artifact, one torch thread) runs after an idle gap than back to back, and whether it is the
sleep itself (the CPU going idle) or the time away from the model's data:

* ``sleep``: ``time.sleep(gap)`` between calls;
* ``spin``: a busy loop for the gap (the CPU stays busy, touching almost no memory);
* ``thrash``: summing a 64 MB array for the gap (the caches are filled with other data).

Figures are medians over ``--repeats`` calls per gap, the gaps interleaved round-robin so a busy
machine slows every variant alike. The baseline is gap 0 (back to back), measured in the same run.

    .venv/bin/python benchmarks/cold_forward_bench.py --model artifacts/demo/models
    .venv/bin/python benchmarks/cold_forward_bench.py --model DIR --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GAPS_MS = (0.0, 2.0, 10.0, 40.0)


def _idle(kind: str, gap_s: float, scratch: np.ndarray) -> None:
    if gap_s <= 0:
        return
    if kind == "sleep":
        time.sleep(gap_s)
        return
    end = time.perf_counter() + gap_s
    while time.perf_counter() < end:
        if kind == "thrash":
            scratch.sum()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, required=True, help="models folder (its newest version is used)"
    )
    parser.add_argument("--repeats", type=int, default=60, help="calls per gap and idle kind (default: 60)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    import torch

    from models.artifacts import list_versions, load_version
    from models.inference import RankInput

    torch.set_num_threads(1)
    versions = list_versions(args.model)
    if not versions:
        print(f"--model {args.model}: no model version in it", file=sys.stderr)
        return 2
    ranker = load_version(versions[-1], device="cpu", quantized=True, dense_runtime="torchscript")
    ranker.warmup()
    rng = np.random.default_rng(0)
    items = ranker.vocab.item_ids
    request = [
        RankInput(
            list(rng.choice(items, 20)),
            (3.0, 1.0, 1.0),
            60.0,
            list(rng.choice(items, 100)),
            np.ones((100, 4), np.float32),
        )
    ]
    scratch = np.ones(8_000_000)  # 64 MB: more than any cache
    kinds = ("sleep", "spin", "thrash")
    times: dict[tuple[str, float], list[float]] = {(k, g): [] for k in kinds for g in GAPS_MS}
    for i in range(args.repeats):
        for kind in kinds:
            for gap_ms in GAPS_MS:
                if gap_ms == 0:  # back to back: right after other calls
                    for _ in range(3):
                        ranker.rank_batch(request)
                _idle(kind, gap_ms / 1000.0, scratch)
                start = time.perf_counter()
                ranker.rank_batch(request)
                times[(kind, gap_ms)].append(time.perf_counter() - start)
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{args.repeats} rounds", file=sys.stderr, flush=True)

    base = statistics.median(times[("sleep", 0.0)] + times[("spin", 0.0)] + times[("thrash", 0.0)])
    print(f"one request, 100 candidates, served int8 model: back to back {base * 1000:.3f} ms (median)")
    print("| idle gap | after sleep | after busy loop | after cache thrash |")
    print("|---:|---:|---:|---:|")
    figures: dict[str, dict[str, float]] = {}
    for gap_ms in GAPS_MS[1:]:
        row = {k: statistics.median(times[(k, gap_ms)]) for k in kinds}
        figures[f"{gap_ms:g}ms"] = {k: round(v * 1000, 3) for k, v in row.items()}
        cells = " | ".join(f"{row[k] * 1000:.2f} ms ({row[k] / base:.1f}×)" for k in kinds)
        print(f"| {gap_ms:g} ms | {cells} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"back_to_back_ms": round(base * 1000, 3), "after_gap": figures}
        args.json.write_text(json.dumps(out, indent=2))
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
