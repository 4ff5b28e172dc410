"""Export to ONNX (optional extra: `pip install 'eigenprune[onnx]'`).

MLPs (`to_onnx`, `export_onnx`): the graph is written directly with `onnx.helper`, not traced: each
linear layer becomes a Gemm (y = x W^T + b) and each activation its ONNX operator, with a dynamic
batch dimension. Any other `nn.Module` (a pruned CNN, residual net, transformer): `export_module_onnx`
traces it with `torch.onnx.export` and checks the file against torch with onnxruntime. Spectral
layers are exported as the plain weight they compute.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eigenprune.core.errors import EigenpruneError
from eigenprune.core.io import atomic_write, check_output, first_line
from eigenprune.core.layers import SpectralLinear
from eigenprune.core.structure import as_sequential, input_tuple, unwrap_parallel

OPSET = 17


class ExportError(EigenpruneError, ValueError):
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


_NUMPY_OF = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
"""The numpy dtype onnxruntime takes for an input the ONNX graph declares with this type."""


def check_rtol(rtol: float) -> float:
    """`rtol` if it is a finite number >= 0; else ExportError (a NaN tolerance would pass or fail everything)."""
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not (math.isfinite(rtol) and rtol >= 0):
        raise ExportError(f"rtol must be a finite number >= 0 (e.g. 1e-4), got {rtol!r}")
    return float(rtol)


def _precision_hint(model: nn.Module, rtol: float) -> str:
    """Why `rtol` may be out of reach for a model with half-precision parameters ('' otherwise)."""
    low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)})
    if not low:
        return ""
    eps = max(torch.finfo(getattr(torch, d)).eps for d in low)
    return (f" (the model holds {' and '.join(low)} parameters, precise to about {eps:.2g}: an rtol below about {10 * eps:.2g} "
            "is likely out of reach; pass a larger rtol, or convert the model to float32 first)") if rtol < 10 * eps else ""


def _with_rows(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """`inputs`, unless one of them has no rows (then nothing would be compared, and any file would pass)."""
    for i, t in enumerate(inputs):
        if t.dim() and t.shape[0] == 0:
            raise ExportError(f"example_inputs[{i}] has no rows (shape {list(t.shape)}): the ONNX file is checked against "
                              "torch on these inputs; give at least one")
    return inputs


def check_onnx(onnx_model: bytes | str | Path, model: nn.Module, example_inputs, rtol: float = 1e-4) -> float:
    """Run an ONNX model (serialized bytes or a file) with onnxruntime on `example_inputs` (a tensor or a tuple
    of tensors) and compare it with `model` in torch, in float32 (integer inputs, e.g. an nn.Embedding's indices,
    stay integers; each input goes to onnxruntime in the type the ONNX graph declares).

    Returns the largest relative difference, max |onnx - torch| / max |torch| per output. `ExportError` if
    onnxruntime is missing, an output is not finite (NaN or inf), or the difference exceeds `rtol` (with a hint
    when the model's float16/bfloat16 precision cannot meet it).
    """
    rtol = check_rtol(rtol)
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("checking ONNX needs onnxruntime: pip install 'eigenprune[onnx]'") from None
    inputs = _with_rows(input_tuple(example_inputs, ExportError))
    source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    try:
        session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
        feeds = {}
        for i, t in zip(session.get_inputs(), inputs):
            array = t.detach().cpu().float().numpy() if t.dtype == torch.bfloat16 else t.detach().cpu().numpy()  # numpy has no bfloat16
            feeds[i.name] = array.astype(_NUMPY_OF.get(i.type, array.dtype), copy=False)
        got = session.run(None, feeds)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own kinds; all mean "it cannot run this on these inputs"
        raise ExportError(f"onnxruntime cannot run the ONNX model on example_inputs of shape {[list(t.shape) for t in inputs]}: "
                          f"{type(err).__name__}: {first_line(err)}") from None
    try:
        with torch.no_grad():
            want = copy.deepcopy(model).float().eval()(*(t.float() if t.is_floating_point() else t for t in inputs))
    except Exception as err:  # noqa: BLE001 - any failure means these inputs do not fit this model
        raise ExportError(f"example_inputs of shape {[list(t.shape) for t in inputs]} do not fit {type(model).__name__}: "
                          f"{type(err).__name__}: {first_line(err)}") from None
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    if len(got) != len(want):
        raise ExportError(f"the ONNX model has {len(got)} output(s), the torch model {len(want)}; not writing an ONNX file")
    worst = 0.0
    for g, w in zip(got, want):
        g, w = torch.from_numpy(g).float(), w.detach().cpu().float()
        if not (torch.isfinite(w).all() and torch.isfinite(g).all()):
            raise ExportError("the model's outputs are not finite (NaN or inf) on the check inputs; not writing an ONNX file")
        scale = float(w.abs().max()) if w.numel() else 0.0
        diff = float((g - w).abs().max()) / (scale if scale > 0 else 1.0) if w.numel() else 0.0
        if not diff <= rtol:
            raise ExportError(f"onnxruntime and torch disagree: max relative difference {diff:.3g} > rtol {rtol:g}"
                              f"{_precision_hint(model, rtol)}; not writing an ONNX file")
        worst = max(worst, diff)
    return worst


def export_onnx(model: nn.Module, path: str | Path, rtol: float = 1e-4, overwrite: bool = False) -> tuple[Path, float]:
    """Write `model` (any MLP `as_sequential` reads) to `path` as ONNX, only after onnxruntime reproduced it on
    257 seeded random inputs (see `check_onnx`). Returns the path and that max relative difference.
    An existing `path` is refused unless `overwrite` and eigenprune wrote it (`core.io.check_output`)."""
    rtol = check_rtol(rtol)
    path = check_output(path, force=overwrite, ours=is_onnx_export, option="path", kind="an ONNX file")
    proto = to_onnx(model)
    blob = proto.SerializeToString()
    n_in = proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    diff = check_onnx(blob, model, torch.randn(257, n_in, generator=torch.Generator().manual_seed(0)), rtol)
    return atomic_write(path, blob), diff


def is_onnx_export(path: str | Path) -> bool:
    """Whether `path` is an ONNX file eigenprune wrote (producer name "eigenprune")."""
    onnx = _onnx()
    try:
        return onnx.load(str(path), load_external_data=False).producer_name == "eigenprune"
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


# --- Any nn.Module, traced by torch.onnx.export -----------------------------------------------------


def export_module_onnx(
    model: nn.Module, example_inputs, path: str | Path, *, dynamic_batch: bool = True, overwrite: bool = False,
    rtol: float = 1e-4,
) -> Path:
    """Write any `nn.Module` (e.g. one `prune_nodes` pruned) to `path` as ONNX with `torch.onnx.export`; returns the path.

    Spectral layers are exported as the plain layers they compute (a copy is despectralized; `model`
    is not modified; a `DataParallel` wrapper is exported as its module). Inputs are named x0, x1, ..., outputs
    y0, y1, ...: `forward` must return a tensor or a tuple/list of tensors (a dict is refused: its keys would
    be lost). The ONNX inputs have the example inputs' dtypes (integer indices of an `nn.Embedding` stay
    int64); with `dynamic_batch` the first dimension of every input is dynamic. The file is written only
    after onnxruntime reproduced torch on `example_inputs` within `rtol` (`check_onnx`); else `ExportError`
    and nothing is left. An existing `path` is refused unless `overwrite` and eigenprune wrote it
    (`core.io.check_output`).
    """
    from eigenprune.core.convert import despectralize

    onnx = _onnx()
    rtol = check_rtol(rtol)
    path = check_output(path, force=overwrite, ours=is_onnx_export, option="path", kind="an ONNX file")
    inputs = _with_rows(input_tuple(example_inputs, ExportError))
    plain = despectralize(copy.deepcopy(unwrap_parallel(model))).eval()
    name = type(plain).__name__
    traced = tuple(torch.cat([t, t]) if dynamic_batch and t.dim() and t.shape[0] == 1 else t for t in inputs)
    names = [f"x{i}" for i in range(len(inputs))]
    try:
        with torch.no_grad():
            outputs = plain(*inputs)
    except Exception as err:  # noqa: BLE001 - any failure means these inputs do not fit this model
        shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
        raise ExportError(f"example_inputs ({shapes}) do not fit {name}: {type(err).__name__}: {first_line(err)}") from None
    if not (isinstance(outputs, torch.Tensor) or (
            isinstance(outputs, (tuple, list)) and outputs and all(isinstance(o, torch.Tensor) for o in outputs))):
        kind = f"a {type(outputs).__name__}" + (" holding non-tensors" if isinstance(outputs, (tuple, list)) else "")
        raise ExportError(f"{name}.forward returns {kind}; export_module_onnx exports a tensor or a tuple of tensors "
                          "(wrap the model so that forward returns, e.g., a tuple in a fixed order)")
    n_out = 1 if isinstance(outputs, torch.Tensor) else len(outputs)
    dynamic = tuple({0: torch.export.Dim("batch")} if t.dim() else {} for t in traced) if dynamic_batch else None

    def write(tmp: Path) -> None:
        try:
            torch.onnx.export(plain, traced, str(tmp), input_names=names, output_names=[f"y{i}" for i in range(n_out)],
                              dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False)
        except Exception as err:  # noqa: BLE001 - the exporter raises many kinds; all mean "torch.onnx cannot export it"
            message = re.sub(r"\x1b\[[0-9;]*m", "", first_line(err))
            raise ExportError(f"torch.onnx.export cannot export {name}: {type(err).__name__}: {message}") from None
        proto = onnx.load(str(tmp))
        proto.producer_name = "eigenprune"  # so that `is_onnx_export` knows the file as ours
        onnx.save(proto, str(tmp))
        check_onnx(tmp, plain, inputs, rtol=rtol)

    return atomic_write(path, write)
