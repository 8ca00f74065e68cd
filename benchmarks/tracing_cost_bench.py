"""What the tracing code costs the ranking server when tracing is off: CPU per call at a fixed rate.

Two ``recstack serve`` processes run side by side, identical but for their source tree: the
baseline (a checkout without the tracing code, ``--baseline``, e.g. made with
``git worktree add /tmp/notrace <commit>``) and this tree (tracing off, as shipped). Each gets
the same open-loop Rank load (:mod:`loadtests.openloop`, ``--rate`` calls/s for ``--duration``
seconds), in turns A/B, B/A, ... so that a noisy neighbour on a shared machine hits both alike;
each step reads the server's CPU time from /proc (:mod:`loadtests.cpu`). Prints every step, the
median CPU per call of each and their ratio, and writes the figures as JSON to ``--out``.

    python benchmarks/tracing_cost_bench.py --baseline /tmp/notrace \\
        --models artifacts/models --redis redis://127.0.0.1:6379/0 --rounds 4

Add ``--serve-args=--tracing`` with ``OTEL_TRACES_EXPORTER=console`` (or a collector) to see
what tracing costs when it is on.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from loadtests import workload
from loadtests.cpu import CpuMeter
from loadtests.openloop import GeneratorConfig, OpenLoopGenerator
from loadtests.servers import ServerProcess, ServerSpec

REPO = Path(__file__).resolve().parents[1]
# Runs recstack's CLI from the given source tree, whatever the working folder holds.
_FROM_TREE = "import sys; sys.path.insert(0, {root!r}); from recstack.cli import main; sys.exit(main())"


def serve_spec(name: str, root: Path, models: str, redis: str, extra: list[str]) -> ServerSpec:
    argv = [sys.executable, "-c", _FROM_TREE.format(root=str(root)), "serve", "--host", "127.0.0.1",
            "--port", "{port}", "--models", models, "--redis", redis, "--metrics-port", "0",
            *extra]  # fmt: skip
    return ServerSpec(name, tuple(argv))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="source tree without the tracing code")
    parser.add_argument(
        "--this",
        default=str(REPO),
        help="source tree measured against it (default: this one; "
        "give the baseline again for an A/A run that shows the noise alone)",
    )
    parser.add_argument("--models", default="artifacts/models")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--source", default="onlineretail", help="users and items of the requests")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per step")
    parser.add_argument("--rounds", type=int, default=4, help="A/B pairs, alternating the order")
    parser.add_argument("--serve-args", default="", help="extra flags for this tree's server")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "tracing_cost.json"))
    args = parser.parse_args(argv)

    mix = workload.load(args.source)
    requests = workload.rank_requests(mix, 2_000, args.candidates, seed=1)
    logs = Path(tempfile.mkdtemp(prefix="tracing-cost-"))
    specs = {
        "baseline": serve_spec("baseline", Path(args.baseline).resolve(), args.models, args.redis, []),
        "this": serve_spec(
            "this", Path(args.this).resolve(), args.models, args.redis, shlex.split(args.serve_args)
        ),
    }
    per_call: dict[str, list[float]] = {name: [] for name in specs}
    steps = []
    servers = {name: ServerProcess(spec, logs / f"{name}.log") for name, spec in specs.items()}
    generators: dict[str, OpenLoopGenerator] = {}
    try:
        for name, server in servers.items():
            server.start(ready_timeout_s=180)
            generators[name] = OpenLoopGenerator(server.address, "Rank", requests, GeneratorConfig())
            generators[name].start()
            generators[name].run_step(args.rate, 5.0, "poisson", seed=99)  # warm: caches, allocator
        for round_no in range(args.rounds):
            order = list(specs) if round_no % 2 == 0 else list(reversed(specs))
            for name in order:
                meter = CpuMeter([servers[name].pid])  # type: ignore[list-item]
                before = meter.snapshot()
                record = generators[name].run_step(args.rate, args.duration, "poisson", seed=round_no)
                cpu = meter.since(before)
                ok = int(np.count_nonzero(record.code == 0))
                us = cpu.seconds / max(ok, 1) * 1e6
                per_call[name].append(us)
                step = {"round": round_no, "server": name, "ok": ok, "calls": len(record.code),
                        "cpu_s": round(cpu.seconds, 4), "source": cpu.source,
                        "cpu_us_per_call": round(us, 1)}  # fmt: skip
                steps.append(step)
                print(json.dumps(step), flush=True)
    finally:
        for generator in generators.values():
            generator.close()
        for server in servers.values():
            server.stop()
    medians = {name: statistics.median(values) for name, values in per_call.items()}
    summary = {
        "rate": args.rate,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "candidates": args.candidates,
        "trees": {"baseline": str(Path(args.baseline).resolve()), "this": str(Path(args.this).resolve())},
        "serve_args": args.serve_args,
        "median_us_per_call": {k: round(v, 1) for k, v in medians.items()},
        "range_us_per_call": {k: [round(min(v), 1), round(max(v), 1)] for k, v in per_call.items()},
        "this_over_baseline": round(medians["this"] / medians["baseline"], 4),
        # each round's pair, so the spread of the ratio itself shows
        "pair_ratios": [round(b / a, 4) for a, b in zip(per_call["baseline"], per_call["this"], strict=True)],
        "steps": steps,
    }
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
