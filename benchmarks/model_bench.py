"""Model benchmark: which int8 runtime, if any, pays on this CPU; and per-path latency, fp32 vs int8.

Three parts, all on one torch thread (the ranking server's setting) and interleaved so that a
busy machine slows every variant alike; figures are the median of many repetitions:

1. **Dense runtimes**: the full path's interaction MLP (its largest GEMMs) at the row counts the
   server's batches produce (1 .. 128 requests x 100 candidates): torch eager fp32 and torch
   ``quantize_dynamic`` int8, with the trained weights; the int8 output is checked against fp32.
   (ONNX Runtime was measured here too until the served-forms comparison retired it: docs/MODEL.md,
   "Served form".)
2. **Embedding lookups**: gathering 100-candidate rows from an fp32 table vs an int8 table with
   per-row scales, for the trained catalogue and for a 1M-item one (where memory traffic matters).
3. **Per path** (light, full, cascade) ``Ranker.rank_batch`` latency at 1, 8, 32, 128 requests of
   100 candidates: fp32 artifact vs served int8 artifact.
4. **Routing**: the served int8 model routed at no load vs always-full.
5. **Served forms** (needs a published version, ``--model``): the AOTInductor package vs the
   TorchScript graphs, at 1, 2, 4, 8, 32 warm
   requests, back to back and after 10 / 40 ms idle (``benchmarks/cold_forward_bench.py``, which
   runs this part alone with more options).

    .venv/bin/python benchmarks/model_bench.py --model artifacts/models          # newest version
    .venv/bin/python benchmarks/model_bench.py --model DIR --json out.json
    .venv/bin/python benchmarks/model_bench.py --model DIR --parts forms --forms-repeats 200

Without ``--model``, a randomly initialised model of the default architecture over 4,000 items
is used (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

BATCHES = (1, 8, 32, 128)
PARTS = ("dense", "embeddings", "paths", "routing", "forms")
CANDIDATES = 100


# -- measurement helpers ------------------------------------------------------------------------
def interleaved(fns: dict[str, callable], reps: int, min_seconds: float = 0.0) -> dict[str, float]:
    """Median milliseconds per call of each fn, calls interleaved round-robin."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    started = time.perf_counter()
    r = 0
    items = list(fns.items())
    while r < reps or time.perf_counter() - started < min_seconds:
        shift = r % len(items)  # rotate who goes first: no variant always runs on a cold cache
        for name, fn in items[shift:] + items[:shift]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        r += 1
    return {k: float(np.median(v)) * 1000.0 for k, v in times.items()}


def load_or_make(model_dir: str | None):
    from models.artifacts import list_versions

    if model_dir:
        path = Path(model_dir)
        version = path if (path / "MANIFEST.sha256").is_file() else list_versions(path)[-1]
        return version, version.name
    import tempfile

    from models.artifacts import publish_version
    from models.model import ItemEmbeddingConfig, RankerConfig, TwoPathRanker
    from models.vocab import ItemVocab

    vocab = ItemVocab([f"item-{i}" for i in range(4000)])
    model = TwoPathRanker(RankerConfig(ItemEmbeddingConfig(num_rows=len(vocab))))
    folder = publish_version(tempfile.mkdtemp(), model, vocab, np.ones((len(vocab), 4), np.float32), {})
    return folder, "random-init"


def bench_dense(fp32_model, reps: int) -> list[dict]:
    mlp = fp32_model.mlp
    layers = [
        m
        for m in [nn.Linear(2 * mlp.dim + fp32_model.config.item_dense_dim + 1, mlp.pair_in.out_features)]
        + [m for m in mlp.rest if isinstance(m, nn.Linear)]
    ]
    with torch.no_grad():  # the served first layer: every block but the per-item table's
        w = mlp.pair_in.weight
        D = mlp.dim
        layers[0].weight.copy_(torch.cat([w[:, : 2 * D], w[:, 3 * D :]], dim=1))
        layers[0].bias.copy_(mlp.pair_in.bias)
    seq = []
    for k, layer in enumerate(layers):
        seq.append(layer)
        if k < len(layers) - 1:
            seq.append(nn.ReLU())
    eager = nn.Sequential(*seq).eval()
    dynamic = torch.ao.quantization.quantize_dynamic(eager, {nn.Linear}, dtype=torch.qint8)
    rows_out = []
    for b in BATCHES:
        n = b * CANDIDATES
        x = torch.randn(n, layers[0].in_features)
        with torch.inference_mode():
            ref = eager(x).numpy()
            errors = {"torch_int8": float(np.abs(dynamic(x).numpy() - ref).max())}
            fns = {
                "torch_fp32": lambda m=eager, x=x: m(x),
                "torch_int8": lambda m=dynamic, x=x: m(x),
            }
            ms = interleaved(fns, reps=max(5, reps // b), min_seconds=0.3)
        rows_out.append({"requests": b, "rows": n, "ms": ms, "max_abs_error_vs_fp32": errors})
    return rows_out


def bench_embeddings(fp32_ranker, reps: int) -> list[dict]:
    from models.quantize import quantize_rows

    out = []
    D = fp32_ranker.model.config.embedding.dim
    trained = fp32_ranker.model.items.weight.detach()
    for name, table in (("trained catalogue", trained), ("1M items", torch.randn(1_000_000, D))):
        q, scale = quantize_rows(table)
        for b in (8, 128):
            rows = torch.randint(2, table.shape[0], (b, CANDIDATES))
            ms = interleaved(
                {
                    "fp32_gather": lambda t=table, r=rows: t[r],
                    "int8_gather_rescale": lambda q=q, s=scale, r=rows: q[r].float() * s[r].unsqueeze(-1),
                },
                reps=max(10, reps // b),
                min_seconds=0.2,
            )
            out.append(
                {
                    "table": name,
                    "rows": table.shape[0],
                    "requests": b,
                    "ms": ms,
                    "fp32_mb": table.numel() * 4 / 1e6,
                    "int8_mb": (q.numel() + scale.numel() * 4) / 1e6,
                }
            )
    return out


PATH_VARIANTS = {  # name -> (quantized, int8 dense runtime)
    "fp32": (False, None),
    "int8_torch_dense": (True, "fp32"),
}


def bench_paths(version: Path, reps: int) -> list[dict]:
    from models.artifacts import load_version
    from models.latency import synthetic_requests

    rankers = {
        name: load_version(version, quantized=q, dense_runtime=rt) for name, (q, rt) in PATH_VARIANTS.items()
    }
    for r in rankers.values():
        r.warmup()
    out = []
    for b in BATCHES:
        inputs = synthetic_requests(rankers["fp32"], b, CANDIDATES, seed=b)
        for path in ("light", "full", "cascade"):
            fns = {
                name: lambda r=r, p=path, i=inputs: r.rank_batch(i, force_path=p)
                for name, r in rankers.items()
            }
            ms = interleaved(fns, reps=max(5, reps // b), min_seconds=0.3)
            out.append({"path": path, "requests": b, "ms": ms})
    return out


def bench_routing(version: Path, reps: int, cold_share: float = 0.16) -> list[dict]:
    """Served int8 model: routed at no load vs always-full, on requests of which ``cold_share`` are
    cold users (Online Retail's evaluation month: 272 of 1,667)."""
    from models.artifacts import load_version
    from models.inference import RankInput
    from models.latency import synthetic_requests

    ranker = load_version(version)
    out = []
    for b in BATCHES:
        inputs = synthetic_requests(ranker, b, CANDIDATES, seed=b)
        n_cold = round(b * cold_share)
        for k in range(n_cold):
            inp = inputs[k]
            inputs[k] = RankInput([], (0.0, 0.0, 0.0), None, inp.candidates, inp.item_stats)
        ms = interleaved(
            {
                "routed": lambda i=inputs: ranker.rank_batch(i),
                "always_full": lambda i=inputs: ranker.rank_batch(i, force_path="full"),
            },
            reps=max(5, reps // b),
            min_seconds=0.3,
        )
        out.append(
            {"requests": b, "cold": n_cold, "ms": ms, "reduction": 1 - ms["routed"] / ms["always_full"]}
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model version folder or models folder (default: random-init model)")
    parser.add_argument(
        "--reps", type=int, default=400, help="repetitions at batch size 1 (fewer for larger)"
    )
    parser.add_argument(
        "--parts",
        type=lambda text: [p for p in text.split(",") if p],
        default=list(PARTS),
        help=f"comma-separated parts to run (default: {','.join(PARTS)})",
    )
    parser.add_argument(
        "--forms-repeats", type=int, default=40, help="rounds of the served-forms part (default: 40)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if "forms" in args.parts and not args.model:
        parser.error("--parts forms needs --model (a published version with its compiled package)")
    torch.set_num_threads(1)
    folder, version = load_or_make(args.model)
    from models.artifacts import load_version

    fp32 = load_version(folder, quantized=False)
    results = {"version": version, "threads": 1, "candidates_per_request": CANDIDATES}
    print(f"model {version}; one torch thread; medians of interleaved repetitions\n")
    if "dense" in args.parts:
        _dense(results, fp32, args.reps)
    if "embeddings" in args.parts:
        _embeddings(results, fp32, args.reps)
    if "paths" in args.parts:
        _paths(results, folder, args.reps)
    if "routing" in args.parts:
        _routing(results, folder, args.reps)
    if "forms" in args.parts:
        from benchmarks import cold_forward_bench as cold

        forms_args = cold.parse_args(["--model", str(folder), "--repeats", str(args.forms_repeats)])
        results["forms"] = cold.compare_forms(Path(folder), forms_args)
        print("\n5. served forms: Ranker.rank_batch, warm users, back to back and after idle gaps")
        print(cold.report(results["forms"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _dense(results: dict, fp32, reps: int) -> None:
    results["dense"] = bench_dense(fp32.model, reps)
    print("1. interaction MLP (the full path's GEMMs), ms per call")
    print("| requests x 100 | rows | torch fp32 | torch int8 (dynamic) | max abs error torch int8 |")
    print("|---|---|---|---|---|")
    for r in results["dense"]:
        ms = r["ms"]
        print(
            f"| {r['requests']} | {r['rows']:,} | {ms['torch_fp32']:.3f} | {ms['torch_int8']:.3f} | "
            f"{r['max_abs_error_vs_fp32']['torch_int8']:.4f} |"
        )


def _embeddings(results: dict, fp32, reps: int) -> None:
    results["embeddings"] = bench_embeddings(fp32, reps)
    print("\n2. embedding gathers (requests x 100 candidates), ms per call")
    print("| table | rows | requests | fp32 gather | int8 gather + rescale | fp32 MB | int8 MB |")
    print("|---|---|---|---|---|---|---|")
    for r in results["embeddings"]:
        print(
            f"| {r['table']} | {r['rows']:,} | {r['requests']} | {r['ms']['fp32_gather']:.3f} | "
            f"{r['ms']['int8_gather_rescale']:.3f} | {r['fp32_mb']:.1f} | {r['int8_mb']:.1f} |"
        )


def _paths(results: dict, folder: Path, reps: int) -> None:
    results["paths"] = bench_paths(folder, reps)
    print("\n3. Ranker.rank_batch per path, ms per call (100 candidates per request)")
    print("| path | requests | fp32 | int8, fp32 dense | int8 / fp32 |")
    print("|---|---|---|---|---|")
    for r in results["paths"]:
        ms = r["ms"]
        print(
            f"| {r['path']} | {r['requests']} | {ms['fp32']:.3f} | {ms['int8_torch_dense']:.3f} | "
            f"{ms['int8_torch_dense'] / ms['fp32']:.2f} |"
        )


def _routing(results: dict, folder: Path, reps: int) -> None:
    results["routing"] = bench_routing(folder, reps)
    print("\n4. served int8 model, routed (no load) vs always-full, 16% cold users, ms per rank_batch call")
    print("| requests | cold | always-full | routed | reduction |")
    print("|---|---|---|---|---|")
    for r in results["routing"]:
        ms = r["ms"]
        print(
            f"| {r['requests']} | {r['cold']} | {ms['always_full']:.3f} | {ms['routed']:.3f} "
            f"| {r['reduction']:.0%} |"
        )


if __name__ == "__main__":
    sys.exit(main())
