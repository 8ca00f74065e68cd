"""The full path's interaction MLP on ONNX Runtime, int8 (the served dense runtime) or fp32.

``benchmarks/model_bench.py`` measured this MLP on this CPU (one thread): ONNX Runtime's
``DynamicQuantizeMatMul`` (int8 weights per output column, activations quantized per call) ran
1.3-4.5x faster than torch fp32 from 100 to 12,800 rows, where torch's own ``quantize_dynamic`` was
slower than fp32 below ~3,000 rows. The graph is written by a small protobuf encoder below, so the
``onnx`` package is not needed; ``onnxruntime`` only runs it.

Graph: ``x [n, 2D + Fi + 1]`` (attended history, its product with the candidate, the candidate's
counters, the repeat signal) and ``extra [n, H1]`` (the per-item and per-user blocks of the first
layer, computed in torch from tables) -> first layer + ReLU -> ... -> ``y [n, 1]``.
"""

from __future__ import annotations

import struct

import numpy as np
import torch
from torch import Tensor, nn

from models.model import InteractionMLP

ONNX_FLOAT, ONNX_INT8 = 1, 3
_IR_VERSION = 8
_OPSET = 17


# -- protobuf wire format, just what an ONNX ModelProto needs -----------------------------------
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(raw)) + raw


def _float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def tensor_proto(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims (1), data_type (2), name (8), raw_data (9)."""
    dtype = {np.dtype(np.float32): ONNX_FLOAT, np.dtype(np.int8): ONNX_INT8}[array.dtype]
    body = b"".join(_int(1, d) for d in array.shape) + _int(2, dtype) + _bytes(8, name)
    return body + _bytes(9, np.ascontiguousarray(array).tobytes())


def value_info(name: str, dims: list[int | str]) -> bytes:
    """ValueInfoProto of a float tensor; string dims are symbolic (dynamic)."""
    shape = b"".join(_bytes(1, _bytes(2, d) if isinstance(d, str) else _int(1, d)) for d in dims)
    tensor_type = _int(1, ONNX_FLOAT) + _bytes(2, shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: float | int) -> bytes:
    body = b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs) + _bytes(4, op)
    if domain:
        body += _bytes(7, domain)
    for name, value in attrs.items():
        if isinstance(value, float):
            body += _bytes(5, _bytes(1, name) + _float(2, value) + _int(20, 1))
        else:
            body += _bytes(5, _bytes(1, name) + _int(3, value) + _int(20, 2))
    return body


def model_proto(
    nodes: list[bytes],
    initializers: list[bytes],
    inputs: list[bytes],
    outputs: list[bytes],
    name: str = "graph",
) -> bytes:
    graph = b"".join(_bytes(1, n) for n in nodes) + _bytes(2, name)
    graph += b"".join(_bytes(5, t) for t in initializers)
    graph += b"".join(_bytes(11, i) for i in inputs) + b"".join(_bytes(12, o) for o in outputs)
    opsets = _bytes(8, _bytes(1, "") + _int(2, _OPSET)) + _bytes(8, _bytes(1, "com.microsoft") + _int(2, 1))
    return _int(1, _IR_VERSION) + _bytes(2, "recstack") + opsets + _bytes(7, graph)


def mlp_graph(weights: list[np.ndarray], biases: list[np.ndarray], int8: bool, extra: bool) -> bytes:
    """Linear/ReLU stack ``x [n, in] -> y [n, out]``; ``extra [n, H1]`` is added before the first ReLU.

    ``weights[k]``: ``out x in`` (torch layout). int8: symmetric per output column, zero point 0.
    """
    nodes, inits = [], []
    current = "x"
    for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
        out = f"h{k}"
        if int8:
            scale = np.maximum(np.abs(w).max(axis=1) / 127.0, 1e-12).astype(np.float32)
            q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8).T.copy()
            inits += [
                tensor_proto(f"w{k}", q),
                tensor_proto(f"s{k}", scale),
                tensor_proto(f"z{k}", np.zeros(len(scale), np.int8)),
                tensor_proto(f"b{k}", b),
            ]
            nodes.append(
                node(
                    "DynamicQuantizeMatMul",
                    [current, f"w{k}", f"s{k}", f"z{k}", f"b{k}"],
                    [out],
                    domain="com.microsoft",
                )
            )
        else:
            inits += [tensor_proto(f"w{k}", np.ascontiguousarray(w.T)), tensor_proto(f"b{k}", b)]
            nodes.append(node("Gemm", [current, f"w{k}", f"b{k}"], [out]))
        current = out
        if k == 0 and extra:
            nodes.append(node("Add", [current, "extra"], ["h0e"]))
            current = "h0e"
        if k < len(weights) - 1:
            nodes.append(node("Relu", [current], [f"r{k}"]))
            current = f"r{k}"
    nodes.append(node("Identity", [current], ["y"]))
    inputs = [value_info("x", ["n", weights[0].shape[1]])]
    if extra:
        inputs.append(value_info("extra", ["n", weights[0].shape[0]]))
    return model_proto(nodes, inits, inputs, [value_info("y", ["n", weights[-1].shape[0]])], name="mlp")


def session(model_bytes: bytes, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


class OnnxInteractionMLP(nn.Module):
    """Drop-in for :class:`~models.model.InteractionMLP` at inference: same weights, same inputs,
    the GEMMs on ONNX Runtime. The per-item block (:meth:`item_hidden`, tabled at load) and the
    per-user block stay in torch: they are computed once per item or user, not per candidate."""

    def __init__(self, mlp: InteractionMLP, int8: bool = True, threads: int = 1) -> None:
        super().__init__()
        self.inner = mlp.eval()
        self.dim = mlp.dim
        D = mlp.dim
        w0 = mlp.pair_in.weight.detach().float()
        linears = [m for m in mlp.rest if isinstance(m, nn.Linear)]
        weights = [torch.cat([w0[:, : 2 * D], w0[:, 3 * D :]], dim=1)] + [
            m.weight.detach().float() for m in linears
        ]
        biases = [mlp.pair_in.bias.detach().float()] + [m.bias.detach().float() for m in linears]
        self.int8 = int8
        model_bytes = mlp_graph([w.numpy() for w in weights], [b.numpy() for b in biases], int8, extra=True)
        # One session, created now rather than on the first request; its run() is thread-safe.
        self._session = session(model_bytes, threads)

    def item_hidden(self, cand_emb: Tensor) -> Tensor:
        return self.inner.item_hidden(cand_emb)

    def forward(
        self,
        attended: Tensor,
        cand_emb: Tensor,
        item_hidden: Tensor,
        item_dense: Tensor,
        rep: Tensor,
        user: Tensor,
    ) -> Tensor:
        B, C, _ = attended.shape
        x = torch.cat([attended, attended * cand_emb, item_dense, rep.unsqueeze(-1)], dim=2).reshape(
            B * C, -1
        )
        extra = (item_hidden + self.inner.user_in(user).unsqueeze(1)).reshape(B * C, -1)
        y = self._session.run(
            None,
            {
                "x": x.detach().float().contiguous().numpy(),
                "extra": extra.detach().float().contiguous().numpy(),
            },
        )[0]
        return torch.from_numpy(y).reshape(B, C)
