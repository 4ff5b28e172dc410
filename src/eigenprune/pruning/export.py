"""Export an MLP to ONNX (optional extra: `pip install 'eigenprune[onnx]'`).

The graph is written directly with `onnx.helper`, not traced: each linear layer becomes a Gemm
(y = x W^T + b) and each activation its ONNX operator, with a dynamic batch dimension. Spectral
layers are exported as the dense weight they compute.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eigenprune.core.io import atomic_write
from eigenprune.core.layers import SpectralLinear
from eigenprune.core.structure import as_sequential

OPSET = 17


class ExportError(ValueError):
    """A model or environment that cannot produce an ONNX file, stated in one line."""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the optional extra: pip install 'eigenprune[onnx]'") from None
    return onnx


def to_onnx(model: nn.Module, input_name: str = "x", output_name: str = "y"):
    """The MLP as an `onnx.ModelProto`: input [batch, n_in] float32, output [batch, n_out] float32."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    chain = as_sequential(model)
    nodes, inits = [], []
    current, n_in, n_out = input_name, None, None
    for i, m in enumerate(chain):
        out = f"h{i}"
        if isinstance(m, (nn.Linear, SpectralLinear)):
            n_in = m.in_features if n_in is None else n_in
            n_out = m.out_features
            w = m.weight.detach().cpu().float()
            bias = m.bias.detach().cpu().float() if m.bias is not None else torch.zeros(m.out_features)
            inits += [numpy_helper.from_array(w.numpy(), f"w{i}"), numpy_helper.from_array(bias.numpy(), f"b{i}")]
            nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out], transB=1))
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            continue
        elif isinstance(m, nn.ReLU):
            nodes.append(helper.make_node("Relu", [current], [out]))
        elif isinstance(m, nn.Tanh):
            nodes.append(helper.make_node("Tanh", [current], [out]))
        elif isinstance(m, nn.Sigmoid):
            nodes.append(helper.make_node("Sigmoid", [current], [out]))
        elif isinstance(m, nn.LeakyReLU):
            nodes.append(helper.make_node("LeakyRelu", [current], [out], alpha=float(m.negative_slope)))
        elif isinstance(m, nn.ELU):
            nodes.append(helper.make_node("Elu", [current], [out], alpha=float(m.alpha)))
        elif isinstance(m, nn.GELU) and m.approximate == "none":  # x * (1 + erf(x / sqrt 2)) / 2
            consts = [f"c{i}_{k}" for k in range(3)]
            inits += [numpy_helper.from_array(np.array(v, dtype=np.float32), c) for v, c in zip((2**-0.5, 1.0, 0.5), consts)]
            nodes += [helper.make_node("Mul", [current, consts[0]], [f"u{i}"]), helper.make_node("Erf", [f"u{i}"], [f"e{i}"]),
                      helper.make_node("Add", [f"e{i}", consts[1]], [f"v{i}"]), helper.make_node("Mul", [current, f"v{i}"], [f"m{i}"]),
                      helper.make_node("Mul", [f"m{i}", consts[2]], [out])]
        elif isinstance(m, nn.SiLU):
            nodes += [helper.make_node("Sigmoid", [current], [f"s{i}"]), helper.make_node("Mul", [current, f"s{i}"], [out])]
        else:
            raise ExportError(f"cannot export {m} to ONNX; supported: Linear, SpectralLinear, ReLU, Tanh, "
                              "Sigmoid, LeakyReLU, ELU, SiLU, GELU (exact), Identity, Dropout")
        current = out
    if n_in is None:
        raise ExportError("the model has no linear layer to export")
    nodes.append(helper.make_node("Identity", [current], [output_name]))
    graph = helper.make_graph(
        nodes, "eigenprune-mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", n_out])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="eigenprune")
    onnx.checker.check_model(proto)
    return proto


def check_onnx(model: nn.Module, blob: bytes, rtol: float = 1e-4, rows: int = 257) -> float:
    """Run the serialized ONNX model `blob` with onnxruntime on `rows` seeded random inputs and compare it
    with `model` in float32; returns the max relative difference (max |onnx - torch| / max |torch|).

    `ExportError` if an output is not finite or the difference exceeds `rtol`; skipped (returns NaN)
    when onnxruntime is not installed.
    """
    try:
        import onnxruntime
    except ImportError:
        return float("nan")
    session = onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])
    n_in = session.get_inputs()[0].shape[1]
    x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = copy.deepcopy(model).float()(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    if not (torch.isfinite(want).all() and torch.isfinite(got).all()):
        raise ExportError("the model's outputs on random inputs are not finite (NaN or inf); not writing an ONNX file")
    scale = float(want.abs().max())
    diff = float((got - want).abs().max()) / (scale if scale > 0 else 1.0)
    if not diff <= rtol:
        raise ExportError(f"onnxruntime and torch disagree: max relative difference {diff:.3g} > {rtol:g}; not writing an ONNX file")
    return diff


def export_onnx(model: nn.Module, path: str | Path, rtol: float = 1e-4) -> tuple[Path, float]:
    """Write `model` (any MLP `as_sequential` reads) to `path` as ONNX, only after checking it (see `check_onnx`).

    Returns the path and the checked max relative difference. Nothing is written if a check fails.
    """
    blob = to_onnx(model).SerializeToString()
    diff = check_onnx(model, blob, rtol)
    return atomic_write(path, blob), diff


def is_onnx_export(path: str | Path) -> bool:
    """Whether `path` is an ONNX file eigenprune wrote (producer name "eigenprune")."""
    onnx = _onnx()
    try:
        return onnx.load(str(path), load_external_data=False).producer_name == "eigenprune"
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
