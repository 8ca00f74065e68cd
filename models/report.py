"""Human-readable outputs of a training run: the training curve (PNG) and the quality report (Markdown),
plus the target checks that both the report and ``metrics.json`` carry."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from models.train import TrainHistory

# DESIGN.md "Targets" that a training run can check by itself.
POPULARITY_MULTIPLE = 1.3
RELATIVE_TOLERANCE = 0.01
MIN_COMPUTE_REDUCTION = 0.40
MIN_SIZE_RATIO = 3.5
MAX_RETRAIN_SECONDS = 300.0


def training_curve(history: TrainHistory, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = np.arange(1, len(history.step_loss) + 1)
    for name, values in (("light (+ distillation)", history.step_light), ("full", history.step_full)):
        if values:
            window = max(1, len(values) // 50)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, label=f"{name} path loss")
    if history.epoch_loss:
        per_epoch = len(history.step_loss) / len(history.epoch_loss)
        ax2 = ax.twinx()
        ax2.plot(
            np.arange(1, len(history.epoch_loss) + 1) * per_epoch,
            history.epoch_loss,
            "k.--",
            label="epoch mean (light + full)",
        )
        ax2.set_ylabel("epoch mean loss")
        ax2.legend(loc="upper center")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy over the catalogue")
    ax.set_title(f"training ({history.seconds:.0f} s, {history.world_size} process(es))")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


SERVED_FORM_TOLERANCE = 0.005  # the compiled graph must rank as the eager int8 model does


def check_targets(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets this run can judge, each with its figure, its bar and whether it was met."""
    checks: list[dict[str, Any]] = []
    quality = metrics.get("quality", {})
    if quality.get("evaluated"):
        model, base = quality["model"], quality["baselines"]
        served = model["int8"]["routed"]["ndcg@10"]
        pop = base["popularity"]["ndcg@10"]
        best_name, best = max(((n, b["ndcg@10"]) for n, b in base.items()), key=lambda x: x[1])
        checks.append(
            _check(
                "routed int8 NDCG@10 >= 1.3x popularity",
                served,
                POPULARITY_MULTIPLE * pop,
                f"{served:.4f} vs popularity {pop:.4f} ({served / pop:.2f}x)" if pop else f"{served:.4f}",
            )
        )
        checks.append(
            _check(
                "routed int8 NDCG@10 above every baseline",
                served,
                best,
                f"{served:.4f} vs best baseline {best_name} {best:.4f}",
                strict=True,
            )
        )
        for path in ("light", "full", "routed"):
            f32, i8 = model["fp32"][path]["ndcg@10"], model["int8"][path]["ndcg@10"]
            rel = (i8 - f32) / f32 if f32 else 0.0
            checks.append(
                _check(
                    f"{path}: int8 NDCG@10 within 1% of fp32",
                    rel,
                    -RELATIVE_TOLERANCE,
                    f"int8 {i8:.4f} vs fp32 {f32:.4f} ({rel:+.2%})",
                )
            )
        full, routed = model["int8"]["full"]["ndcg@10"], served
        rel = (routed - full) / full if full else 0.0
        checks.append(
            _check(
                "routed NDCG@10 within 1% of always-full",
                rel,
                -RELATIVE_TOLERANCE,
                f"routed {routed:.4f} vs always-full {full:.4f} ({rel:+.2%})",
            )
        )
        for key, comp in quality["compute"].items():
            checks.append(
                _check(
                    f"routed compute >= 40% below always-full ({key.replace('_', ' ')})",
                    comp["reduction"],
                    MIN_COMPUTE_REDUCTION,
                    f"{comp['reduction']:.0%} less",
                )
            )
    served_form = metrics.get("served_form", {})
    if served_form.get("evaluated") and served_form.get("ndcg@10_relative_diff") is not None:
        diff = served_form["ndcg@10_relative_diff"]
        checks.append(
            _check(
                "served form (AOTInductor) routed NDCG@10 within 0.5% of eager int8",
                -diff,
                -SERVED_FORM_TOLERANCE,
                f"{served_form['ndcg@10']:.4f} vs {served_form['eager_int8_ndcg@10']:.4f} ({diff:.3%})",
            )
        )
    sizes = metrics.get("sizes", {})
    if sizes:
        checks.append(
            _check(
                "int8 artifact >= 3.5x smaller than fp32",
                sizes["ratio"],
                MIN_SIZE_RATIO,
                f"{sizes['weights_int8_bytes']:,} vs {sizes['weights_fp32_bytes']:,} bytes "
                f"({sizes['ratio']:.2f}x)",
            )
        )
    seconds = metrics.get("training", {}).get("total_seconds")
    if seconds is not None:
        checks.append(_check("retrain <= 5 min", -seconds, -MAX_RETRAIN_SECONDS, f"{seconds:.0f} s"))
    return checks


def _check(name: str, value: float, bar: float, figure: str, strict: bool = False) -> dict[str, Any]:
    met = (value > bar if strict else value >= bar) if not math.isnan(value) else False
    return {"target": name, "met": bool(met), "figure": figure}


def quality_markdown(metrics: dict[str, Any]) -> str:
    """The report written next to the artifact."""
    lines = [f"# Model {metrics.get('version', '')}: quality report", ""]
    data = metrics.get("data", {})
    training = metrics.get("training", {})
    if data:
        lines += [
            f"Trained on {data.get('train_events', 0):,} events from {data.get('train_first_ts')} to "
            f"{data.get('train_last_ts')} (only events before `--until` {data.get('until')}); "
            f"{data.get('items_in_vocab', 0):,} items in the vocabulary, "
            f"{data.get('contexts', 0):,} training contexts; "
            f"{data.get('duplicate_event_ids', 0):,} duplicate event ids dropped.",
            "",
        ]
    if training:
        lines += [
            f"Training: {training.get('epochs')} epochs in {training.get('train_seconds', 0):.0f} s "
            f"({training.get('world_size', 1)} process(es), {training.get('threads')} thread(s) each); "
            f"whole run {training.get('total_seconds', 0):.0f} s.",
            "",
        ]
    quality = metrics.get("quality", {})
    if not quality.get("evaluated"):
        lines += [f"No evaluation: {quality.get('reason', 'no evaluation set')}.", ""]
    else:
        lines += [
            f"Evaluation: {quality['users']:,} users with an interaction at or after the cut "
            f"({quality['cold_users']:,} of them cold: no history before it). Target: the items of each "
            "user's next instant after the cut (Online Retail: their next invoice); features as at the cut; "
            "full ranking over every item of the vocabulary.",
            "",
            "| model | path | precision | HR@10 | NDCG@10 | warm NDCG@10 | cold NDCG@10 "
            "| NDCG vs popularity |",
            "|---|---|---|---|---|---|---|---|",
        ]
        pop = quality["baselines"]["popularity"]["ndcg@10"]
        for name, row in quality["baselines"].items():
            lines.append(_row(f"baseline: {name}", "-", "fp32", row, pop))
        for precision in ("fp32", "int8"):
            for path in ("light", "full", "routed"):
                lines.append(_row("two-path ranker", path, precision, quality["model"][precision][path], pop))
        lines.append("")
        lines += [
            "| compute per request (multiply-adds) | candidates | cascade head | always-full | routed | "
            "reduction |",
            "|---|---|---|---|---|---|",
        ]
        for key, comp in quality["compute"].items():
            lines.append(
                f"| {key.replace('_', ' ')} | {comp['candidates']:,} | {comp['cascade_head']} | "
                f"{comp['always_full_macs']:,.0f} | {comp['routed_macs']:,.0f} | {comp['reduction']:.0%} |"
            )
        lines.append("")
    sizes = metrics.get("sizes")
    if sizes:
        lines += [
            f"Weights: fp32 {sizes['weights_fp32_bytes']:,} bytes, "
            f"int8 {sizes['weights_int8_bytes']:,} bytes ({sizes['ratio']:.2f}x smaller).",
            "",
        ]
    latency = metrics.get("latency_ms")
    if latency:
        lines += [
            "Forward latency (one `rank_batch` call, p50 ms, 100 candidates per request, "
            f"{latency.get('threads', 1)} torch thread):",
            "",
            "| precision | path | " + " | ".join(f"{b} req" for b in latency["batch_sizes"]) + " |",
            "|---|---|" + "---|" * len(latency["batch_sizes"]),
        ]
        for precision in ("fp32", "int8"):
            for path, per_batch in latency.get(precision, {}).items():
                cells = " | ".join(f"{per_batch[str(b)]['p50_ms']:.2f}" for b in latency["batch_sizes"])
                lines.append(f"| {precision} | {path} | {cells} |")
        lines.append("")
    checks = metrics.get("targets", [])
    if checks:
        lines += ["## Targets", "", "| target | met | figure |", "|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['target']} | {'yes' if c['met'] else '**MISSED**'} | {c['figure']} |")
        lines.append("")
    return "\n".join(lines)


def _row(name: str, path: str, precision: str, row: dict[str, float], pop: float) -> str:
    ratio = f"{row['ndcg@10'] / pop:.2f}x" if pop else "-"
    return (
        f"| {name} | {path} | {precision} | {row['hr@10']:.4f} | {row['ndcg@10']:.4f} | "
        f"{row['warm_ndcg@10']:.4f} | {row['cold_ndcg@10']:.4f} | {ratio} |"
    )
