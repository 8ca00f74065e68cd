"""INT8 storage and the int8 model.

Every weight matrix (item embeddings, projections, MLP layers) and the per-item bias are stored as
int8 with float32 scales (per row; one for the bias vector), which makes the served weight file
3.5-4x smaller than fp32. What runs, chosen by measurement on this CPU (``benchmarks/model_bench.py``,
figures in docs/MODEL.md), one torch thread, 100-12,800 candidate rows per forward:

* item table: int8 rows, dequantized once at load into the per-item inference table
  (:meth:`~models.model.TwoPathRanker.prepare_inference`): gathering and rescaling int8 rows per
  request was 2x slower than fp32 gathers for a cache-resident table. Catalogues whose table would
  pass 256 MB keep the int8 table at run time (:class:`~models.model.Int8ItemEmbedding`), where the
  smaller memory traffic wins;
* every dense layer: the int8 weights dequantized once at load (weight-only int8, fp32 arithmetic),
  run as the version's compiled graph (``aoti``, else ``torchscript``). ``torch.ao`` dynamic int8
  was slower than fp32 below ~3,000 rows; ONNX Runtime int8 lost to the compiled graph at every
  batch size and idle gap measured and was retired (docs/MODEL.md, "Served form").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.model import Int8ItemEmbedding, InteractionMLP, RankerConfig, TwoPathRanker

QSUFFIX = ".q"
SSUFFIX = ".scale"
# "aoti": the int8 weights dequantized once at load (weight-only int8), and every path run as the
# version's AOTInductor graph (models.aoti), compiled when it was published; where the version has
# none that runs on this machine, as "torchscript": the same weights, every path a traced
# TorchScript graph (models.compiled). The other runtimes run the paths eagerly.
DENSE_RUNTIMES = ("fp32", "torch-dynamic", "torchscript", "aoti")
# Runtimes of earlier releases that a published version may still name (int8_dense_runtime):
# loading one runs its dense layers in fp32 instead (the weights are the same).
RETIRED_DENSE_RUNTIMES = ("onnxruntime-int8", "onnxruntime-fp32")
# What a new version is served with: fastest at equal quality in benchmarks/model_bench.py
# (docs/MODEL.md, "Served form").
SERVED_DENSE_RUNTIME = "aoti"
LONG_VECTOR = 1024  # vectors at least this long (one value per item) are stored int8 too


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``R x ...`` float -> (int8 same shape, float32 ``R`` scales), symmetric per row."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(flat / safe.unsqueeze(1)), -127, 127).to(torch.int8)
    return q.reshape(weight.shape), scale.contiguous()


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    if q.dim() == 1:  # a vector quantized with one scale
        return q.to(torch.float32) * scale
    shape = [q.shape[0]] + [1] * (q.dim() - 1)
    return q.to(torch.float32) * scale.reshape(shape)


def quantize_vector(vector: Tensor) -> tuple[Tensor, Tensor]:
    """``N`` float -> (int8 ``N``, float32 scale of shape ``1``), symmetric, one scale."""
    q, scale = quantize_rows(vector.detach().float().reshape(1, -1))
    return q.reshape(-1), scale


def quantize_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """fp32 state dict -> int8 storage form: each tensor of 2+ dims becomes ``name.q`` + ``name.scale``
    (a scale per row); long vectors (the per-item bias) get one scale; small tensors stay fp32."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.dim() >= 2:
            q, scale = quantize_rows(tensor)
            out[name + QSUFFIX], out[name + SSUFFIX] = q, scale
        elif tensor.is_floating_point() and tensor.dim() == 1 and tensor.numel() >= LONG_VECTOR:
            q, scale = quantize_vector(tensor)
            out[name + QSUFFIX], out[name + SSUFFIX] = q, scale
        else:
            out[name] = tensor.detach().clone()
    return out


def dequantize_state_dict(qstate: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`quantize_state_dict` (up to rounding)."""
    out: dict[str, Tensor] = {}
    for name, tensor in qstate.items():
        if name.endswith(SSUFFIX) and name[: -len(SSUFFIX)] + QSUFFIX in qstate:
            continue
        if name.endswith(QSUFFIX):
            base = name[: -len(QSUFFIX)]
            out[base] = dequantize_rows(tensor, qstate[base + SSUFFIX])
        else:
            out[name] = tensor
    return out


def build_int8_model(
    config: RankerConfig, qstate: dict[str, Tensor], dense_runtime: str = "fp32"
) -> TwoPathRanker:
    """The served int8 model from an int8 state dict: int8 item table, dense layers per ``dense_runtime``."""
    model = TwoPathRanker(config)
    dense = dequantize_state_dict(qstate)
    model.load_state_dict(dense, strict=True)
    model.items = Int8ItemEmbedding(
        qstate["items.weight" + QSUFFIX], qstate["items.weight" + SSUFFIX], dense["items.bias"]
    )
    model.eval()
    return with_dense_runtime(model, dense_runtime)


def with_dense_runtime(model: TwoPathRanker, dense_runtime: str) -> TwoPathRanker:
    """Run the interaction MLP (the only GEMMs big enough for int8 kernels to pay) on ``dense_runtime``."""
    if dense_runtime not in DENSE_RUNTIMES:
        raise ValueError(f"dense_runtime must be one of {DENSE_RUNTIMES}, got {dense_runtime!r}")
    if dense_runtime == "torch-dynamic":
        model.mlp = TorchDynamicMLP(model.mlp)  # type: ignore[assignment]  # same interface
    return model


class TorchDynamicMLP(nn.Module):
    """The interaction MLP with ``torch.ao`` dynamic int8 on its stacked layers (kept for comparison)."""

    def __init__(self, mlp: InteractionMLP) -> None:
        super().__init__()
        self.inner = mlp
        self.dim = mlp.dim
        self.rest = torch.ao.quantization.quantize_dynamic(mlp.rest, {nn.Linear}, dtype=torch.qint8)

    def item_hidden(self, cand_emb: Tensor) -> Tensor:
        return self.inner.item_hidden(cand_emb)

    def forward(self, attended, cand_emb, item_hidden, item_dense, rep, user) -> Tensor:
        inner, D = self.inner, self.dim
        W = inner.pair_in.weight
        h = attended @ W[:, :D].T + (attended * cand_emb) @ W[:, D : 2 * D].T + item_hidden
        h = h + item_dense @ W[:, 3 * D : -1].T + rep.unsqueeze(-1) * W[:, -1]
        h = h + (inner.user_in(user) + inner.pair_in.bias).unsqueeze(1)
        return self.rest(h).squeeze(-1)


def fake_int8(model: TwoPathRanker) -> TwoPathRanker:
    """A copy of ``model`` rebuilt through int8 storage (what the served artifact computes)."""
    return build_int8_model(model.config, quantize_state_dict(model.state_dict()))
