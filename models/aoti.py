"""The served model compiled ahead of time: ``torch.export`` + AOTInductor, one graph for every path.

The three paths are one function of the batch: the cascade with a per-request head. A head of 0
is the light path (nothing re-scored), a head of every candidate is the full path, anything
between is the cascade. So one exported graph serves a whole micro-batch in one call, whatever
mix of routes it holds (:meth:`models.model.TwoPathRanker.cascade_top`).

Requests ``B``, candidates ``C``, history ``L`` and the batch's largest head ``h`` are dynamic
dimensions. ``h`` has to be a size (``topk`` takes it as one), so it travels as the length of a
small tensor (``head_slots``) rather than as data: a dimension stays symbolic through export,
a value read out of a tensor would not.

The package (``model.pt2``) is compiled at publish time into the version folder and checksummed
with the rest. Inductor generates code for the instruction set of the machine that compiles it,
so the version's config records the CPU flags the code needs; a server on a CPU without them (or
without a package) falls back to the TorchScript graphs of :mod:`models.compiled` with a warning.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.model import RankBatch, TwoPathRanker
from models.vocab import FIRST_ITEM_ROW

log = logging.getLogger(__name__)

PACKAGE = "model.pt2"
# Inductor's -m<flag> compiler options -> the /proc/cpuinfo flag that says a CPU runs such code.
_FLAG_ALIASES = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "amx-tile": "amx_tile",
                 "amx-bf16": "amx_bf16", "amx-int8": "amx_int8", "avxvnni": "avx_vnni"}  # fmt: skip
# Single-threaded kernels: a server computes one small batch per worker, one torch thread each,
# and OpenMP kernels would start a team of threads per call in whichever thread calls the graph
# (busy-waiting between regions), which is most of a call's CPU on two shared cores.
INDUCTOR_CONFIGS = {"cpp.threads": 1}
# Largest dimensions the graph accepts (the server caps candidates far lower).
MAX_REQUESTS = 4_096
MAX_CANDIDATES = 1 << 20


class ServedCascade(nn.Module):
    """``(hist B x L, user B x Fu, cand B x C, item B x C x Fi, head B, head_slots h) -> B x C`` scores."""

    def __init__(self, model: TwoPathRanker) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, hist: Tensor, user: Tensor, cand: Tensor, item: Tensor, head: Tensor, head_slots: Tensor
    ) -> Tensor:
        h = head_slots.shape[0]
        torch._check(h <= cand.shape[1])
        return self.model.cascade_top(RankBatch(hist, user, cand, item), head, h)


def head_slots(h: int) -> Tensor:
    """The tensor whose length carries the batch's largest head into the graph."""
    return torch.empty(h, dtype=torch.int8)


def _example(model: TwoPathRanker) -> tuple[Tensor, ...]:
    # General shapes (no axis 1 or equal to another), so export specialises no size.
    B, L, C, H = 3, 7, 23, 11
    rows = max(model.config.embedding.num_rows, FIRST_ITEM_ROW + 1)
    gen = torch.Generator().manual_seed(0)
    hist = torch.randint(FIRST_ITEM_ROW, rows, (B, L), generator=gen)
    hist[0, L // 2 :] = 0
    cand = torch.randint(FIRST_ITEM_ROW, rows, (B, C), generator=gen)
    cand[1, C - 2 :] = 0
    user = torch.rand(B, model.config.user_dense_dim, generator=gen)
    item = torch.rand(B, C, model.config.item_dense_dim, generator=gen)
    return hist, user, cand, item, torch.tensor([H, 5, 0]), head_slots(H)


def export(model: TwoPathRanker) -> torch.export.ExportedProgram:
    """The served model (eval mode, inference tables prepared) as one exported graph."""
    from torch.export import Dim

    model = model.eval()
    model.prepare_inference()
    b = Dim("requests", min=1, max=MAX_REQUESTS)
    history = Dim("history", min=1, max=model.config.light.history_len)
    c = Dim("candidates", min=2, max=MAX_CANDIDATES)
    h = Dim("head", min=1, max=MAX_CANDIDATES)
    shapes = ({0: b, 1: history}, {0: b}, {0: b, 1: c}, {0: b, 1: c}, {0: b}, {0: h})
    with torch.no_grad():
        return torch.export.export(ServedCascade(model), _example(model), dynamic_shapes=shapes, strict=False)


def required_cpu_flags() -> list[str]:
    """The /proc/cpuinfo flags the code Inductor generates on this machine needs."""
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    flags = []
    for option in str(isa.build_arch_flags() if isa else "").split():
        if option.startswith("-m") and not option.startswith("-march"):
            name = option[2:]
            flags.append(_FLAG_ALIASES.get(name, name.replace("-", "_")))
    return sorted(set(flags))


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def compiler_available() -> bool:
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def compile_package(model: TwoPathRanker, path: Path) -> dict[str, Any]:
    """Export and compile ``model`` into ``path``; returns what the version's config records.

    Raises when export or compilation fails (the caller falls back to TorchScript)."""
    if not compiler_available():
        raise RuntimeError("no C++ compiler on PATH (AOTInductor needs one)")
    started = time.perf_counter()
    program = export(model)
    exported = time.perf_counter()
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs=dict(INDUCTOR_CONFIGS)
        )
    done = time.perf_counter()
    check = verify_package(model, path)
    info = {
        "form": "aoti",
        "package": path.name,
        "torch": torch.__version__,
        "cpu_flags": required_cpu_flags(),
        "inductor_configs": dict(INDUCTOR_CONFIGS),
        "export_seconds": round(exported - started, 1),
        "compile_seconds": round(done - exported, 1),
        "max_abs_diff_vs_eager": check,
    }
    log.info(
        "compiled the served graph with AOTInductor (export %.1f s, compile %.1f s, max |diff| %.1e)",
        exported - started,
        done - exported,
        check,
    )
    return info


def verify_package(model: TwoPathRanker, path: Path, tolerance: float = 1e-4) -> float:
    """Run the package and the eager model on the export example: raise when they disagree."""
    runner = load(path)
    inputs = _example(model)
    with torch.inference_mode():
        got = runner(*inputs)
        want = model.cascade_top(RankBatch(*inputs[:4]), inputs[4], inputs[5].shape[0])
    diff = float((got - want).abs().max())
    if not diff <= tolerance:
        raise RuntimeError(f"the compiled graph disagrees with the eager model (max |diff| {diff:.2e})")
    return diff


class CompiledGraph:
    """A loaded package, called like :class:`ServedCascade` with six tensors -> the scores.

    Calls the package's runner directly: the generic wrapper re-parses the graph's input and
    output specs from JSON and walks them on every call, which at serving sizes costs about as
    much as the graph itself."""

    def __init__(self, path: Path) -> None:
        # Two runners: two batch workers may call the graph at once without waiting for each other.
        self._package = torch._inductor.aoti_load_package(str(path), num_runners=2)
        self._run = self._package.loader.boxed_run

    def __call__(self, *inputs: Tensor) -> Tensor:
        return self._run(list(inputs))[0]


def load(path: Path) -> CompiledGraph:
    """The compiled graph of a package."""
    return CompiledGraph(path)


def usable_here(info: dict[str, Any]) -> str | None:
    """None when a package described by ``info`` runs on this machine, else why not."""
    if info.get("form") != "aoti":
        return "the version holds no AOTInductor package"
    if info.get("torch") != torch.__version__:
        return f"compiled with torch {info.get('torch')}, this is torch {torch.__version__}"
    missing = sorted(set(info.get("cpu_flags", ())) - cpu_flags())
    if missing:
        return f"compiled for CPU features this CPU lacks: {', '.join(missing)}"
    return None
