"""The ``recstack train`` and ``recstack evaluate`` jobs: event logs in, a published, evaluated
model version out (or an evaluation of an existing one).

Under ``torchrun`` every rank reads the logs and trains on its share of each epoch; rank 0 alone
evaluates, quantizes and publishes.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from models import artifacts, data, evaluate, latency, report
from models.inference import Ranker
from models.model import ItemEmbeddingConfig, RankerConfig, TwoPathRanker
from models.quantize import SERVED_DENSE_RUNTIME, build_int8_model, quantize_state_dict
from models.router import PathRouter, RouterConfig
from models.train import TrainConfig, fit, warm_start
from recstack.errors import UserError

log = logging.getLogger(__name__)

SOURCE_WORDS = ("onlineretail", "otto", "synthetic", "synthetic-storefront")


@dataclass
class TrainJob:
    events: list[str]
    out: Path
    until: str | None = None  # None: now (every event in the logs)
    eval_until: str | None = None
    init_from: Path | None = None
    train: TrainConfig | None = None
    embedding_dim: int = 64
    min_item_count: int = 2
    threads: int = 0  # 0: torch's default, at most 2 per process
    synthetic_events: int = 100_000
    bench: bool = True
    progress: bool = True


def load_events(sources: list[str], synthetic_events: int = 100_000, seed: int = 0) -> pd.DataFrame:
    """``--events`` values (words or paths, mixed) -> one event frame."""
    from recstack import sources as src

    if not sources:
        raise UserError("--events: give at least one event log or one of " + ", ".join(SOURCE_WORDS))
    frames: list[pd.DataFrame] = []
    paths: list[str | Path] = []
    for value in sources:
        if value in SOURCE_WORDS:
            frames.append(
                src.load_source(
                    value, limit=synthetic_events if value.startswith("synthetic") else None, seed=seed
                )
            )
        else:
            if not Path(value).exists():
                raise UserError(
                    f"--events: {value} is neither an event log nor one of {', '.join(SOURCE_WORDS)}"
                )
            paths.append(value)
    if paths:
        frames.append(src.load_event_log(paths))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _threads(requested: int) -> int:
    """Torch threads per process. Automatic is one: the model's ops are small, and on a shared
    2-core machine a second thread made training 2-8x *slower* (threads waiting on each other
    while other processes hold the cores); to use more cores, run more processes (torchrun)."""
    if requested < 0:
        raise UserError("--threads: must be zero (automatic) or more")
    return requested or 1


def _sizes(model: TwoPathRanker) -> dict[str, Any]:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fp32, int8 = io.BytesIO(), io.BytesIO()
    torch.save(state, fp32)
    torch.save(quantize_state_dict(state), int8)
    a, b = len(fp32.getvalue()), len(int8.getvalue())
    return {"weights_fp32_bytes": a, "weights_int8_bytes": b, "ratio": round(a / b, 3)}


def _ranker(
    model: TwoPathRanker, built: data.TrainingData, router: RouterConfig, version: str, quantized: bool
) -> Ranker:
    return Ranker(
        model, built.vocab, {}, version, PathRouter(router), built.catalogue_stats, quantized=quantized
    )


def bench_latency(fp32: Ranker, int8: Ranker, quick: bool = True) -> dict[str, Any]:
    """Per path, fp32 and int8, one torch thread (the server's setting), 100 candidates per request."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        min_seconds, min_reps = (0.1, 5) if quick else (0.5, 20)
        out: dict[str, Any] = {"threads": 1, "candidates": 100, "batch_sizes": list(latency.BATCH_SIZES)}
        out.update(latency.measure({"fp32": fp32, "int8": int8}, min_seconds=min_seconds, min_reps=min_reps))
    finally:
        torch.set_num_threads(threads)
    return out


def run_train(job: TrainJob) -> Path | None:
    """Train, evaluate, quantize and publish. Returns the new version's folder (None on ranks > 0)."""
    started = time.perf_counter()
    cfg = job.train or TrainConfig()
    until_ms = data.parse_until(job.until) if job.until else int(time.time() * 1000)
    eval_until_ms = data.parse_until(job.eval_until, "--eval-until") if job.eval_until else None
    if eval_until_ms is not None and eval_until_ms <= until_ms:
        raise UserError("--eval-until: must be later than --until")
    threads = _threads(job.threads)
    torch.set_num_threads(threads)
    old = None
    if job.init_from is not None:
        try:
            old_model, old_vocab, _, _ = artifacts.load_model(job.init_from, quantized=False)
        except artifacts.ArtifactError as exc:
            raise UserError(f"--init-from: {exc}") from None
        old = (old_model, old_vocab)

    events = load_events(job.events, job.synthetic_events, cfg.seed)
    log.info("building training data from %d events", len(events))
    built = data.build(events, until_ms, eval_until_ms, min_item_count=job.min_item_count)
    del events
    log.info("data: %s", data.describe_span(built))

    torch.manual_seed(cfg.seed)
    model_config = RankerConfig(ItemEmbeddingConfig(num_rows=len(built.vocab), dim=job.embedding_dim))
    if old is not None and old[0].config.embedding.dim != job.embedding_dim:
        raise UserError(
            f"--init-from: that version has embedding width {old[0].config.embedding.dim}, "
            f"this run {job.embedding_dim}"
        )
    model = TwoPathRanker(model_config)
    carried = 0
    if old is not None:
        carried = warm_start(model, built.vocab, old[0].state_dict(), old[1])
        log.info(
            "warm start from %s: %d of %d item rows carried over",
            job.init_from,
            carried,
            len(built.vocab.item_ids),
        )
    history = fit(model, built, cfg, progress=job.progress)

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank != 0:
        _finish_distributed()
        return None

    router = RouterConfig()
    int8 = build_int8_model(model_config, quantize_state_dict(model.state_dict()), SERVED_DENSE_RUNTIME)
    log.info("evaluating (model per path, fp32 and int8, and baselines)")
    quality = evaluate.quality_report(built, model, int8, router, seed=cfg.seed)
    version = artifacts.new_version_name()
    metrics: dict[str, Any] = {
        "version": version,
        "protocol": "per user with an interaction at/after --until (guests excluded): the items of the "
        "user's next instant after the cut; features at the cut; full ranking over the vocabulary",
        "data": built.summary,
        "quality": quality,
        "sizes": _sizes(model),
        "router": router.to_dict(),
    }
    if quality.get("evaluated"):
        served = quality["model"]["int8"]["routed"]
        metrics["served"] = {"precision": "int8", "path": "routed"}
        metrics["hr@10"], metrics["ndcg@10"] = served["hr@10"], served["ndcg@10"]
    if job.bench:
        fp32_ranker = _ranker(model, built, router, version, quantized=False)
        int8_ranker = _ranker(int8, built, router, version, quantized=True)
        metrics["latency_ms"] = bench_latency(fp32_ranker, int8_ranker)
    metrics["training"] = {
        **cfg.to_dict(),
        "train_seconds": round(history.seconds, 1),
        "world_size": history.world_size,
        "threads": threads,
        "warm_start_from": str(job.init_from) if job.init_from else None,
        "warm_start_item_rows": carried,
        "epoch_loss": [round(x, 4) for x in history.epoch_loss],
    }
    config = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "trained_until": data.ms_to_rfc3339(until_ms),
        "events": job.events,
        "data": built.summary,
        "router": router.to_dict(),
        "int8_dense_runtime": SERVED_DENSE_RUNTIME,
        "features": _feature_settings(),
        "training": metrics["training"],
    }

    def write_reports(folder: Path) -> None:
        served = _served_quality(folder, built, router, quality)
        if served is not None:
            metrics["served_form"] = served
        metrics["training"]["total_seconds"] = round(time.perf_counter() - started, 1)
        metrics["targets"] = report.check_targets(metrics)
        report.training_curve(history, folder / "training_curve.png")
        (folder / "report.md").write_text(report.quality_markdown(metrics))
        artifacts.write_metrics(folder, metrics)

    folder = artifacts.publish_version(
        job.out, model, built.vocab, built.catalogue_stats, config, extra_files=write_reports, version=version
    )
    _finish_distributed()
    return folder


def _served_quality(
    folder: Path, built: Any, router: RouterConfig, quality: dict[str, Any]
) -> dict[str, Any] | None:
    """The compiled package's own quality (models.aoti), against the eager int8 model's, when the
    version holds one: the form the servers run is the one the figures describe."""
    from models import aoti

    package = folder / aoti.PACKAGE
    if not quality.get("evaluated") or not package.is_file():
        return None
    log.info("evaluating the compiled served graph (%s)", aoti.PACKAGE)
    reference = quality["model"]["int8"]["routed"]
    result = evaluate.served_form_quality(aoti.load(package), built, router, reference)
    result["form"] = "aoti"
    return result


def _feature_settings() -> dict[str, Any]:
    from feature_store import spec

    return {
        "recent_items": spec.RECENT_ITEMS_MAX,
        "trending_half_life_s": spec.TRENDING_HALF_LIFE_S,
        "trending_weights": {kind: float(w) for kind, w in spec.EVENT_WEIGHTS.items()},
        "user_dense": "log1p(views, add_to_carts, purchases), log1p(hours since last event), "
        "no-last-event flag",
        "item_dense": "log1p(views, add_to_carts, purchases, trending)",
    }


def _finish_distributed() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def resolve_version(path: Path) -> Path:
    """A version folder, or a models folder (-> its newest version)."""
    if (path / artifacts.MANIFEST).is_file():
        return path
    versions = artifacts.list_versions(path)
    if not versions:
        raise UserError(f"--model: {path} is neither a model version nor a folder of versions")
    return versions[-1]


def run_evaluate(
    model_dir: Path,
    events: list[str],
    until: str | None,
    eval_until: str | None,
    threads: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a saved version on a split of the given logs (baselines trained on the same split)."""
    torch.set_num_threads(_threads(threads))
    folder = resolve_version(model_dir)
    try:
        fp32, vocab, config, _ = artifacts.load_model(folder, quantized=False)
        int8, _, _, _ = artifacts.load_model(folder, quantized=True, verify=False)  # the served form
    except artifacts.ArtifactError as exc:
        raise UserError(f"--model: {exc}") from None
    until_text = until or config.get("trained_until")
    if not until_text:
        raise UserError("--until: required (the model does not record where its training stopped)")
    until_ms = data.parse_until(until_text)
    trained_until = config.get("trained_until")
    if trained_until and until_ms < data.parse_until(trained_until):
        log.warning(
            "--until %s is before the model's training cut %s: the model has seen part of the "
            "evaluation period",
            until_text,
            trained_until,
        )
    eval_until_ms = data.parse_until(eval_until, "--eval-until") if eval_until else None
    built = data.build(load_events(events, seed=seed), until_ms, eval_until_ms, vocab=vocab)
    router = RouterConfig(**config.get("router", {}))
    quality = evaluate.quality_report(built, fp32, int8, router, seed=seed)
    return {
        "version": folder.name,
        "until": data.ms_to_rfc3339(until_ms),
        "data": built.summary,
        "quality": quality,
        "targets": report.check_targets({"quality": quality}),
    }


def dumps(metrics: dict[str, Any]) -> str:
    return json.dumps(metrics, indent=2, sort_keys=True, default=artifacts._json_default)
