"""Export to ONNX (optional extra: `pip install 'eigenprune[onnx]'`).

MLPs (`to_onnx`, `export_onnx`): the graph is written directly with `onnx.helper`, not traced: each
linear layer becomes a Gemm (y = x W^T + b) and each activation its ONNX operator, with a dynamic
batch dimension. Any other `nn.Module` (a pruned CNN, residual net, transformer): `export_module_onnx`
traces it with `torch.onnx.export` and checks the file against torch with onnxruntime. Spectral
layers are exported as the plain weight they compute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

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


def export_onnx(model: nn.Module, path: str | Path) -> Path:
    """Write `model` (any MLP `as_sequential` reads) to `path` as ONNX; returns the path."""
    onnx = _onnx()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(to_onnx(model), str(tmp))
    tmp.replace(path)
    return path


# --- Any nn.Module, traced by torch.onnx.export -----------------------------------------------------


def _example_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ExportError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
    return inputs


def export_module_onnx(
    model: nn.Module, example_inputs, path: str | Path, *, dynamic_batch: bool = True, overwrite: bool = False,
    rtol: float = 1e-4, atol: float = 1e-5,
) -> Path:
    """Write any `nn.Module` (e.g. one `prune_nodes` pruned) to `path` as ONNX with `torch.onnx.export`; returns the path.

    Spectral layers are exported as the plain layers they compute (a copy is despectralized; `model`
    is not modified). Inputs are named x0, x1, ..., outputs y0, y1, ...; with `dynamic_batch` the first
    dimension of every input is dynamic. The file is then run with onnxruntime on `example_inputs`
    and must match torch within `rtol`/`atol` (`check_onnx`), else ExportError and no file is left.
    An existing `path` is refused unless `overwrite`.
    """
    import copy
    import os
    import tempfile

    from eigenprune.core.convert import despectralize

    _onnx()
    path = Path(path)
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists; choose a new path or pass overwrite=True")
    if not path.parent.is_dir():
        raise ExportError(f"the folder of {path} does not exist")
    inputs = _example_tuple(example_inputs)
    plain = despectralize(copy.deepcopy(model)).eval()
    traced = tuple(torch.cat([t, t]) if dynamic_batch and t.dim() and t.shape[0] == 1 else t for t in inputs)
    names = [f"x{i}" for i in range(len(inputs))]
    with torch.no_grad():
        outputs = plain(*inputs)
    n_out = 1 if isinstance(outputs, torch.Tensor) else len(outputs)
    dynamic = tuple({0: torch.export.Dim("batch")} if t.dim() else {} for t in traced) if dynamic_batch else None
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.onnx.export(plain, traced, tmp, input_names=names, output_names=[f"y{i}" for i in range(n_out)],
                          dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False)
        check_onnx(tmp, plain, inputs, rtol=rtol, atol=atol)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def check_onnx(path: str | Path, model: nn.Module, example_inputs, *, rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Run the ONNX file with onnxruntime and compare with `model` in torch; returns the largest |difference|.

    Raises ExportError when some output differs by more than atol + rtol * |torch output|.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("checking ONNX needs onnxruntime: pip install 'eigenprune[onnx]'") from None
    inputs = _example_tuple(example_inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.detach().cpu().float().numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feed)
    with torch.no_grad():
        want = model.eval()(*inputs)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    worst = 0.0
    for g, w in zip(got, want):
        w = w.detach().cpu().float().numpy()
        diff = np.abs(g - w)
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
        if not np.all(diff <= atol + rtol * np.abs(w)):
            raise ExportError(f"onnxruntime and torch disagree by up to {float(diff.max()):.3g} (rtol={rtol}, atol={atol})")
    return worst
