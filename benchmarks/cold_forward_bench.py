"""Served forms, warm and cold: what a server batch's model call costs in each form the served
graph can take, back to back and after the process was idle.

The forms, all from the same published int8 version, all called through ``Ranker.rank_batch``
(the whole model call a server batch makes: packing, routing, one forward, unpacking):

* ``aoti``: the version's AOTInductor package (``model.pt2``, :mod:`models.aoti`), what is served;
* ``torchscript``: the traced, frozen per-path graphs of :mod:`models.compiled` (served before,
  now the fallback).

ONNX Runtime forms (the whole graph exported, fp32 and int8, and the eager model with an ONNX
Runtime int8 MLP) were measured here too; they lost to ``aoti`` in every line, and the ONNX
Runtime path was retired (docs/MODEL.md, "Served form", keeps their figures).

Requests are warm users (``--history`` recent items, default 30) with ``--candidates`` (100)
candidates each, routed as at no load (they take the cascade; ``--path full`` etc. forces one
path); one torch thread. For each form, request count
(1, 2, 4, 8, 32) and idle gap (0 = back to back, i.e. right after three calls of the same
shape; 10 and 40 ms of ``time.sleep``), the thread's CPU time and the wall time of the call are
recorded; the variants run interleaved round-robin (the order rotated each round) so a busy
machine slows them alike. Figures are the median and p90 over ``--repeats`` rounds. Before
timing, each form's scores are compared with the first form's on every request count.

``--idle-kinds sleep,spin,thrash`` adds the older question of *why* a call after a gap is slow:
``spin`` busy-loops for the gap (the CPU stays busy, touching almost no memory), ``thrash`` sums a
64 MB array for the gap (the caches fill with other data).

    .venv/bin/python benchmarks/cold_forward_bench.py --model artifacts/models \\
        --json artifacts/bench/forms.json
    .venv/bin/python benchmarks/cold_forward_bench.py --model DIR --forms aoti,torchscript --repeats 200

The default (2 forms x 5 request counts x 3 gaps, 40 rounds) takes about 30 s on a shared 2-core
machine (the sleeps alone are 0.75 s a round); the process exits 1 when a form's scores disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FORMS = ("aoti", "torchscript")
REQUESTS = (1, 2, 4, 8, 32)
GAPS_MS = (0.0, 10.0, 40.0)
IDLE_KINDS = ("sleep", "spin", "thrash")
PATHS = ("routed", "light", "cascade", "full")
AGREEMENT_TOLERANCE = 1e-4  # every form computes in fp32 from the same dequantized weights


# -- arguments ----------------------------------------------------------------------------------
def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _gap_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated milliseconds, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected gaps >= 0 ms, got {text!r}")
    return values


def _choices(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        unknown = [v for v in values if v not in allowed]
        if not values or unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {', '.join(allowed)}")
        return tuple(dict.fromkeys(values))  # keep the order given, drop repeats

    return parse


def _positive(text: str) -> int:
    value = _int_list(text)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return value[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, required=True, help="a version folder, or a models folder (its newest version)"
    )
    parser.add_argument(
        "--forms",
        type=_choices(FORMS),
        default=FORMS,
        help=f"comma-separated (default: {','.join(FORMS)})",
    )
    parser.add_argument(
        "--requests", type=_int_list, default=REQUESTS, help="request counts per call (default: 1,2,4,8,32)"
    )
    parser.add_argument("--gaps-ms", type=_gap_list, default=GAPS_MS, help="idle gaps (default: 0,10,40)")
    parser.add_argument(
        "--idle-kinds", type=_choices(IDLE_KINDS), default=("sleep",), help="how to idle (default: sleep)"
    )
    parser.add_argument(
        "--path",
        choices=PATHS,
        default="routed",
        help="routed as at no load (default; warm users take the cascade), or forced onto one path",
    )
    parser.add_argument("--candidates", type=_positive, default=100, help="per request (default: 100)")
    parser.add_argument("--history", type=_positive, default=30, help="recent items per user (default: 30)")
    parser.add_argument(
        "--repeats", type=_positive, default=40, help="timed calls per variant (default: 40, ~40 s)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


# -- statistics and the table (pure) -------------------------------------------------------------
def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median and p90 in microseconds."""
    arr = np.asarray(seconds, dtype=np.float64) * 1e6
    return {
        "median_us": round(float(np.median(arr)), 1),
        "p90_us": round(float(np.percentile(arr, 90)), 1),
    }


def _gap_label(gap_ms: float, kind: str) -> str:
    if gap_ms == 0:
        return "back to back"
    what = {"sleep": "idle", "spin": "busy loop", "thrash": "cache thrash"}[kind]
    return f"after {gap_ms:g} ms {what}"


def markdown_table(rows: list[dict[str, Any]], forms: Sequence[str]) -> str:
    """One line per (requests, gap): each form's CPU and wall median / p90 in µs, fastest CPU
    median in bold. ``rows``: ``{"requests", "gap_ms", "idle", "forms": {form: {"cpu": {...},
    "wall": {...}}}}`` as :func:`measure` returns them."""
    head = "| requests | gap | " + " | ".join(f"{f} CPU µs | {f} wall µs" for f in forms) + " |"
    lines = [
        "(median / p90 of each call; CPU = the calling thread's CPU time)",
        "",
        head,
        "|---:|---|" + "---:|---:|" * len(forms),
    ]
    for row in rows:
        present = [f for f in forms if f in row["forms"]]
        best = min(present, key=lambda f: row["forms"][f]["cpu"]["median_us"]) if present else None
        cells = []
        for f in forms:
            fig = row["forms"].get(f)
            if fig is None:
                cells += ["n/a", "n/a"]
                continue
            cpu = f"{fig['cpu']['median_us']:,.0f} / {fig['cpu']['p90_us']:,.0f}"
            if f == best and len(present) > 1:
                cpu = f"**{cpu}**"
            cells += [cpu, f"{fig['wall']['median_us']:,.0f} / {fig['wall']['p90_us']:,.0f}"]
        gap = _gap_label(row["gap_ms"], row["idle"])
        lines.append(f"| {row['requests']} | {gap} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the forms ----------------------------------------------------------------------------------
def load_forms(version: Path, forms: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """-> ({form: warmed-up Ranker}, {form: why it is not there})."""
    from models.artifacts import load_version

    rankers: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for form in forms:
        try:
            ranker = load_version(version, dense_runtime=form)
            if ranker.form != form:
                raise RuntimeError(f"the version loads as {ranker.form}, not {form} (see the log)")
            ranker.warmup()
            rankers[form] = ranker
        except Exception as exc:  # one form failing must not hide the others' figures
            problems[form] = f"{type(exc).__name__}: {exc}"
            print(f"  {form}: not measured: {problems[form]}", file=sys.stderr)
    return rankers, problems


def agreement(rankers: dict[str, Any], inputs: dict[int, list[Any]]) -> dict[str, Any]:
    """Max |score difference| of each form against the first, over every request count, routed
    (as timed) and forced onto each path (the one graph's head of 0, of C, and between)."""
    names = list(rankers)
    ref = names[0]
    out: dict[str, Any] = {"reference": ref, "max_abs_diff": {n: 0.0 for n in names[1:]}, "paths": {}}
    for b, batch in inputs.items():
        for force in (None, "light", "cascade", "full"):
            want = rankers[ref].rank_batch(batch, force_path=force)
            if force is None:
                out["paths"][str(b)] = sorted({o.path for o in want})
            for name in names[1:]:
                got = rankers[name].rank_batch(batch, force_path=force)
                diff = max(float(np.abs(g.scores - w.scores).max()) for g, w in zip(got, want, strict=True))
                out["max_abs_diff"][name] = max(out["max_abs_diff"][name], diff)
    return out


# -- measurement --------------------------------------------------------------------------------
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


def measure(
    rankers: dict[str, Any],
    inputs: dict[int, list[Any]],
    gaps_ms: Sequence[float],
    kinds: Sequence[str],
    repeats: int,
    loads: list[float] | None = None,
    force_path: str | None = None,
) -> list[dict[str, Any]]:
    """Each (form, requests, idle kind, gap) timed ``repeats`` times, round-robin. The 1-minute
    load average is appended to ``loads`` after every round."""
    scratch = np.ones(8_000_000) if "thrash" in kinds else np.ones(1)  # 64 MB: more than any cache
    # Gap 0 is "back to back" whatever the idle kind: measure it once.
    settings = [(k, g) for k in kinds for g in gaps_ms if g > 0]
    if 0 in gaps_ms:
        settings.insert(0, ("sleep", 0.0))
    variants = [(f, b, k, g) for b in inputs for (k, g) in settings for f in rankers]
    cpu: dict[tuple, list[float]] = {v: [] for v in variants}
    wall: dict[tuple, list[float]] = {v: [] for v in variants}
    started = time.perf_counter()
    for r in range(repeats):
        shift = r % len(variants)  # rotate who goes first: no variant always follows the same one
        for v in variants[shift:] + variants[:shift]:
            form, b, kind, gap_ms = v
            ranker, batch = rankers[form], inputs[b]
            if gap_ms == 0:  # back to back: right after calls of the same form and shape
                for _ in range(3):
                    ranker.rank_batch(batch, force_path=force_path)
            _idle(kind, gap_ms / 1000.0, scratch)
            c0, w0 = time.thread_time(), time.perf_counter()
            ranker.rank_batch(batch, force_path=force_path)
            wall[v].append(time.perf_counter() - w0)
            cpu[v].append(time.thread_time() - c0)
        if loads is not None:
            loads.append(os.getloadavg()[0])
        if (r + 1) % 10 == 0 or r + 1 == repeats:
            print(
                f"  {r + 1}/{repeats} rounds ({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    rows = []
    for b in inputs:
        for kind, gap_ms in settings:
            rows.append(
                {
                    "requests": b,
                    "gap_ms": gap_ms,
                    "idle": kind,
                    "forms": {
                        f: {
                            "cpu": summarize(cpu[(f, b, kind, gap_ms)]),
                            "wall": summarize(wall[(f, b, kind, gap_ms)]),
                        }
                        for f in rankers
                    },
                }
            )
    return rows


def resolve_version(path: Path) -> Path | None:
    from models.artifacts import MANIFEST, list_versions

    if (path / MANIFEST).is_file():
        return path
    versions = list_versions(path)
    return versions[-1] if versions else None


def compare_forms(version: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Load, check and time the forms -> the results (also what ``--json`` writes)."""
    import torch

    from models.latency import synthetic_requests

    torch.set_num_threads(1)
    rankers, problems = load_forms(version, args.forms)
    if not rankers:
        raise RuntimeError(f"no form could be loaded: {problems}")
    first = next(iter(rankers.values()))
    inputs = {
        b: synthetic_requests(first, b, args.candidates, seed=b, history=args.history) for b in args.requests
    }
    agree = agreement(rankers, inputs)
    loads = [os.getloadavg()[0]]
    started = time.perf_counter()
    force = None if args.path == "routed" else args.path
    rows = measure(rankers, inputs, args.gaps_ms, args.idle_kinds, args.repeats, loads, force)
    seconds = time.perf_counter() - started
    return {
        "version": version.name,
        "model_path": str(version),
        "torch": torch.__version__,
        "threads": 1,
        "candidates_per_request": args.candidates,
        "history": args.history,
        "path": args.path,
        "repeats": args.repeats,
        "forms": list(rankers),
        "not_measured": problems,
        "agreement": agree,
        "load_average_1m": {
            "min": round(min(loads), 2),
            "median": round(float(np.median(loads)), 2),
            "max": round(max(loads), 2),
        },
        "seconds": round(seconds, 1),
        "rows": rows,
    }


def report(results: dict[str, Any]) -> str:
    agree = results["agreement"]
    load = results["load_average_1m"]
    lines = [
        f"model {results['version']}; warm users ({results['history']} recent items), "
        f"{results['candidates_per_request']} candidates a request, one torch thread, "
        f"{results['repeats']} rounds in {results['seconds']} s; 1-minute load average during the run "
        f"{load['min']}-{load['max']} (median {load['median']}) on {os.cpu_count()} CPUs",
        f"timed: {results['path']}; routed at no load (requests: paths): "
        + ", ".join(f"{b}: {'/'.join(p)}" for b, p in agree["paths"].items()),
    ]
    for form, diff in agree["max_abs_diff"].items():
        verdict = "agree" if diff <= AGREEMENT_TOLERANCE else "DISAGREE"
        lines.append(
            f"max |score difference| {form} vs {agree['reference']}: {diff:.2e} "
            f"({verdict} within {AGREEMENT_TOLERANCE:g})"
        )
    for form, why in results["not_measured"].items():
        lines.append(f"{form}: not measured: {why}")
    lines += ["", markdown_table(results["rows"], results["forms"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    version = resolve_version(args.model)
    if version is None:
        print(f"--model {args.model}: no model version in it", file=sys.stderr)
        return 2
    results = compare_forms(version, args)
    print(report(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"written: {args.json}")
    disagree = [f for f, d in results["agreement"]["max_abs_diff"].items() if d > AGREEMENT_TOLERANCE]
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
