"""Save and load MLPs as safetensors + a JSON architecture (no pickled code is ever loaded).

Supported models: any MLP that `as_sequential` reads (an `nn.Sequential`, or a chain-shaped module of
your own, saved as the equivalent `nn.Sequential`) made of `nn.Linear`, `SpectralLinear`, `nn.Identity`
and the activations in `ACTIVATIONS`. The architecture lives in the safetensors metadata under the key "eigenprune".
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from eigenprune.core.errors import EigenpruneError
from eigenprune.core.io import atomic_write, first_line, input_file
from eigenprune.core.layers import SpectralLinear
from eigenprune.core.structure import as_sequential

FORMAT = "eigenprune-mlp/1"

ACTIVATIONS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "relu": (nn.ReLU, ()), "tanh": (nn.Tanh, ()), "sigmoid": (nn.Sigmoid, ()), "silu": (nn.SiLU, ()),
    "gelu": (nn.GELU, ("approximate",)), "leaky_relu": (nn.LeakyReLU, ("negative_slope",)), "elu": (nn.ELU, ("alpha",)),
    "softplus": (nn.Softplus, ("beta", "threshold")),
}
"""Saved activation modules: type name -> (class, constructor arguments stored with it)."""


class CheckpointError(EigenpruneError, ValueError):
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


_ARG_CHOICES = {"approximate": ("none", "tanh")}


def check_architecture(arch: list[dict], tensors: dict[str, torch.Tensor]) -> None:
    """Refuse (CheckpointError) an architecture that cannot be built from these tensors: no linear layer,
    sizes that are not positive integers or differ from the stored tensors' shapes (so nothing larger than
    the file is ever allocated), layers that do not chain, activation arguments of the wrong kind."""
    prev_out, n_linear = None, 0
    for i, entry in enumerate(arch):
        kind = entry.get("type")
        if kind in ("spectral", "linear"):
            for key in ("in", "out"):
                value = entry.get(key)
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise CheckpointError(f"layer {i} ({kind}): {key!r} must be a positive integer, got {value!r}")
            if not isinstance(entry.get("bias"), bool):
                raise CheckpointError(f"layer {i} ({kind}): 'bias' must be true or false, got {entry.get('bias')!r}")
            name = f"{i}.phi" if kind == "spectral" else f"{i}.weight"
            shape = list(tensors[name].shape) if name in tensors else None
            if shape != [entry["out"], entry["in"]]:
                raise CheckpointError(f"layer {i} ({kind}) is {entry['in']}→{entry['out']}, but the tensor {name} is "
                                      f"{'missing' if shape is None else shape}")
            if prev_out is not None and entry["in"] != prev_out:
                raise CheckpointError(f"layer {i} takes {entry['in']} inputs, but the linear layer before it has {prev_out} "
                                      "outputs: the layers do not chain")
            prev_out, n_linear = entry["out"], n_linear + 1
        elif kind in ACTIVATIONS:
            for arg in ACTIVATIONS[kind][1]:
                value = entry.get(arg)
                if arg in _ARG_CHOICES:
                    ok = value in _ARG_CHOICES[arg]
                else:
                    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < float("inf")
                if not ok:
                    valid = " or ".join(map(repr, _ARG_CHOICES[arg])) if arg in _ARG_CHOICES else "a finite number"
                    raise CheckpointError(f"layer {i} ({kind}): {arg} must be {valid}, got {value!r}")
        elif kind != "identity":
            raise CheckpointError(f"unknown layer type in architecture: {kind!r}")
    if n_linear == 0:
        raise CheckpointError("the architecture has no linear layer" + (" (it is empty)" if not arch else ""))


def model_bytes(model: nn.Module, extra: dict | None = None) -> bytes:
    """`model` as safetensors bytes with its architecture and `extra` metadata (what `save_model` writes)."""
    model = as_sequential(model)
    meta = {"format": FORMAT, "eigenprune": json.dumps(architecture(model)), "extra": json.dumps(extra or {}, sort_keys=True)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return _sorted_header(save(tensors, metadata=meta))


def _sorted_header(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted, so equal models give equal bytes
    (safetensors writes metadata in hash-map order). Layout: u64 header size, header, tensor data."""
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # keep the data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(header)) + header + blob[8 + n :]


def save_model(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Write `model` to `path` (safetensors, atomically) with its architecture and `extra` metadata.
    CheckpointError for a model that is not an MLP of the layers `architecture` knows."""
    try:
        blob = model_bytes(model, extra)
    except TypeError as err:  # as_sequential and architecture say in one line what they cannot read
        raise CheckpointError(f"save_model writes MLPs only: {err}") from None
    return atomic_write(path, blob)


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a checkpoint eigenprune wrote (a safetensors file with eigenprune's format metadata)."""
    try:
        read_metadata(path)
    except CheckpointError:
        return False
    return True


def not_safetensors(path: Path) -> str | None:
    """What the file at `path` is instead, if it does not even start like a safetensors file (a u64 header size,
    then the JSON header's '{'); None if it does (it may still be damaged further on, or shorter than 9 bytes)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] == b"{":
        return None
    if head[:1] == b"\x80":
        return "it starts like a pickle, e.g. of torch.save"
    if head[:4] == b"PK\x03\x04":
        return "it is a zip archive, as torch.save writes"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "it starts with text"
    return "it does not start with a safetensors header"


def read_metadata(path: str | Path) -> dict:
    """The metadata dict of an eigenprune checkpoint; `CheckpointError` if the file is not one (saying what it is
    instead: not safetensors at all, safetensors without eigenprune's architecture, another format) or is unreadable."""
    from safetensors import safe_open

    path = input_file(path, "checkpoint", CheckpointError)
    try:
        what = not_safetensors(path)
        if what is None:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(err)})") from None
    if what is not None:
        raise CheckpointError(f"{path}: not a safetensors file ({what}); eigenprune reads the safetensors checkpoints its "
                              "save_model writes and never unpickles a file")
    if meta.get("format") not in (None, FORMAT):
        raise CheckpointError(f"{path}: not an eigenprune checkpoint (metadata format {meta.get('format')!r}, expected {FORMAT!r})")
    if "eigenprune" not in meta:
        how = ("it has eigenprune's format tag: edited, or written by another tool" if "format" in meta else
               "written by another tool (e.g. safetensors' save_file), not by eigenprune's save_model")
        raise CheckpointError(f"{path}: a safetensors file without eigenprune's architecture (no 'eigenprune' metadata); {how}")
    return meta


def _json(path: Path, meta: dict, key: str, default: str) -> object:
    """The JSON value stored under metadata `key`; CheckpointError if it is not JSON or nested too deeply to read."""
    try:
        return json.loads(meta.get(key, default))
    except ValueError as err:
        raise CheckpointError(f"{path}: corrupted checkpoint ({key!r} metadata: {first_line(err)})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupted checkpoint (its {key!r} metadata is JSON nested too deeply to read; "
                              "an architecture is a flat list of layers)") from None


def load_model(path: str | Path) -> tuple[nn.Sequential, dict]:
    """Load a model saved by `save_model`; returns (model, extra metadata). Never writes to `path`.

    Any damage (truncation, garbage bytes, a foreign safetensors file, a malformed architecture,
    tensors that do not fit it) is a one-line `CheckpointError`.
    """
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupted checkpoint ({first_line(err)})") from None
    arch, extra = _json(path, meta, "eigenprune", "[]"), _json(path, meta, "extra", "{}")
    if not isinstance(arch, list) or not all(isinstance(e, dict) for e in arch):
        raise CheckpointError(f"{path}: corrupted checkpoint (architecture is not a list of layers)")
    dtypes = {t.dtype for t in tensors.values()}
    if not dtypes <= {torch.float16, torch.bfloat16, torch.float32, torch.float64}:
        raise CheckpointError(f"{path}: tensors must be floating point, got {sorted(map(str, dtypes))}")
    try:
        check_architecture(arch, tensors)
        model = build(arch, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except KeyError as err:
        raise CheckpointError(f"{path}: corrupted checkpoint (an architecture entry lacks the key {err})") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupted checkpoint (bad architecture entry: {first_line(err)})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:  # its first line is a generic heading; the second names the tensor
        detail = [line.strip() for line in str(err).splitlines() if line.strip()][1:2] or [first_line(err)]
        raise CheckpointError(f"{path}: tensors do not match the stored architecture ({detail[0]})") from None
    try:
        with torch.no_grad():
            n_in = next(e["in"] for e in arch if e.get("type") in ("spectral", "linear"))
            model(torch.zeros(1, n_in, dtype=next(model.parameters()).dtype))
    except (RuntimeError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: the stored model does not run ({first_line(err)})") from None
    return model, extra if isinstance(extra, dict) else {}
