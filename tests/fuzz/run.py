"""Fuzz on demand for a set time: ``make fuzz FUZZ_SECONDS=600`` (or run this file directly).

Three phases share the time:

1. **hypothesis**: the fuzz properties of tests/unit/test_fuzz_events.py and
   tests/unit/test_fuzz_ranking_requests.py, called again and again (fresh random examples each
   time) until their share of the time is spent;
2. **atheris** (coverage-guided libFuzzer, when the ``atheris`` package is installed; ``make
   fuzz`` installs it): the same properties on mutated bytes, seeded with valid events and
   requests;
3. **grpc**: tests/integration/test_fuzz_ranking_server.py with the ``long`` Hypothesis profile
   (a real ``recstack serve``; needs Kafka and Redis up, as ``make fuzz`` arranges).

Prints how many inputs each phase tried and what failed, and writes ``fuzz.json`` and
``summary.md`` to ``--out``. Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
# module -> (the property checkers its fuzz tests call, the fuzz tests)
UNIT_MODULES = {
    "test_fuzz_events": (["check_value"], ["test_fuzz_one_value", "test_fuzz_a_batch"]),
    "test_fuzz_ranking_requests": (
        ["check_rank_body", "check_recommend_body"],
        ["test_fuzz_rank_bodies", "test_fuzz_recommend_bodies"],
    ),
}


def _progress(message: str) -> None:
    print(f"[fuzz] {message}", file=sys.stderr, flush=True)


def run_hypothesis(seconds: float) -> dict[str, Any]:
    """Call each property test repeatedly until ``seconds`` are spent; count the inputs checked."""
    from hypothesis import settings

    settings.register_profile("fuzz", max_examples=500, deadline=None, database=None)
    settings.load_profile("fuzz")  # before the test modules build their settings objects
    sys.path.insert(0, str(TESTS / "unit"))
    counts: dict[str, int] = {}
    failures: list[str] = []
    tests = []
    for module_name, (checkers, test_names) in UNIT_MODULES.items():
        module = importlib.import_module(module_name)
        for checker in checkers:  # the tests look the checker up in their module at each call
            original = getattr(module, checker)

            def counting(*args: Any, _original: Any = original, _name: str = checker, **kwargs: Any) -> Any:
                counts[_name] = counts.get(_name, 0) + 1
                return _original(*args, **kwargs)

            setattr(module, checker, counting)
        tests += [(f"{module_name}.{name}", getattr(module, name)) for name in test_names]
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        for name, test in tests:
            try:
                test()
            except Exception as exc:  # a falsified property: keep it, go on with the others
                failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:2000]}")
        rounds += 1
        _progress(f"hypothesis: round {rounds}, {sum(counts.values()):,} inputs checked")
    return {"inputs": counts, "rounds": rounds, "failures": failures}


def _seed_corpus(target: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if target == "events":
        from test_fuzz_events import VALID

        seeds = [
            VALID,
            VALID.replace(b'"view"', b'"purchase"'),
            b'{"event_id":"a","user_id":"\\u00e9","item_id":"i","event_type":"add_to_cart","ts":"2024-01-01T00:00:00Z"}',
            VALID + b"\n" + VALID,
            b"[]",
        ]
    else:
        from recstack.v1 import ranking_pb2

        seeds = [
            ranking_pb2.RankRequest(user_id="u", item_ids=["a", "b"], top_k=1).SerializeToString(),
            ranking_pb2.RecommendRequest(user_id="u", k=5, include_purchased=True).SerializeToString(),
        ]
    for n, seed in enumerate(seeds):
        (folder / f"seed-{n}").write_bytes(seed)


def run_atheris(seconds: float, out: Path) -> dict[str, Any]:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return {"skipped": "atheris is not installed (make fuzz installs it: uv pip install atheris)"}
    sys.path.insert(0, str(TESTS / "unit"))
    results: dict[str, Any] = {}
    for target in ("events", "requests"):
        work = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
        corpus = work / "corpus"
        _seed_corpus(target, corpus)
        crashes = out / f"atheris-{target}"
        crashes.mkdir(parents=True, exist_ok=True)
        budget = max(1, int(seconds / 2))
        _progress(f"atheris {target}: {budget} s")
        cmd = [
            sys.executable,
            str(HERE / "atheris_target.py"),
            target,
            str(corpus),
            f"-max_total_time={budget}",
            "-max_len=4096",
            "-rss_limit_mb=4096",
            f"-artifact_prefix={crashes}/",
            "-print_final_stats=1",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        log = done.stdout + done.stderr
        (out / f"atheris-{target}.log").write_text(log)
        runs = re.findall(r"Done (\d+) runs", log) or re.findall(
            r"stat::number_of_executed_units:\s*(\d+)", log
        )
        coverage = re.findall(r"cov: (\d+)", log)
        results[target] = {
            "inputs": int(runs[-1]) if runs else None,
            "coverage_edges": int(coverage[-1]) if coverage else None,
            "exit_code": done.returncode,
            "crashes": sorted(p.name for p in crashes.iterdir()),
        }
        shutil.rmtree(work, ignore_errors=True)
    return results


def run_grpc() -> dict[str, Any]:
    _progress("grpc: tests/integration/test_fuzz_ranking_server.py with the long profile")
    env = dict(os.environ, RECSTACK_FUZZ_PROFILE="long")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "tests/integration/test_fuzz_ranking_server.py"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    tail = (done.stdout + done.stderr).strip().splitlines()[-25:]
    return {"examples_per_property": 5_000, "exit_code": done.returncode, "output_tail": tail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=300.0, help="time for phases 1 and 2 (default 300)")
    parser.add_argument(
        "--phases",
        default="hypothesis,atheris,grpc",
        help="comma-separated subset of hypothesis,atheris,grpc",
    )
    parser.add_argument("--out", default="artifacts/fuzz", help="folder for fuzz.json, summary.md, crashes")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    share = args.seconds / max(1, len([p for p in phases if p in ("hypothesis", "atheris")]))
    report: dict[str, Any] = {"seconds": args.seconds}
    started = time.monotonic()
    if "hypothesis" in phases:
        report["hypothesis"] = run_hypothesis(share)
    if "atheris" in phases:
        report["atheris"] = run_atheris(share, out)
    if "grpc" in phases:
        report["grpc"] = run_grpc()
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    (out / "fuzz.json").write_text(json.dumps(report, indent=2))

    failed = False
    lines = [
        f"# Fuzzing run ({report['wall_seconds']:.0f} s)",
        "",
        "| phase | inputs tried | result |",
        "|---|---:|---|",
    ]
    if "hypothesis" in report:
        h = report["hypothesis"]
        failed |= bool(h["failures"])
        for name, count in h["inputs"].items():
            lines.append(f"| hypothesis {name} | {count:,} | {'FAILED' if h['failures'] else 'no failure'} |")
    if "atheris" in report:
        a = report["atheris"]
        if "skipped" in a:
            lines.append(f"| atheris | - | skipped: {a['skipped']} |")
        for target, r in a.items():
            if target == "skipped":
                continue
            bad = r["exit_code"] != 0 or r["crashes"]
            failed |= bool(bad)
            inputs = f"{r['inputs']:,}" if r["inputs"] is not None else "?"
            result = (
                f"crashes: {', '.join(r['crashes'])}" if bad else f"no crash, {r['coverage_edges']} edges"
            )
            lines.append(f"| atheris {target} | {inputs} | {result} |")
    if "grpc" in report:
        g = report["grpc"]
        failed |= g["exit_code"] != 0
        result = "passed" if g["exit_code"] == 0 else "FAILED (see fuzz.json)"
        lines.append(f"| grpc over a real channel | {g['examples_per_property']:,} per property | {result} |")
    if "hypothesis" in report and report["hypothesis"]["failures"]:
        lines += ["", "## Failures", *(f"- {f[:500]}" for f in report["hypothesis"]["failures"])]
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    print(summary)
    print(f"written: {out / 'fuzz.json'}, {out / 'summary.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
