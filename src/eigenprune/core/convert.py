"""Converting any model between ordinary and spectral layers, and the penalty to add to its loss.

`spectralize` swaps every layer that has a spectral twin (`core.layers.PLAIN_LAYERS`: `nn.Linear`, `nn.Conv1d`,
`nn.Conv2d`, `nn.Conv3d`, grouped and depthwise ones included) for its exact spectral copy (the same function:
lam_in = 0, lam_out = 1, phi = -W) and `despectralize` swaps them back.
`plan_spectralize` says, without changing anything, what `spectralize` converts and what it leaves
alone and why; `spectralize` logs that report (logger "eigenprune"), so nothing is skipped silently.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from eigenprune.core.errors import EigenpruneError
from eigenprune.core.layers import SpectralModule, plain_names, spectral_twin

log = logging.getLogger("eigenprune")


class SpectralizeError(EigenpruneError, ValueError):
    """A model that `spectralize` cannot convert, stated in one line."""


@dataclass
class SpectralizeReport:
    """What `spectralize` converts (`converted`: module names) and leaves alone (`left_alone`: name -> reason).

    Names are qualified module names ('' is the model itself); a module reachable under several names
    is listed under each of them.
    """

    converted: list[str] = field(default_factory=list)
    left_alone: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"spectralize: converted {len(self.converted)} layer(s), left {len(self.left_alone)} alone"]
        lines += [f"  left alone: {name or '<model>'}: {why}" for name, why in self.left_alone.items()]
        return "\n".join(lines)


OPTIONS = ("train_phi", "train_lam_in", "train_lam_out", "train_bias", "l2_phi", "l2_lam", "l1_lam", "group_lasso")
"""The keyword options of `spectralize` beside include/exclude: which parts train and the penalty coefficients
(the other options of a spectral layer do not apply to an exact copy: lam_in = 0, lam_out = 1, phi = -W)."""

_NOT_FOR_A_COPY = {
    "lam_in_init": "an exact copy has lam_in = 0", "lam_out_init": "an exact copy has lam_out = 1",
    "generator": "an exact copy takes phi = -W, nothing is drawn", "bias": "the copy has a bias exactly where the layer has one",
    "dtype": "the copy keeps each layer's dtype; convert the model with .to(dtype) first",
    "device": "the copy stays on each layer's device; move the model with .to(device) first",
}

_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")
"""A module's hook dictionaries that a converted copy takes over (the same objects, so handles still remove them)."""

_STATE_DICT_HOOKS = ("_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _check_options(options: dict) -> None:
    """Refuse (SpectralizeError) a keyword that is not one of `OPTIONS`, a flag that is not a bool, a coefficient that is
    not a finite number >= 0."""
    valid = "include, exclude, " + ", ".join(OPTIONS)
    for key, value in options.items():
        if key in _NOT_FOR_A_COPY:
            raise SpectralizeError(f"spectralize does not take {key}: {_NOT_FOR_A_COPY[key]}; valid keywords: {valid}")
        if key not in OPTIONS:
            raise SpectralizeError(f"spectralize got an unknown keyword {key!r}; valid keywords: {valid}")
        if key.startswith("train_") and not isinstance(value, bool):
            raise SpectralizeError(f"spectralize: {key} must be True or False, got {value!r}")
        if not key.startswith("train_") and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
            raise SpectralizeError(f"spectralize: {key} must be a finite number >= 0, got {value!r}")


def hook_problem(module: nn.Module) -> str | None:
    """Why `module`'s hooks cannot move to a converted copy of it exactly (None when they can, or it has none).

    Forward (pre-)hooks, backward pre-hooks and full backward hooks see the layer's inputs, outputs and their
    gradients, which the copy computes exactly: they move. State-dict hooks see the parameters' names, which
    differ (weight against phi, lam_in, lam_out), and an old-style `register_backward_hook` sees the gradients
    of the layer's last operation, which differs.
    """
    kinds = [name.strip("_").replace("_", " ").removesuffix("s") for name in _STATE_DICT_HOOKS if getattr(module, name, None)]
    if kinds:
        return f"it has a {kinds[0]}, which sees parameter names that the converted layer does not have"
    if module._backward_hooks and not module._is_full_backward_hook:
        return ("it has a register_backward_hook hook, which sees the gradients of its last operation and those differ "
                "(register_full_backward_hook moves over)")
    return None


def _carry_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """`new` with `old`'s hooks (the same dictionaries, so a handle's remove() still works) and training mode."""
    for name in _HOOKS:
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))
    new._is_full_backward_hook = old._is_full_backward_hook
    return new.train(old.training)


def _selectors(value: Iterable | str | type | None, which: str) -> list | None:
    """include/exclude as a list of name patterns and module types (a bare pattern or type is a list of one)."""
    if value is None:
        return None
    if isinstance(value, (str, type)):
        return [value]
    try:
        items = list(value)
    except TypeError:
        raise SpectralizeError(f"{which} must be a list of module name patterns or module types, got {type(value).__name__}") from None
    for sel in items:
        if not isinstance(sel, (str, type)):
            raise SpectralizeError(f"{which} entries must be module name patterns (str) or module types (e.g. nn.Linear), "
                                   f"got a {type(sel).__name__}")
    return items


def _check_patterns(model: nn.Module, selectors: list | None, which: str) -> None:
    """Refuse a name pattern in include/exclude that matches no layer, naming the layers there are."""
    modules = dict(model.named_modules(remove_duplicate=False))
    layers = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, SpectralModule))]
    for sel in selectors or ():
        if not isinstance(sel, str) or any(fnmatch.fnmatchcase(n, sel) for n in layers):
            continue
        shown = ", ".join(n or "<model>" for n in layers[:8]) + (f", … ({len(layers)} in all)" if len(layers) > 8 else "")
        other = next((n for n in modules if fnmatch.fnmatchcase(n, sel)), None)
        hint = (f"; {other} is a {type(modules[other]).__name__}: write {other + '.*'!r} for the layers inside it"
                if other is not None else "")
        raise SpectralizeError(f"{which} pattern {sel!r} matches no Linear or Conv layer of {type(model).__name__}{hint}; "
                               f"its layers are: {shown or 'none'}")


def _selected(name: str, module: nn.Module, selectors: Iterable | None) -> bool:
    for sel in selectors or ():
        if isinstance(sel, str) and fnmatch.fnmatchcase(name, sel):
            return True
        if isinstance(sel, type) and isinstance(module, sel):
            return True
    return False


def _shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> the names of the modules that own it directly (more than one: tied weights)."""
    owners: dict[int, list[str]] = {}
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            continue
        seen.add(id(module))
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return owners


def _check_module(model: object, who: str) -> None:
    """A SpectralizeError unless `model` is a Python `nn.Module` (a TorchScript module's layers cannot be swapped)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise SpectralizeError(f"{who} takes a Python nn.Module, got a TorchScript module ({type(model).__name__}), whose layers "
                               f"cannot be replaced: {who} the module before torch.jit.script or trace")
    if not isinstance(model, nn.Module):
        raise SpectralizeError(f"{who} takes an nn.Module, got {type(model).__name__}")


def plan_spectralize(model: nn.Module, include: Iterable | None = None, exclude: Iterable | None = None) -> SpectralizeReport:
    """What `spectralize(model, include=..., exclude=...)` would convert and leave alone; changes nothing.

    `include`/`exclude`: module name patterns (fnmatch on qualified names) or module types. With
    `include`, only matching layers convert; `exclude` wins over `include`. Raises SpectralizeError
    for an uninitialised lazy layer (run one forward pass first) and for a name pattern that matches
    no Linear or Conv layer (a typo would otherwise convert nothing, or everything, without a word).
    """
    _check_module(model, "spectralize")
    include, exclude = _selectors(include, "include"), _selectors(exclude, "exclude")
    _check_patterns(model, include, "include")
    _check_patterns(model, exclude, "exclude")
    report = SpectralizeReport()
    owners = _shared_parameters(model)
    inside_attention: set[str] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise SpectralizeError(f"cannot spectralize {name or '<model>'} ({type(module).__name__}): its parameters are not "
                                   "initialised yet; run one forward pass first")
        if isinstance(module, nn.MultiheadAttention):
            inside_attention.add(name + ".")
        if isinstance(module, SpectralModule):
            continue
        target = spectral_twin(type(module))
        if target is None:
            if any(True for _ in module.parameters(recurse=False)) and not isinstance(module, nn.MultiheadAttention):
                report.left_alone[name] = f"{type(module).__name__} has no spectral form ({plain_names()} have)"
            continue
        if any(name.startswith(prefix) for prefix in inside_attention):
            report.left_alone[name] = "its MultiheadAttention reads the weight directly, not through the layer's forward"
        elif include is not None and not _selected(name, module, include):
            report.left_alone[name] = "not matched by include"
        elif _selected(name, module, exclude):
            report.left_alone[name] = "matched by exclude"
        elif (why := target.unsupported(module)) is not None:
            report.left_alone[name] = why
        elif {n for n, _ in module.named_parameters(recurse=False)} != {"weight", *(["bias"] if module.bias is not None else [])}:
            report.left_alone[name] = ("its weight is not a parameter of its own (computed by weight_norm, spectral_norm "
                                       "or a parametrization?)")
        elif (why := hook_problem(module)) is not None:
            report.left_alone[name] = why
        elif module.weight.numel() == 0:
            report.left_alone[name] = f"it has no weights (shape {list(module.weight.shape)}: a layer of width 0)"
        elif any(len(owners[id(p)]) > 1 for p in module.parameters(recurse=False)):
            others = sorted({o for p in module.parameters(recurse=False) for o in owners[id(p)]} - {name})
            report.left_alone[name] = f"its parameters are shared with {', '.join(o or '<model>' for o in others)} (tied weights)"
        else:
            report.converted.append(name)
    for prefix in inside_attention:
        report.left_alone.setdefault(prefix[:-1], "MultiheadAttention has no spectral form (its in_proj and out_proj stay)")
    return report


def _swap(model: nn.Module, replace: dict[str, nn.Module]) -> nn.Module:
    """Put replace[name] at every qualified name (the model itself under ''); one new module per old one keeps sharing."""
    if "" in replace:
        return replace[""]
    for name, new in replace.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)
    return model


def spectralize(model: nn.Module, *, include: Iterable | None = None, exclude: Iterable | None = None, **kwargs) -> nn.Module:
    """Replace every layer of a type in `PLAIN_LAYERS` inside `model` (in place) by an exact spectral copy; returns `model`.

    The outputs are unchanged (lam_in = 0, lam_out = 1, phi = -W). Keyword arguments go to the
    spectral layers: `OPTIONS` (flags, penalty coefficients); any other is a SpectralizeError. A layer used
    at several places stays one (shared) layer. Its forward (pre-)hooks, backward pre-hooks and full
    backward hooks move to the spectral layer (the same hook objects: their handles still remove them)
    and it keeps its training mode; a layer with hooks that cannot move exactly is left alone (`hook_problem`).
    Layers it cannot or was told not to convert are left alone and listed in the report it logs at
    INFO level ("eigenprune" logger), with a WARNING for each Linear/Conv layer that stays plain for
    a reason other than include/exclude; `plan_spectralize` returns that report. Passing a bare layer
    returns its spectral copy.
    """
    _check_options(kwargs)
    report = plan_spectralize(model, include, exclude)
    new_of: dict[int, nn.Module] = {}
    replace: dict[str, nn.Module] = {}
    for name in report.converted:
        old = model.get_submodule(name)
        if id(old) not in new_of:
            new_of[id(old)] = _carry_hooks(old, spectral_twin(type(old)).from_plain(old, **kwargs))
        replace[name] = new_of[id(old)]
    log.info("%s", report)
    for name, why in report.left_alone.items():  # a dense or convolutional layer that stays plain is worth a warning
        if isinstance(model.get_submodule(name), (nn.Linear, nn.modules.conv._ConvNd)) and "include" not in why and "exclude" not in why:
            log.warning("spectralize left %s (%s) alone: %s", name or "<model>", type(model.get_submodule(name)).__name__, why)
    return _swap(model, replace)


def despectralize(model: nn.Module) -> nn.Module:
    """Replace every spectral layer inside `model` (in place) by the plain layer it computes (`to_plain`); returns `model`.

    A layer used at several places stays one (shared) layer. Its hooks move to the plain layer as in `spectralize`;
    a layer with hooks that cannot move exactly (`hook_problem`) is a SpectralizeError, and nothing is changed.
    Passing a bare spectral layer returns its plain copy.
    """
    _check_module(model, "despectralize")
    new_of: dict[int, nn.Module] = {}
    replace: dict[str, nn.Module] = {}
    spectral = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, SpectralModule)]
    for name, module in spectral:
        if (why := hook_problem(module)) is not None:
            raise SpectralizeError(f"cannot despectralize {name or '<model>'} ({type(module).__name__}): {why}; remove that hook first")
    for name, module in spectral:
        if id(module) not in new_of:
            new_of[id(module)] = _carry_hooks(module, module.to_plain())
        replace[name] = new_of[id(module)]
    return _swap(model, replace)


def spectral_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of `penalty()` over all spectral layers of `model` (add it to the loss); each shared layer counts once."""
    if not isinstance(model, nn.Module):
        raise SpectralizeError(f"spectral_penalty takes an nn.Module, got {type(model).__name__}")
    terms = [m.penalty() for m in model.modules() if isinstance(m, SpectralModule)]
    return torch.stack(terms).sum() if terms else torch.zeros(())
