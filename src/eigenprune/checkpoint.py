"""Save and load MLPs as safetensors + a JSON architecture (no pickled code is ever loaded).

Supported models: any MLP that `as_sequential` reads (an `nn.Sequential`, or a chain-shaped module of
your own, saved as the equivalent `nn.Sequential`) made of `nn.Linear`, `SpectralLinear`, `nn.Identity`
and the activations in `ACTIVATIONS`. The architecture lives in the safetensors metadata under the key "eigenprune".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from eigenprune.layers import SpectralLinear
from eigenprune.nets import as_sequential

FORMAT = "eigenprune-mlp/1"

ACTIVATIONS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "relu": (nn.ReLU, ()), "tanh": (nn.Tanh, ()), "sigmoid": (nn.Sigmoid, ()), "silu": (nn.SiLU, ()),
    "gelu": (nn.GELU, ("approximate",)), "leaky_relu": (nn.LeakyReLU, ("negative_slope",)), "elu": (nn.ELU, ("alpha",)),
    "softplus": (nn.Softplus, ("beta", "threshold")),
}
"""Saved activation modules: type name -> (class, constructor arguments stored with it)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, stated in one line."""


def architecture(model: nn.Module) -> list[dict]:
    """A JSON-able description of an MLP (read by `as_sequential`), one entry per module."""
    arch: list[dict] = []
    for m in as_sequential(model):
        if isinstance(m, SpectralLinear):
            arch.append({
                "type": "spectral", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                "trains": m.trainable_parts(),
                "l2_phi": m.l2_phi, "l2_lam": m.l2_lam, "l1_lam": m.l1_lam, "group_lasso": m.group_lasso,
            })
        elif isinstance(m, nn.Linear):
            arch.append({"type": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                         "trains": m.weight.requires_grad})
        elif isinstance(m, (nn.Identity, nn.Dropout)):  # dropout is the identity at inference
            arch.append({"type": "identity"})
        elif (name := next((k for k, (cls, _) in ACTIVATIONS.items() if type(m) is cls), None)) is not None:
            arch.append({"type": name, **{a: getattr(m, a) for a in ACTIVATIONS[name][1]}})
        else:
            raise TypeError(f"cannot save module of type {type(m).__name__}; supported: Linear, SpectralLinear, Identity, "
                            f"Dropout, {', '.join(c.__name__ for c, _ in ACTIVATIONS.values())}")
    return arch


def build(arch: list[dict], dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """An `nn.Sequential` with the given architecture (parameters uninitialised in value)."""
    mods: list[nn.Module] = []
    for entry in arch:
        kind = entry.get("type")
        if kind == "spectral":
            trains = set(entry["trains"])
            mods.append(SpectralLinear(
                entry["in"], entry["out"], bias=entry["bias"], train_phi="phi" in trains, train_lam_in="lam_in" in trains,
                train_lam_out="lam_out" in trains, train_bias="bias" in trains, l2_phi=entry["l2_phi"], l2_lam=entry["l2_lam"],
                l1_lam=entry.get("l1_lam", 0.0), group_lasso=entry.get("group_lasso", 0.0), dtype=dtype,
            ))
        elif kind == "linear":
            lin = nn.Linear(entry["in"], entry["out"], bias=entry["bias"], dtype=dtype)
            lin.requires_grad_(bool(entry.get("trains", True)))
            mods.append(lin)
        elif kind in ACTIVATIONS:
            cls, args = ACTIVATIONS[kind]
            mods.append(cls(**{a: entry[a] for a in args}))
        elif kind == "identity":
            mods.append(nn.Identity())
        else:
            raise CheckpointError(f"unknown layer type in architecture: {kind!r}")
    return nn.Sequential(*mods)


def save_model(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Write `model` to `path` (safetensors, atomically) with its architecture and `extra` metadata."""
    path = Path(path)
    model = as_sequential(model)
    meta = {"format": FORMAT, "eigenprune": json.dumps(architecture(model)), "extra": json.dumps(extra or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_metadata(path: str | Path) -> dict:
    """The metadata dict of a safetensors file; `CheckpointError` if it is missing or unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an eigenprune checkpoint (metadata format {meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def load_model(path: str | Path) -> tuple[nn.Sequential, dict]:
    """Load a model saved by `save_model`; returns (model, extra metadata)."""
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
        arch = json.loads(meta["eigenprune"])
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: corrupted checkpoint ({err})") from None
    dtypes = {t.dtype for t in tensors.values()}
    try:
        model = build(arch, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupted architecture metadata ({type(err).__name__}: {err})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: tensors do not match the stored architecture ({str(err).splitlines()[0]})") from None
    return model, json.loads(meta.get("extra", "{}"))
