"""Converting any model between ordinary and spectral layers, and the penalty to add to its loss.

`spectralize` swaps every `nn.Linear`, `nn.Conv1d` and `nn.Conv2d` of a model for its exact spectral
copy (the same function: lam_in = 0, lam_out = 1, phi = -W) and `despectralize` swaps them back.
`plan_spectralize` says, without changing anything, what `spectralize` converts and what it leaves
alone and why; `spectralize` logs that report (logger "eigenprune"), so nothing is skipped silently.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from eigenprune.core.layers import SpectralConv1d, SpectralConv2d, SpectralLinear, SpectralModule

log = logging.getLogger("eigenprune")

_SPECTRAL_OF: dict[type[nn.Module], type[SpectralModule]] = {
    nn.Linear: SpectralLinear, nn.Conv1d: SpectralConv1d, nn.Conv2d: SpectralConv2d}


class SpectralizeError(ValueError):
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


def plan_spectralize(model: nn.Module, include: Iterable | None = None, exclude: Iterable | None = None) -> SpectralizeReport:
    """What `spectralize(model, include=..., exclude=...)` would convert and leave alone; changes nothing.

    `include`/`exclude`: module name patterns (fnmatch on qualified names) or module types. With
    `include`, only matching layers convert; `exclude` wins over `include`. Raises SpectralizeError
    for an uninitialised lazy layer (run one forward pass first).
    """
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
        target = _SPECTRAL_OF.get(type(module))
        if target is None:
            if any(True for _ in module.parameters(recurse=False)) and not isinstance(module, nn.MultiheadAttention):
                report.left_alone[name] = f"{type(module).__name__} has no spectral form (Linear, Conv1d, Conv2d have)"
            continue
        if any(name.startswith(prefix) for prefix in inside_attention):
            report.left_alone[name] = "its MultiheadAttention reads the weight directly, not through the layer's forward"
        elif include is not None and not _selected(name, module, include):
            report.left_alone[name] = "not matched by include"
        elif _selected(name, module, exclude):
            report.left_alone[name] = "matched by exclude"
        elif target is not SpectralLinear and (why := target.unsupported(module)) is not None:
            report.left_alone[name] = why
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
    """Replace every `nn.Linear`, `nn.Conv1d`, `nn.Conv2d` inside `model` (in place) by an exact spectral copy; returns `model`.

    The outputs are unchanged (lam_in = 0, lam_out = 1, phi = -W). Keyword arguments go to the
    spectral layers (flags, L2 coefficients). A layer used at several places stays one (shared) layer.
    Layers it cannot or was told not to convert are left alone and listed in the report it logs at
    INFO level ("eigenprune" logger), with a WARNING for each Linear/Conv layer that stays plain for
    a reason other than include/exclude; `plan_spectralize` returns that report. Passing a bare layer
    returns its spectral copy.
    """
    report = plan_spectralize(model, include, exclude)
    new_of: dict[int, nn.Module] = {}
    replace: dict[str, nn.Module] = {}
    for name in report.converted:
        old = model.get_submodule(name)
        if id(old) not in new_of:
            spectral = _SPECTRAL_OF[type(old)]
            new_of[id(old)] = spectral.from_linear(old, **kwargs) if spectral is SpectralLinear else spectral.from_conv(old, **kwargs)
        replace[name] = new_of[id(old)]
    log.info("%s", report)
    for name, why in report.left_alone.items():  # a dense or convolutional layer that stays plain is worth a warning
        if isinstance(model.get_submodule(name), (nn.Linear, nn.modules.conv._ConvNd)) and "include" not in why and "exclude" not in why:
            log.warning("spectralize left %s (%s) alone: %s", name or "<model>", type(model.get_submodule(name)).__name__, why)
    return _swap(model, replace)


def despectralize(model: nn.Module) -> nn.Module:
    """Replace every spectral layer inside `model` (in place) by the `nn.Linear`/`nn.Conv1d`/`nn.Conv2d` it computes; returns `model`.

    A layer used at several places stays one (shared) layer. Passing a bare spectral layer returns its plain copy.
    """
    new_of: dict[int, nn.Module] = {}
    replace: dict[str, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, SpectralModule):
            if id(module) not in new_of:
                new_of[id(module)] = module.to_linear() if isinstance(module, SpectralLinear) else module.to_conv()
            replace[name] = new_of[id(module)]
    return _swap(model, replace)


def spectral_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of `penalty()` over all spectral layers of `model` (add it to the loss); each shared layer counts once."""
    terms = [m.penalty() for m in model.modules() if isinstance(m, SpectralModule)]
    return torch.stack(terms).sum() if terms else torch.zeros(())
