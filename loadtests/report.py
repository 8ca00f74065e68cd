"""The saturation benchmark's report: ``summary.md`` and PNG plots, from ``results.json`` alone.

Plots: latency percentiles against the offered rate with the SLO line (one panel per server),
the latency histogram at the target rate, the path mix and shed rate against load, and the CPU
time per call of every server and of the load generator against the offered rate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtests.stats import HISTOGRAM_EDGES_MS, path_mix

# "coarse" and "descend" are the phases of results.json files written before the fixed schedule.
SEARCH_PHASES = ("fixed", "fixed-recheck", "fine", "fine-recheck", "coarse", "coarse-recheck", "descend")
PERCENTILE_KEYS = ("p50", "p95", "p99", "p99.9")
PLOT_FILES = ("latency_vs_rate.png", "latency_histogram.png", "path_mix.png", "cpu_per_call.png")
QUICK_NOTE = (
    "**Quick run: these figures are indicative only** (short steps of at least {calls} calls, so a "
    "low-rate step's p99 is one of its two slowest calls). The targets are judged by the full run: "
    "`recstack bench` without `--quick`."
)


def load_results(path: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def all_steps(server: dict[str, Any]) -> list[dict[str, Any]]:
    """Every step of a server (search, then target, naive-peak and overload)."""
    steps = list(server.get("steps") or [])
    for key in ("target", "at_naive_peak", "overload"):
        if server.get(key):
            steps.append(server[key])
    return steps


def step_at(server: dict[str, Any], rate: float | None, *, target: bool = False) -> dict[str, Any] | None:
    """The step whose offered rate is closest to ``rate``: a search step, or with ``target`` the
    server's target step (the re-measurement at its max rate) when it has one."""
    if rate is None:
        return None
    if target and server.get("target"):
        return server["target"]  # type: ignore[no-any-return]
    steps = [
        s for s in server.get("steps") or [] if s.get("phase") in SEARCH_PHASES and not s.get("superseded")
    ]
    return min(steps, key=lambda s: abs(s["offered_rate"] - rate), default=None)


def target_rate(results: dict[str, Any]) -> tuple[str | None, float | None]:
    """The rate the histogram is drawn at: the real server's SLO rate, else the first server's."""
    servers = results.get("servers", {})
    for name in ("real", *servers):
        server = servers.get(name) or {}
        if server.get("status") == "ok" and server.get("slo_rate"):
            return name, float(server["slo_rate"])
    return None, None


# --- summary.md ----------------------------------------------------------------------------------


def write_summary(results: dict[str, Any], path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_summary(results))
    return out


def render_summary(results: dict[str, Any]) -> str:
    slo = results.get("slo_p99_ms", 10.0)
    cfg = results.get("config", {})
    search = cfg.get("search", {})
    machine = results.get("machine", {})
    servers: dict[str, Any] = results.get("servers", {})
    lines = ["# Saturation benchmark", ""]
    if cfg.get("quick"):
        lines += [QUICK_NOTE.format(calls=search.get("min_calls", "100")), ""]
    lines += [
        f"Run {results.get('started_at', '?')} on {machine.get('cpu', '?')} "
        f"({machine.get('cpus', '?')} CPUs, "
        f"load average {_load(machine.get('load_average_start'))} at start, "
        f"{_load(machine.get('load_average_end'))} at end; "
        "the generator shares the machine with the server).",
        f"Rank with {cfg.get('candidates', '?')} candidates from `{cfg.get('source', '?')}`, "
        f"{search.get('schedule', '?')} arrivals, open loop. {_schedule_text(search)}"
        f"{' (quick mode)' if cfg.get('quick') else ''}. "
        f"SLO: p99 <= {slo:g} ms over successful calls and errors "
        f"<= {100 * search.get('max_error_rate', 0.01):g}%; "
        "latency is timed from each call's scheduled send time.",
        _shoppers_text(results.get("shoppers")),
        "A server's max rate at p99 <= "
        f"{slo:g} ms counts only when every fixed step from the lowest rate up to it met the SLO. "
        "CPU per call: the server's process tree (or the generator's processes), user + system time "
        "read from /proc around each step, over the calls the step completed.",
        "",
        "## Servers",
        "",
        f"| server | max rate at p99 <= {slo:g} ms | p50 / p99 there (ms) | peak throughput "
        f"| p99 <= {search.get('tight_p99_ms', 5.0):g} ms at every step to "
        f"{search.get('tight_up_to', 200.0):g}/s | idle CPU ms/s | start-up | status |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for name, server in servers.items():
        if server.get("status") != "ok":
            lines.append(f"| {name} | - | - | - | - | - | - | failed: {_one_line(server.get('error'))} |")
            continue
        rate = server.get("slo_rate")
        at = step_at(server, rate)
        bound = " (lower bound)" if server.get("slo_rate_is_lower_bound") and rate else ""
        shown_rate = f"{_rate(rate)}{bound}" if rate else _no_slo_rate(server)
        lines.append(
            f"| {name} | {shown_rate} | {_lat(at, 'p50')} / {_lat(at, 'p99')} | "
            f"{_rate(server.get('peak_rate'))} | {_tight_text(server.get('tight_p99'))} | "
            f"{_ms((server.get('idle_cpu') or {}).get('server_ms_per_s'))} | "
            f"{server.get('startup_s', '-')} s | ok |"
        )
    lines += _targets(results, slo)
    lines += _cpu_table(servers)
    from loadtests import experiment_bench

    lines += experiment_bench.render(results)
    lines += ["## Steps", ""]
    for name, server in servers.items():
        if server.get("status") != "ok":
            continue
        lines += [
            f"### {name}",
            "",
            "| phase | offered /s | ok /s | p50 | p95 | p99 | p99.9 ms | errors by code | server CPU ms/call "
            "| generator CPU ms/call | paths | degraded | generator lag p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|",
        ]
        for step in all_steps(server):
            lat = step["latency_ms"]
            phase = step.get("phase", "") + (" (measured again)" if step.get("superseded") else "")
            lines.append(
                f"| {phase} | {step['offered_rate']:.0f} "
                f"| {step.get('achieved_rate') or 0:.0f} | "
                + " | ".join(_ms(lat.get(k)) for k in PERCENTILE_KEYS)
                + f" | {error_counts(step)} | {_cpu(step, 'server')} | {_cpu(step, 'generator')} "
                f"| {path_mix(step)} | {step.get('degraded', 0)} | "
                f"{_ms(step.get('send_lag_ms', {}).get('p99'))} |"
            )
        lines.append("")
    limited = [
        f"{name} at {step['offered_rate']:.0f}/s"
        for name, server in servers.items()
        for step in all_steps(server)
        if step.get("generator_limited")
    ]
    if limited:
        lines += [
            f"**Warning:** the generator itself ran late (send lag p99 > 2 ms) in {len(limited)} step(s) "
            f"({', '.join(limited)}): the machine was busy, and those figures overstate the server's "
            "latency. "
            "Re-run on a quiet machine before drawing conclusions.",
            "",
        ]
    lines += [
        "Generator lag is how late calls left the generator against their schedule; that time is "
        "counted in the latencies, and a large lag means the machine, not only the server, was saturated.",
        "",
        "Plots: " + ", ".join(f"[{f}]({f})" for f in PLOT_FILES),
        "",
    ]
    return "\n".join(lines)


def _targets(results: dict[str, Any], slo: float) -> list[str]:
    """The Targets table: every figure the issue states a target for, with met / not met."""
    servers: dict[str, Any] = results.get("servers", {})
    cfg = results.get("config", {})
    search = cfg.get("search", {})
    comparison = results.get("comparison", {})
    lines = ["", "## Targets", "", "| figure | this run | target | met |", "|---|---:|---:|---|"]
    real = servers.get("real") or {}
    if real.get("status") == "ok":
        rate = real.get("slo_rate")
        lowest = min((s["offered_rate"] for s in real.get("steps") or [] if s.get("fixed")), default=None)
        lines.append(
            f"| real: p99 <= {slo:g} ms at every fixed step from {_rate(lowest)} up to its max rate "
            f"| {_rate(rate) if rate else _no_slo_rate(real)} | a max rate exists | "
            f"{'met' if rate else 'not met'} |"
        )
        tight = real.get("tight_p99") or {}
        lines.append(
            f"| real: p99 <= {tight.get('p99_ms', search.get('tight_p99_ms', 5.0)):g} ms at every fixed step "
            f"up to {tight.get('up_to', search.get('tight_up_to', 200.0)):g}/s | {_tight_text(tight)} | "
            f"every step | {_met_flag(tight.get('held'))} |"
        )
    r_echo = comparison.get("real_over_echo_slo_rate")
    r_naive = comparison.get("real_over_naive_peak")
    lines.append(
        f"| real / echo, max rate at p99 <= {slo:g} ms | {_num(r_echo)} | >= 0.6 "
        f"| {_met_word(r_echo, 0.6, above=True)} |"
    )
    lines.append(
        f"| real / naive, peak throughput | {_num(r_naive)} | >= 5 | {_met_word(r_naive, 5.0, above=True)} |"
    )
    cpu = comparison.get("cpu_ms_per_call", {})
    for at in sorted({rate for per_rate in cpu.values() for rate in per_rate}, key=float):
        key = f"real_over_echo_cpu_at_{at}"
        if f"{key}_target" not in comparison:
            continue
        value, target = comparison.get(key), comparison.get(f"{key}_target")
        real_ms = (cpu.get("real") or {}).get(at)
        echo_ms = (cpu.get("echo") or {}).get(at)
        lines.append(
            f"| real / echo, server CPU per call at {at}/s ({_ms3(real_ms)} / {_ms3(echo_ms)} ms) "
            f"| {_num(value)} | <= {target:g} | {_met_word(value, target, above=False)} |"
        )
    if "real_w2_over_real_slo_rate" in comparison:
        lines.append(
            f"| real-w2 / real (2 vs 1 worker processes), max rate at p99 <= {slo:g} ms | "
            f"{_num(comparison.get('real_w2_over_real_slo_rate'))} | - | - |"
        )
        lines.append(
            f"| real-w2 / real, peak throughput | {_num(comparison.get('real_w2_over_real_peak'))} | - | - |"
        )
        lines.append(
            f"| real-w2 / echo (one echo process), max rate at p99 <= {slo:g} ms | "
            f"{_num(comparison.get('real_w2_over_echo_slo_rate'))} | - | - |"
        )
    lines += _experiment_ladder_targets(results, slo)
    confirm = real.get("target")
    if confirm:
        p99 = confirm["latency_ms"].get("p99")
        lines.append(
            f"| real p99 at its max rate again ({_rate(confirm['offered_rate'])}, the histogram's step) "
            f"| {_ms(p99)} | <= {slo:g} ms | {_met_word(p99, slo, above=False)} |"
        )
    at_naive = real.get("at_naive_peak")
    if at_naive:
        p99 = at_naive["latency_ms"].get("p99")
        lines.append(
            f"| real p99 at the naive server's peak rate ({_rate(at_naive['offered_rate'])}) | {_ms(p99)} | "
            f"<= {slo:g} ms | {_met_word(p99, slo, above=False)} |"
        )
    overload = real.get("overload")
    if overload:
        p99 = overload["latency_ms"].get("p99")
        factor = cfg.get("overload_factor", 1.5)
        errors = set(overload.get("errors", {}))
        shed = overload.get("errors", {}).get("RESOURCE_EXHAUSTED", 0)
        only_shed = errors <= {"RESOURCE_EXHAUSTED"}
        basis = (
            "max rate in the SLO"
            if real.get("overload_basis", "slo_rate") == "slo_rate"
            else "peak throughput (it never met the SLO)"
        )
        if real.get("overload_basis_rate"):
            basis += f" {_rate(real['overload_basis_rate'])}"
        lines += [
            f"| overload, {_rate(overload['offered_rate'])} = {factor:g}x the real server's {basis}: "
            f"p99 of served calls | {_ms(p99)} | <= {slo:g} ms | "
            f"{_met_word(p99, slo, above=False)} |",
            f"| overload: errors by code | {error_counts(overload)} | only RESOURCE_EXHAUSTED "
            f"| {'met' if only_shed else 'not met'} |",
            f"| overload: path mix of served calls | {path_mix(overload)} | | |",
            f"| overload: served / shed | {_rate(overload.get('achieved_rate'))} served, "
            f"{100 * shed / max(overload['scheduled'], 1):.1f}% shed | | |",
        ]
        if not errors:
            verdict = "Overload: no errors at all (nothing was shed), so none other than RESOURCE_EXHAUSTED."
        elif only_shed:
            verdict = f"Overload: the only errors were RESOURCE_EXHAUSTED ({error_counts(overload)})."
        else:
            verdict = f"Overload: errors other than RESOURCE_EXHAUSTED were seen ({error_counts(overload)})."
        lines += ["", verdict]
    return [*lines, ""]


def _experiment_ladder_targets(results: dict[str, Any], slo: float) -> list[str]:
    """The serving targets again for ``real-ab``, the real server with the A/B experiment on."""
    ab = results.get("servers", {}).get("real-ab")
    if not ab:
        return []
    if ab.get("status") != "ok":
        return [f"| real-ab (A/B experiment on) | failed: {_one_line(ab.get('error'))} | | |"]
    c = results.get("comparison", {})
    tight = ab.get("tight_p99") or {}
    rows = [
        f"| real-ab (A/B experiment on): max rate at p99 <= {slo:g} ms (real: "
        f"{_rate((results['servers'].get('real') or {}).get('slo_rate'))}) | "
        f"{_rate(ab.get('slo_rate')) if ab.get('slo_rate') else _no_slo_rate(ab)} | a max rate exists "
        f"| {'met' if ab.get('slo_rate') else 'not met'} |",
        f"| real-ab: p99 <= {tight.get('p99_ms', 5.0):g} ms at every fixed step up to "
        f"{tight.get('up_to', 200.0):g}/s | {_tight_text(tight)} | every step "
        f"| {_met_flag(tight.get('held'))} |",
        f"| real-ab / real, max rate at p99 <= {slo:g} ms "
        f"| {_num(c.get('real_ab_over_real_slo_rate'))} | - | - |",
        f"| real-ab / echo, max rate at p99 <= {slo:g} ms | {_num(c.get('real_ab_over_echo_slo_rate'))} "
        f"| >= 0.6 | {_met_word(c.get('real_ab_over_echo_slo_rate'), 0.6, above=True)} |",
        f"| real-ab / naive, peak throughput | {_num(c.get('real_ab_over_naive_peak'))} | >= 5 "
        f"| {_met_word(c.get('real_ab_over_naive_peak'), 5.0, above=True)} |",
    ]
    for at in sorted(
        (
            k.rsplit("_", 1)[1]
            for k in c
            if k.startswith("real_ab_over_echo_cpu_at_") and not k.endswith("_met")
        ),
        key=float,
    ):
        value, target = c.get(f"real_ab_over_echo_cpu_at_{at}"), c.get(f"real_over_echo_cpu_at_{at}_target")
        if target is not None:
            rows.append(
                f"| real-ab / echo, server CPU per call at {at}/s | {_num(value)} | <= {target:g} "
                f"| {_met_word(value, target, above=False)} |"
            )
    if "real_ab_overload_only_resource_exhausted" in c:
        only = c["real_ab_overload_only_resource_exhausted"]
        rows.append(
            f"| real-ab overload: errors by code | {error_counts(ab.get('overload') or {})} "
            f"| only RESOURCE_EXHAUSTED | {'met' if only else 'not met'} |"
        )
    return rows


def _cpu_table(servers: dict[str, Any]) -> list[str]:
    """CPU ms per call at every fixed rate: one column per server, the generator's beside it."""
    shown = [(n, s) for n, s in servers.items() if s.get("status") == "ok" and s.get("steps")]
    per_rate: dict[float, dict[str, dict[str, Any]]] = {}
    for name, server in shown:
        for step in server["steps"]:
            if step.get("fixed") and not step.get("superseded"):
                per_rate.setdefault(step["offered_rate"], {})[name] = step
    if not per_rate or not any(s.get("cpu") for steps in per_rate.values() for s in steps.values()):
        return []
    names = [n for n, _ in shown]
    lines = [
        "## CPU per call (ms, fixed steps)",
        "",
        "| offered /s | " + " | ".join(f"{n}: server | {n}: generator" for n in names) + " |",
        "|---:|" + "---:|---:|" * len(names),
    ]
    for rate in sorted(per_rate):
        cells = []
        for name in names:
            step = per_rate[rate].get(name)
            cells += [_cpu(step, "server"), _cpu(step, "generator")] if step else ["-", "-"]
        lines.append(f"| {rate:.0f} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def error_counts(step: dict[str, Any]) -> str:
    """``RESOURCE_EXHAUSTED 123 (12.3%), DEADLINE_EXCEEDED 1 (0.1%)`` or ``none``."""
    n = step.get("scheduled") or 0
    if not step.get("errors") or not n:
        return "none"
    parts = sorted(step["errors"].items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {count} ({100.0 * count / n:.1f}%)" for name, count in parts)


def _cpu(step: dict[str, Any] | None, who: str) -> str:
    return _ms3(((step or {}).get("cpu", {}).get(who) or {}).get("ms_per_call"))


def _schedule_text(search: dict[str, Any]) -> str:
    rates = search.get("rates")
    if not rates:
        return f"{search.get('step_s', '?')} s per step"
    listed = ", ".join(f"{r:g}" for r in rates)
    return (
        f"Fixed steps at {listed}/s, then x{search.get('step_factor', '?'):g} until saturation, each "
        f"max({search.get('step_s', '?'):g} s, {search.get('min_calls', '?')} calls) long"
    )


def _shoppers_text(shoppers: dict[str, Any] | None) -> str:
    if not shoppers:
        return "Users: given to the run (not checked against the feature store)."
    if not shoppers.get("checked_in_redis"):
        return f"Users: {shoppers.get('users', '?')} warm users of the source, not checked against Redis."
    median = shoppers.get("median_recent_items")
    return (
        f"Users: {shoppers.get('users', '?')} returning shoppers (of {shoppers.get('checked', '?')} "
        f"checked) with >= {shoppers.get('min_recent_items', '?')} recent items in the feature store, "
        f"median {'-' if median is None else f'{median:g}'} recent items."
    )


def _no_slo_rate(server: dict[str, Any]) -> str:
    fixed = sorted(
        (s for s in server.get("steps") or [] if s.get("fixed") and not s.get("superseded")),
        key=lambda s: s["offered_rate"],
    )
    if fixed and not fixed[0].get("slo_pass"):
        return f"none (missed at {fixed[0]['offered_rate']:g}/s)"
    return "none"


def _tight_text(tight: dict[str, Any] | None) -> str:
    if not tight or tight.get("held") is None:
        return "-"
    worst = f"worst p99 {_ms(tight.get('worst_p99_ms'))} ms at {tight.get('worst_at', 0):g}/s"
    return f"{'yes' if tight['held'] else 'no'} ({worst})"


# --- plots ---------------------------------------------------------------------------------------


def write_plots(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the PNG plots of :data:`PLOT_FILES` into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, draw in zip(
        PLOT_FILES, (_plot_latency_vs_rate, _plot_histogram, _plot_path_mix, _plot_cpu_per_call), strict=True
    ):
        fig = draw(results, plt)
        path = out / filename
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _ok_servers(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (n, s) for n, s in results.get("servers", {}).items() if s.get("status") == "ok" and s.get("steps")
    ]


def _plot_latency_vs_rate(results: dict[str, Any], plt: Any) -> Any:
    slo = results.get("slo_p99_ms", 10.0)
    servers = _ok_servers(results)
    fig, axes = plt.subplots(
        1, max(len(servers), 1), figsize=(5.2 * max(len(servers), 1), 4.2), sharey=True, squeeze=False
    )
    axes = axes[0]
    if not servers:
        _no_data(axes[0])
    for ax, (name, server) in zip(axes, servers, strict=False):
        steps = sorted(
            (s for s in server["steps"] if s.get("phase") in SEARCH_PHASES and not s.get("superseded")),
            key=lambda s: s["offered_rate"],
        )
        rates = [s["offered_rate"] for s in steps]
        for key, style in zip(PERCENTILE_KEYS, ("-o", "-s", "-^", "-v"), strict=True):
            values = [s["latency_ms"].get(key) for s in steps]
            pts = [(r, v) for r, v in zip(rates, values, strict=True) if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, markersize=4, label=key)
        overload = server.get("overload")
        if overload and overload["latency_ms"].get("p99") is not None:
            ax.plot(
                [overload["offered_rate"]],
                [overload["latency_ms"]["p99"]],
                "rX",
                markersize=10,
                label="p99 overload",
            )
        ax.axhline(slo, color="red", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
        if server.get("slo_rate"):
            ax.axvline(server["slo_rate"], color="gray", linestyle=":", linewidth=1, label="max rate in SLO")
        ax.set_yscale("log")
        ax.set_title(f"{name}: max {_rate(server.get('slo_rate'))} in SLO")
        ax.set_xlabel("offered rate (calls/s)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (ms, from scheduled send)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Rank latency percentiles vs offered rate (open loop)")
    return fig


def _plot_histogram(results: dict[str, Any], plt: Any) -> Any:
    slo = results.get("slo_p99_ms", 10.0)
    owner, rate = target_rate(results)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    drawn = False
    for name, server in _ok_servers(results):
        step = step_at(server, rate, target=name == owner)
        if step is None or not sum(step.get("histogram_ms", [])):
            continue
        counts = step["histogram_ms"]
        total = float(sum(counts))
        ax.stairs(
            [c / total for c in counts], HISTOGRAM_EDGES_MS, label=f"{name} at {step['offered_rate']:.0f}/s"
        )
        drawn = True
    if not drawn:
        _no_data(ax)
    else:
        used = [i for i, count in enumerate(_sum_histograms(results, rate)) if count]
        ax.set_xlim(HISTOGRAM_EDGES_MS[used[0]] / 1.5, max(HISTOGRAM_EDGES_MS[used[-1] + 1], slo) * 1.5)
    ax.axvline(slo, color="red", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, from scheduled send)")
    ax.set_ylabel("share of successful calls")
    title = f"Latency histogram at the target rate {_rate(rate)}" + (
        f" ({owner}'s max rate in SLO)" if owner else ""
    )
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def _plot_path_mix(results: dict[str, Any], plt: Any) -> Any:
    servers = _ok_servers(results)
    with_paths = [
        (n, s) for n, s in servers if any(set(st.get("paths", {})) - {"echo"} for st in all_steps(s))
    ]
    shown = with_paths or servers
    fig, axes = plt.subplots(
        1, max(len(shown), 1), figsize=(5.5 * max(len(shown), 1), 4.2), sharey=True, squeeze=False
    )
    axes = axes[0]
    if not shown:
        _no_data(axes[0])
    # One colour per path name across every panel.
    every_path = sorted({p for _, server in shown for s in all_steps(server) for p in s.get("paths", {})})
    palette = plt.get_cmap("tab10")
    colour = {p: palette(i % 10) for i, p in enumerate(every_path)}
    for ax, (name, server) in zip(axes, shown, strict=False):
        steps = sorted(
            (s for s in all_steps(server) if not s.get("superseded")), key=lambda s: s["offered_rate"]
        )
        names = sorted({p for s in steps for p in s.get("paths", {})})
        labels = [
            f"{s['offered_rate']:.0f}" + ("\noverload" if s.get("phase") == "overload" else "") for s in steps
        ]
        x = list(range(len(steps)))
        bottom = [0.0] * len(steps)
        for path_name in names:
            share = [s.get("paths", {}).get(path_name, 0) / max(s["scheduled"], 1) for s in steps]
            ax.bar(x, share, bottom=bottom, color=colour[path_name], label=f"served: {path_name}")
            bottom = [b + v for b, v in zip(bottom, share, strict=True)]
        shed = [s.get("errors", {}).get("RESOURCE_EXHAUSTED", 0) / max(s["scheduled"], 1) for s in steps]
        ax.bar(x, shed, bottom=bottom, color="black", label="shed (RESOURCE_EXHAUSTED)")
        bottom = [b + v for b, v in zip(bottom, shed, strict=True)]
        other = [max(0.0, 1.0 - b) for b in bottom]
        ax.bar(x, other, bottom=bottom, color="lightgray", hatch="//", label="other errors")
        degraded = [s.get("degraded", 0) / max(s["scheduled"], 1) for s in steps]
        if any(degraded):
            ax.plot(x, degraded, "k^--", markersize=5, label="degraded")
        ax.set_xticks(x, labels, fontsize=7, rotation=45)
        ax.set_xlabel("offered rate (calls/s)")
        ax.set_ylim(0, 1.05)
        ax.set_title(name)
    axes[0].set_ylabel("share of calls")
    legend: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(
            list(legend.values()),
            list(legend),
            fontsize=8,
            loc="upper center",
            ncol=4,
            bbox_to_anchor=(0.5, -0.1),
        )
    fig.suptitle("Compute path mix and shed rate vs load")
    return fig


def _plot_cpu_per_call(results: dict[str, Any], plt: Any) -> Any:
    """Server CPU ms per call against the offered rate, every server on one axis (solid), and the
    generator's own (dashed, same colour): the client's cost in plain view."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    palette = plt.get_cmap("tab10")
    drawn = False
    for i, (name, server) in enumerate(_ok_servers(results)):
        steps = sorted(
            (s for s in server["steps"] if s.get("phase") in SEARCH_PHASES and not s.get("superseded")),
            key=lambda s: s["offered_rate"],
        )
        for who, style in (("server", "-o"), ("generator", "--x")):
            pts = [
                (s["offered_rate"], s["cpu"][who]["ms_per_call"])
                for s in steps
                if (s.get("cpu", {}).get(who) or {}).get("ms_per_call") is not None
            ]
            if pts:
                label = name if who == "server" else f"{name}: generator"
                ax.plot(*zip(*pts, strict=True), style, color=palette(i % 10), markersize=4, label=label)
                drawn = True
    exp = results.get("experiments") or {}
    for j, (state, marker) in enumerate((("none", "s"), ("ab", "D"), ("shadow", "*"))):
        figures = (exp.get("states") or {}).get(state) or {}
        if exp.get("status") == "ok" and figures.get("cpu_ms_per_call") is not None:
            ax.plot(
                [exp["rate"]], [figures["cpu_ms_per_call"]], marker, color=palette((7 + j) % 10),
                markersize=8, label=f"experiment rounds: {state}",
            )  # fmt: skip
            drawn = True
    if not drawn:
        _no_data(ax)
    else:
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    if drawn:
        ax.set_yscale("log")  # the naive server costs ten times the others: keep them apart
    ax.set_xlabel("offered rate (calls/s)")
    ax.set_ylabel("CPU ms per completed call")
    ax.set_title("CPU time per call vs offered rate (server process tree; generator dashed)")
    ax.grid(True, which="both", alpha=0.3)
    return fig


def _sum_histograms(results: dict[str, Any], rate: float | None) -> list[int]:
    total = [0] * (len(HISTOGRAM_EDGES_MS) - 1)
    owner, _rate_unused = target_rate(results)
    for name, server in _ok_servers(results):
        step = step_at(server, rate, target=name == owner)
        for i, count in enumerate((step or {}).get("histogram_ms", [])):
            total[i] += count
    return total


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


# --- formatting ----------------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "-" if not value else f"{value:,.0f}/s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ms3(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _lat(step: dict[str, Any] | None, key: str) -> str:
    return "-" if step is None else _ms(step["latency_ms"].get(key))


def _met_word(value: float | None, bound: float, *, above: bool) -> str:
    """``met`` / ``not met`` for a figure that must be at least (``above``) or at most ``bound``."""
    if value is None:
        return "not measured"
    return "met" if (value >= bound if above else value <= bound) else "not met"


def _met_flag(held: bool | None) -> str:
    return "not measured" if held is None else ("met" if held else "not met")


def _load(values: list[float] | None) -> str:
    return "?" if not values else "/".join(f"{v:.2f}" for v in values)


def _one_line(text: str | None) -> str:
    return (text or "").splitlines()[0][:120].replace("|", "/") if text else ""
