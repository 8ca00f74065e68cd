"""Versioned model artifacts (docs/CONTRACT.md section 6): write atomically, list, verify and load.

A version is a folder ``<models_dir>/<version>/`` (versions sort by name: ``vYYYYMMDD-HHMMSS``); the
folder name is the version's one identity (served, compared and reported), whatever ``config.json``
records:

* ``weights.fp32.pt`` / ``weights.int8.pt``: plain state dicts of tensors (``torch.save``), loaded
  with ``torch.load(weights_only=True)``: nothing is unpickled but tensors;
* ``vocab.json``: the item ids, in embedding-row order; ``catalogue.npz``: every item's counters
  at the end of training (``item_stats``, candidate generation) and whether it may be recommended
  (``recommendable``, :mod:`recstack.catalogue`), one row per embedding row, read with
  ``allow_pickle=False``;
* ``config.json``: everything needed to rebuild the model (model, router and feature settings,
  training run); ``metrics.json``: the evaluation; reports (``report.md``, ``training_curve.png``);
* ``MANIFEST.sha256``: ``<sha256>  <file>`` for every other file, checked before anything is read.

Publication writes into ``<models_dir>/.tmp-<version>`` and renames it into place, so a reader
never sees half a version.

``<models_dir>/DEFAULT`` (optional) names the version to serve: hot reload honours it before "the
newest valid version" (:func:`write_default`, written by ``recstack experiment promote``). Without
it the newest valid version is served, as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.inference import Ranker
from models.model import RankerConfig, TwoPathRanker
from models.quantize import (
    RETIRED_DENSE_RUNTIMES,
    SERVED_DENSE_RUNTIME,
    build_int8_model,
    quantize_state_dict,
)
from models.router import PathRouter, RouterConfig
from models.vocab import FIRST_ITEM_ROW, ItemVocab
from recstack.catalogue import is_recommendable

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.sha256"
CONFIG = "config.json"
METRICS = "metrics.json"
VOCAB = "vocab.json"
CATALOGUE = "catalogue.npz"
WEIGHTS_FP32 = "weights.fp32.pt"
WEIGHTS_INT8 = "weights.int8.pt"
SERVED_FORMS = ("aoti", "torchscript")
REQUIRED = (CONFIG, VOCAB, CATALOGUE, WEIGHTS_FP32, WEIGHTS_INT8)
TMP_PREFIX = ".tmp-"
DEFAULT_POINTER = "DEFAULT"
log = logging.getLogger(__name__)
_VERSION_RE = re.compile(r"^v\d{8}-\d{6}(-\d+)?$")


class ArtifactError(Exception):
    """A model version that cannot be served: missing file, checksum mismatch, unreadable weights."""


def new_version_name(now: float | None = None) -> str:
    return time.strftime("v%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))


def list_versions(models_dir: str | Path) -> list[Path]:
    """Version folders that look complete (a name ``vYYYYMMDD-HHMMSS[-N]`` and a manifest), oldest first.

    In-progress ``.tmp-*`` folders are ignored; whether a version really loads is
    :func:`load_version`'s job.
    """
    root = Path(models_dir)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name) and (p / MANIFEST).is_file()
    ]
    return sorted(found, key=_version_key)


def read_default(models_dir: str | Path) -> str | None:
    """The version the ``DEFAULT`` pointer names (stripped text), or None when there is no pointer.

    Whether it names a complete, valid version is the reader's check (the watcher refuses it
    otherwise and keeps what it serves)."""
    try:
        text = (Path(models_dir) / DEFAULT_POINTER).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{Path(models_dir) / DEFAULT_POINTER}: cannot read: {exc}") from None
    return text.strip()


def write_default(models_dir: str | Path, version: str) -> Path:
    """Point ``DEFAULT`` at ``version`` atomically (a temporary file renamed over it, both fsynced).

    Refuses (ArtifactError naming the reason) a version that is not a complete folder of
    ``models_dir`` or whose manifest does not verify: the pointer never names what a server would
    refuse. Readers see the old pointer or the new one, never half a file."""
    root = Path(models_dir)
    if not _VERSION_RE.match(version) or version not in {p.name for p in list_versions(root)}:
        raise ArtifactError(f"version {version!r} is not a complete model version in {root}")
    verify_manifest(root / version)
    tmp = root / f"{TMP_PREFIX}{DEFAULT_POINTER}-{os.getpid()}"
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(version + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / DEFAULT_POINTER)
    _fsync_dir(root)
    return root / DEFAULT_POINTER


def _version_key(path: Path) -> tuple[str, int]:
    suffix = path.name[17:]  # "vYYYYMMDD-HHMMSS" is 16 characters; "-N" may follow
    return path.name[:16], int(suffix) if suffix.isdigit() else 0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    lines = [
        f"{sha256_file(p)}  {p.name}\n"
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    ]
    (folder / MANIFEST).write_text("".join(lines))


def verify_manifest(folder: Path, required: tuple[str, ...] = REQUIRED) -> dict[str, str]:
    """Check every file the manifest lists (and that the ``required`` ones are listed), or raise
    ArtifactError."""
    manifest = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not a model version folder")
    if not manifest.is_file():
        raise ArtifactError(f"{folder}: {MANIFEST} is missing")
    sums: dict[str, str] = {}
    for lineno, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest) or "/" in name or name in ("", ".", ".."):
            raise ArtifactError(f"{manifest}:{lineno}: malformed line {line[:100]!r}")
        sums[name] = digest
    for name in required:
        if name not in sums:
            raise ArtifactError(f"{folder}: {name} is not listed in {MANIFEST}")
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{folder}: {name} is listed in {MANIFEST} but missing")
        got = sha256_file(path)
        if got != digest:
            raise ArtifactError(
                f"{folder}: checksum mismatch for {name} (manifest {digest[:12]}…, file {got[:12]}…)"
            )
    return sums


def publish_version(
    models_dir: str | Path,
    model: TwoPathRanker,
    vocab: ItemVocab,
    catalogue_stats: np.ndarray,
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    extra_files: Callable[[Path], None] | None = None,
    version: str | None = None,
    served_form: str | None = None,
) -> Path:
    """Write a complete version into ``.tmp-<version>``, then rename it into place. Returns its folder.

    ``config`` is the run's description (training settings, router, runtime); the model's own
    config and the artifact format are added here. ``extra_files(folder)`` may write reports
    before the manifest is computed.

    ``served_form`` (default ``$RECSTACK_SERVED_FORM``, else ``aoti``): ``aoti`` also compiles the
    served int8 model ahead of time into ``model.pt2`` (:mod:`models.aoti`; about half a minute),
    ``torchscript`` leaves the server to trace it at load. Where compiling fails (no C++
    compiler, say) the version is published without a package and says so in its config.
    """
    served_form = served_form or os.environ.get("RECSTACK_SERVED_FORM") or "aoti"
    if served_form not in SERVED_FORMS:
        raise ValueError(f"served_form must be one of {SERVED_FORMS}, got {served_form!r}")
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    version = version or new_version_name()
    final = root / version
    suffix = 0
    while final.exists():
        suffix += 1
        final = root / f"{version}-{suffix}"
    version = final.name
    tmp = root / f"{TMP_PREFIX}{version}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, tmp / WEIGHTS_FP32)
        qstate = quantize_state_dict(state)
        torch.save(qstate, tmp / WEIGHTS_INT8)
        (tmp / VOCAB).write_text(json.dumps(vocab.item_ids))
        np.savez(
            tmp / CATALOGUE,
            item_stats=np.asarray(catalogue_stats, dtype=np.float32),
            recommendable=vocab.recommendable_rows(),
        )
        full_config = dict(config)
        full_config.update(format_version=FORMAT_VERSION, version=version, model=model.config.to_dict())
        full_config.setdefault("router", RouterConfig().to_dict())
        full_config.setdefault("int8_dense_runtime", SERVED_DENSE_RUNTIME)
        full_config["served"] = _compile_served(model.config, qstate, tmp, served_form)
        (tmp / CONFIG).write_text(json.dumps(full_config, indent=2, sort_keys=True))
        if metrics is not None:
            write_metrics(tmp, metrics)
        if extra_files is not None:
            extra_files(tmp)
        write_manifest(tmp)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _compile_served(config: Any, qstate: dict[str, torch.Tensor], folder: Path, form: str) -> dict[str, Any]:
    """The served graph's record in config.json (and ``model.pt2`` in ``folder`` for ``aoti``)."""
    if form != "aoti":
        return {"form": "torchscript", "reason": "published without an AOTInductor package"}
    from models import aoti

    int8 = build_int8_model(config, qstate, "fp32")
    try:
        return aoti.compile_package(int8, folder / aoti.PACKAGE)
    except Exception as exc:  # any failure to compile means "serve TorchScript", never "no version"
        log.warning("AOTInductor compilation failed (%s); the version will be served as TorchScript", exc)
        (folder / aoti.PACKAGE).unlink(missing_ok=True)
        return {"form": "torchscript", "reason": f"AOTInductor compilation failed: {exc}"[:500]}


def write_metrics(folder: Path, metrics: dict[str, Any]) -> None:
    (folder / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_config(version_dir: str | Path) -> dict[str, Any]:
    path = Path(version_dir) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: cannot read: {exc}") from None
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported artifact format {config.get('format_version')!r}")
    return config


def load_state(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for a broken file; all mean "refuse it"
        raise ArtifactError(f"{path}: cannot load weights: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{path}: not a state dict of tensors")
    return state


def load_model(
    version_dir: str | Path,
    device: str = "cpu",
    quantized: bool = True,
    verify: bool = True,
    dense_runtime: str | None = None,
) -> tuple[TwoPathRanker, ItemVocab, dict[str, Any], np.ndarray]:
    """-> (model in eval mode, vocabulary, config, catalogue stats). Verifies the manifest first.

    ``dense_runtime`` (int8 only) overrides the version's ``int8_dense_runtime`` (benchmarks)."""
    folder = Path(version_dir)
    if verify:
        verify_manifest(folder)
    config = read_config(folder)
    try:
        item_ids = [str(i) for i in json.loads((folder / VOCAB).read_text())]
        with np.load(folder / CATALOGUE, allow_pickle=False) as data:
            catalogue = np.asarray(data["item_stats"], dtype=np.float32)
            stored = np.asarray(data["recommendable"]) if "recommendable" in data.files else None
        vocab = ItemVocab(item_ids, _recommendable(folder, item_ids, stored))
        model_config = RankerConfig.from_dict(config["model"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{folder}: cannot read vocabulary, catalogue or model config: {exc}") from None
    if model_config.embedding.num_rows != len(vocab) or catalogue.shape[0] != len(vocab):
        raise ArtifactError(f"{folder}: vocabulary ({len(vocab)} rows), catalogue and model config disagree")
    try:
        if quantized:
            qstate = load_state(folder / WEIGHTS_INT8, device)
            runtime = dense_runtime or config.get("int8_dense_runtime", "fp32")
            if runtime in RETIRED_DENSE_RUNTIMES:
                log.warning("%s: int8 dense runtime %s was retired; using fp32 dense layers", folder, runtime)
                runtime = "fp32"
            model = build_int8_model(model_config, qstate, runtime)
        else:
            model = TwoPathRanker(model_config)
            model.load_state_dict(load_state(folder / WEIGHTS_FP32, device), strict=True)
    except ArtifactError:
        raise
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ArtifactError(f"{folder}: weights do not fit the model config: {exc}") from None
    return model.to(device).eval(), vocab, config, catalogue


def _recommendable(folder: Path, item_ids: list[str], stored: np.ndarray | None) -> np.ndarray:
    """Each item's flag: what the version stored, and never an item the definition in force names
    a service line (a code added to the list later applies to older versions too). Versions
    published before the flag existed get the definition alone."""
    definition = np.fromiter((is_recommendable(i) for i in item_ids), dtype=bool, count=len(item_ids))
    if stored is None:
        return definition
    if stored.dtype != np.bool_ or stored.shape != (len(item_ids) + FIRST_ITEM_ROW,):
        raise ArtifactError(
            f"{folder}: {CATALOGUE}: recommendable must be {len(item_ids) + FIRST_ITEM_ROW} booleans "
            f"(one per row), got {stored.dtype} {stored.shape}"
        )
    return stored[FIRST_ITEM_ROW:] & definition


def load_version(
    version_dir: str | Path, device: str = "cpu", quantized: bool = True, dense_runtime: str | None = None
) -> Ranker:
    """Verify the manifest, rebuild the model (int8 when ``quantized``) and return a :class:`Ranker`.

    Raises :class:`ArtifactError` with the reason when the version must not be served.
    """
    folder = Path(version_dir)
    kind = _kind(folder)
    if kind == "popularity":  # a baseline without weights, served alike (models.popularity)
        from models.popularity import load_popularity

        return load_popularity(folder)  # type: ignore[return-value]
    if kind != "two_path":
        raise ArtifactError(f"{folder}: {CONFIG}: unknown kind {kind!r} (two_path or popularity)")
    model, vocab, config, catalogue = load_model(folder, device, quantized, dense_runtime=dense_runtime)
    runtime = dense_runtime or config.get("int8_dense_runtime", "fp32")
    served = _served_graph(folder, config) if quantized and runtime == "aoti" else None
    try:
        router = PathRouter(RouterConfig(**config.get("router", {})))
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder}: bad router config: {exc}") from None
    trained_as = config.get("version")
    if trained_as is not None and str(trained_as) != folder.name:
        log.info(
            "model version %s was published as %s (config.json); its folder name wins",
            folder.name,
            trained_as,
        )
    return Ranker(
        model,
        vocab,
        config,
        # The folder name is the version's one identity (what the watcher compares and responses report).
        version=folder.name,
        router=router,
        catalogue_stats=catalogue,
        device=device,
        quantized=quantized,
        compiled=quantized and runtime in ("torchscript", "aoti"),
        served=served,
    )


def _kind(folder: Path) -> str:
    """The version's ``kind`` (a trained ``two_path`` model unless config.json says otherwise).
    Only picks the loader: whichever loader it picks verifies the manifest, config.json included."""
    try:
        kind = json.loads((folder / CONFIG).read_text()).get("kind", "two_path")
    except (OSError, ValueError, AttributeError):
        return "two_path"  # the trained loader reports what is wrong
    return str(kind)


def _served_graph(folder: Path, config: dict[str, Any]) -> Any:
    """The version's AOTInductor graph, or None (with a warning) where it cannot run here."""
    from models import aoti

    info = config.get("served") or {}
    why_not = aoti.usable_here(info)
    if why_not is None and not (folder / aoti.PACKAGE).is_file():
        why_not = f"{aoti.PACKAGE} is missing"
    if why_not is None:
        try:
            return aoti.load(folder / aoti.PACKAGE)
        except Exception as exc:  # a package that does not load is served as TorchScript
            why_not = f"{aoti.PACKAGE} does not load: {exc}"
    log.warning("%s: serving TorchScript graphs instead of the compiled package: %s", folder.name, why_not)
    return None
