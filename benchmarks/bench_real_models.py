"""A pruning benchmark that cannot flatter us: spectral training against Torch-Pruning's criteria and sparsity training.

    nice -n 5 python benchmarks/bench_real_models.py --quick            # CI smoke form: tiny models, 1 seed, 2 strengths
    nice -n 5 python benchmarks/bench_real_models.py --jobs 2           # full form: 6 models, 5 seeds, 3 strengths
    python benchmarks/bench_real_models.py --models cnn-bn,mlp --seeds 2 --strengths 0,2 --out x.json   # a part
    python benchmarks/bench_real_models.py --models mlp --kinds spectral --ours all,pruned,out   # variants of ours only
    python benchmarks/bench_real_models.py --merge a.json b.json --out merged.json          # parts into one result

Six models (benchmarks/prune_zoo.py): a VGG-style CNN with and without BatchNorm, a ResNet-style CNN, a
MobileNetV2-style net (inverted residuals, depthwise convolutions), a transformer encoder whose feed-forward layers are
pruned, an MLP. Data ship with scikit-learn: the 8x8 digits (1,797 images) for the CNNs, make_classification (4,000 rows,
8 classes) for the transformer and the MLP; one fixed 60/20/20 train/validation/test split.

Trainings (same optimizer, epochs, batches and initialisation for all; Adam, cross-entropy):
  standard      no sparsity term: the common target, and the model the post-training criteria prune
  spectral      ours: `spectralize(model, l2_phi=0.01*m, l2_lam=5e-4*m)` + `spectral_penalty` in the loss, in one of
                the SPECTRAL_VARIANTS (--ours): by default "pruned", only the layers that produce pruned channels
                are spectral (`spectralize(model, include=select_channels(model, 1.0, x).members)`), the rest stays
                plain and unpenalised; "all" layers spectral (the README's first recipe; "wide": the same with
                m down to 0.01); or the layers reading the pruned channels gated on their inputs ("out"); "both" is
                "pruned"'s training ranked by incoming x outgoing norm; "wide-l1", "pruned-l1", "out-l1" are those
                trainings ranked by Torch-Pruning's group L1 magnitude; "pruned-norm" and "norm" ("all" layers) normalise
                the penalty per layer (`per_layer`)
  group-norm    Torch-Pruning's GroupNormPruner: `pruner.regularize(model)` after every backward
  growing-reg   Torch-Pruning's GrowingRegPruner: `regularize` after every backward, `update_reg()` after every epoch
  slimming      Torch-Pruning's BNScalePruner (L1 on BatchNorm scales), models with BatchNorm only
Each sparsity training gets a sweep of STRENGTHS (3 values); the strength is chosen per seed on the VALIDATION split,
once for each column of the measure: the without-fine-tuning column takes the strength with the smallest kept
parameter fraction within 1 point of the standard model's validation accuracy without fine-tuning, the
with-fine-tuning column the one with the smallest such fraction after fine-tuning (ties: the smaller fraction without
fine-tuning, then the higher unpruned validation accuracy); only the chosen models are measured on the test split.

Pipelines (training + ranking): standard + TP L1 / L2 magnitude, Taylor, LAMP; slimming + BNScaleImportance (L1
magnitude on groups without BatchNorm, e.g. the CNN's dense layer, which Torch-Pruning's slimming would not prune);
group-norm and growing-reg + GroupMagnitudeImportance(p=2) (their own); spectral + eigenprune's EigenImportance
(the default measure of ours) and, as a diagnostic, spectral + TP L1 magnitude on the same spectral model.

Pruning: one layer per channel group is named in each model's PRUNE; at kept fraction f every pipeline keeps exactly
k = max(1, round(f * width)) channels of every group (computed here, not by either library's rounding), the k with the
highest scores, removed with Torch-Pruning's DependencyGraph; the benchmark asserts equal parameter counts across
pipelines at every f. Ours is cross-checked against `eigenprune.prune_nodes(model, {layer: k}, example_inputs=x)`
on the spectral model (same outputs), on every group prune_nodes prunes (since issue #24, depthwise ones too).

Measure: over the fraction GRID, scanned from 1 down, the smallest kept parameter fraction (parameters of the pruned
model / of the unpruned one) whose test accuracy is at least the STANDARD unpruned model's minus 1 point, at this f
and every larger f: without fine-tuning, and with FT_EPOCHS of Adam (plain cross-entropy, no sparsity term) after
pruning. With fine-tuning, the scan starts below the without-fine-tuning answer (a model already within the target
counts as within it). A pipeline whose unpruned model misses the target counts 1.0 ("fail") without fine-tuning.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import prune_zoo  # noqa: E402

from eigenprune import despectralize, prune_nodes, spectral_penalty, spectralize  # noqa: E402
from eigenprune.core.layers import SpectralModule  # noqa: E402

try:  # where the graph criterion lives today; the pruning package is being restructured
    from eigenprune.pruning.graph import EigenImportance
except ImportError:  # pragma: no cover
    from eigenprune.pruning import EigenImportance

GRID = [1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.07, 0.05]
"""Kept fraction of every pruned group, scanned from the largest down (--quick: QUICK_GRID)."""
QUICK_GRID = [1.0, 0.5, 0.2]
TOLERANCE = 1.0
"""Points of test accuracy below the standard unpruned model's that still count as 'within'."""
LR, BATCH = 2e-3, 64
FT_EPOCHS, FT_LR = 2, 1e-3
STRENGTHS = {
    "group-norm": [1e-4, 1e-3, 1e-2],  # GroupNormPruner reg (its default 1e-4)
    "growing-reg": [1e-4, 1e-3, 1e-2],  # GrowingRegPruner reg; delta_reg = reg / 4 per epoch
    "slimming": [1e-4, 1e-3, 1e-2],  # BNScalePruner reg (L1 on BatchNorm weights; its default 1e-5)
}
SPECTRAL_VARIANTS = {  # name -> (which layers are spectral and penalised, strengths m: l2_phi = 0.01 m, l2_lam = 5e-4 m,
    #                          the criterion)
    "all": ("all", [0.1, 0.3, 1.0], "eigenprune"),  # round 2 preliminary: every Linear/Conv spectral, penalty on all
    "pruned": ("pruned", [0.1, 0.3, 1.0], "eigenprune"),  # only the layers producing pruned channels; the rest plain
    # the eigenvalue on the outgoing side: every layer reading pruned channels is gated on its inputs,
    # w[o, i] = lam_in_i * phi[o, i] (lam_out = 0 frozen), scored by its columns (EigenImportance(side="out"))
    "out": ("out", [0.1, 0.3, 1.0], "eigenprune-out"),
    "wide": ("all", [0.01, 0.1, 1.0], "eigenprune"),  # as "all", strengths 10x apart like the peers', down to 0.01
    # "pruned"'s training, channels ranked by incoming norm x outgoing norm (EigenImportance(side="both")): the score
    # a ReLU network's rescaling (incoming x a, outgoing / a) leaves unchanged
    "both": ("pruned", [0.1, 0.3, 1.0], "eigenprune-both"),
    # spectral training, channels ranked by Torch-Pruning's group L1 magnitude (the whole dependency group: producers'
    # rows, BatchNorm, readers' columns); each strength chosen on validation with that ranking
    "wide-l1": ("all", [0.01, 0.1, 1.0], "group-l1"),
    "pruned-l1": ("pruned", [0.1, 0.3, 1.0], "group-l1"),
    "out-l1": ("out", [0.1, 0.3, 1.0], "group-l1"),
    # a penalty normalised per layer: each spectral layer's coefficients times (mean phi size / its phi size), so every
    # layer's mean square weight counts alike, whatever its size ("pruned-norm": the default's layers; "norm": all)
    "pruned-norm": ("pruned", [0.1, 0.3, 1.0], "eigenprune", "per-layer"),
    "norm": ("all", [0.01, 0.1, 1.0], "eigenprune", "per-layer"),
}
OURS = ["pruned"]
"""The spectral variants measured (--ours); the first is "spectral + eigenprune (ours)", the others spectral[v].
"pruned" became the default on docs/pruning.md's round-2 variant table: the lowest mean kept fraction after
fine-tuning over the six models, the fewest unpruned models below the target, the smallest accuracy cost."""
PEERS = [  # (name, training, importance)
    ("standard + tp-l1", "standard", "tp-l1"),
    ("standard + tp-l2", "standard", "tp-l2"),
    ("standard + tp-taylor", "standard", "tp-taylor"),
    ("standard + tp-lamp", "standard", "tp-lamp"),
    ("slimming + bn-scale", "slimming", "tp-bn-scale"),
    ("group-norm + group-l2", "group-norm", "tp-group-l2"),
    ("growing-reg + group-l2", "growing-reg", "tp-group-l2"),
]


def pipelines(ours: list[str]) -> list[tuple[str, str, str]]:
    """The peers, then each spectral variant with eigenprune's criterion (the first: ours, with a TP L1 diagnostic)."""
    out = list(PEERS)
    for i, v in enumerate(ours):
        crit = SPECTRAL_VARIANTS[v][2]
        out.append(("spectral + eigenprune (ours)" if i == 0 else f"spectral[{v}] + eigenprune", f"spectral/{v}", crit))
        if i == 0:
            out.append(("spectral + tp-l1 (diagnostic)", f"spectral/{v}", "tp-l1"))
    return out


def strengths(kind: str) -> list[float]:
    return SPECTRAL_VARIANTS[kind.split("/", 1)[1]][1] if kind.startswith("spectral/") else STRENGTHS[kind]


def importance(name: str):
    return {
        "tp-l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "group-l1": lambda: tp.importance.MagnitudeImportance(p=1),  # tp-l1 under the name a spectral variant records
        "tp-l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "tp-taylor": lambda: tp.importance.TaylorImportance(),
        "tp-lamp": lambda: tp.importance.LAMPImportance(p=2),
        "tp-bn-scale": lambda: tp.importance.BNScaleImportance(),
        "tp-group-l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "eigenprune": EigenImportance,
        "eigenprune-out": lambda: EigenImportance(side="out"),
        "eigenprune-both": lambda: EigenImportance(side="both"),
    }[name]()


# ---------------------------------------------------------------- graph helpers


def _graph(model: nn.Module, x: torch.Tensor) -> tp.DependencyGraph:
    return tp.DependencyGraph().build_dependency(model, example_inputs=x[:2])


def _group(dg: tp.DependencyGraph, layer: nn.Module, idxs: list[int]):
    return dg.get_pruning_group(layer, dg.get_pruner_of_module(layer).prune_out_channels, idxs)


def widths(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Output width of each PRUNE layer."""
    dg = _graph(model, x)
    mods = dict(model.named_modules())
    return {r: dg.get_pruner_of_module(mods[r]).get_out_channels(mods[r]) for r in model.PRUNE}


def producers(model: nn.Module, x: torch.Tensor, *, out: bool = True) -> set[int]:
    """id() of every layer whose output channels are in a PRUNE group (e.g. both convolutions of a residual sum);
    with out=False, of every layer whose input channels are."""
    dg = _graph(model, x)
    mods = dict(model.named_modules())
    members = set()
    for r in model.PRUNE:
        w = dg.get_pruner_of_module(mods[r]).get_out_channels(mods[r])
        group = _group(dg, mods[r], list(range(w)))
        for item in group:
            if dg.is_out_channel_pruning_fn(item.dep.handler) == out:
                members.add(id(item.dep.target.module))
    return members


def ignored_for(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """Layers Torch-Pruning's sparsity pruners must leave alone: every Linear/Conv whose output channels are in no
    PRUNE group, and attention (so they regularize exactly the groups everyone prunes)."""
    members = producers(model, x)
    out = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and id(m) not in members]
    return out + [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


def scores(model: nn.Module, criterion: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per PRUNE layer, the score of each of its group's channels (on a copy; Taylor from the training loss on x, y)."""
    work = copy.deepcopy(model).eval()
    if criterion == "tp-taylor":
        work.zero_grad()
        F.cross_entropy(work(x), y).backward()
    dg = _graph(work, x)
    mods = dict(work.named_modules())
    imp = importance(criterion)
    out = {}
    for r in work.PRUNE:
        w = dg.get_pruner_of_module(mods[r]).get_out_channels(mods[r])
        group = _group(dg, mods[r], list(range(w)))
        s = imp(group)
        if s is None and criterion == "tp-bn-scale":  # a group without BatchNorm (a dense layer): L1 magnitude instead
            s = importance("tp-l1")(group)
        out[r] = s.detach().double().flatten()
    return out


def counts(width: dict[str, int], f: float) -> dict[str, int]:
    return {r: max(1, int(round(f * w))) for r, w in width.items()}


def prune(model: nn.Module, score: dict[str, torch.Tensor], keep: dict[str, int], x: torch.Tensor) -> nn.Module:
    """A copy of `model` keeping the keep[r] highest-scored channels of each group (ties: lower index)."""
    work = copy.deepcopy(model).eval()
    dg = _graph(work, x)
    mods = dict(work.named_modules())
    for r, k in keep.items():
        order = torch.sort(score[r], descending=True, stable=True).indices
        drop = sorted(order[k:].tolist())
        if drop:
            _group(dg, mods[r], drop).prune()
    return work.eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- training


def train(model: nn.Module, data, epochs: int, seed: int, *, lr: float = LR, penalty=None, pruner=None,
          growing: bool = False) -> nn.Module:
    """Adam on cross-entropy (+ `penalty(model)`); a Torch-Pruning sparsity `pruner` regularizes after every backward."""
    x, y = data
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(BATCH):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if penalty is not None:
                loss = loss + penalty(model)
            opt.zero_grad()
            loss.backward()
            if pruner is not None:
                pruner.regularize(model)
            opt.step()
        if growing:
            pruner.update_reg()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    x, y = data
    return 100.0 * float((model.eval()(x).argmax(1) == y).float().mean())


def per_layer(model: nn.Module) -> nn.Module:
    """Normalise the penalty per layer (in place): each spectral layer's l2_phi and l2_lam times (the mean number of
    phi entries over the spectral layers / its own), so that every layer's mean square weight counts alike."""
    layers = [m for m in model.modules() if isinstance(m, SpectralModule)]
    mean = sum(m.phi.numel() for m in layers) / len(layers)
    for m in layers:
        m.l2_phi, m.l2_lam = m.l2_phi * mean / m.phi.numel(), m.l2_lam * mean / m.phi.numel()
    return model


def trained(builder, kind: str, strength, splits, epochs: int, seed: int) -> nn.Module:
    """A model trained by `kind` at `strength`, as plain layers (spectral ones converted back, exactly)."""
    train_data = splits[0]
    torch.manual_seed(seed)
    model = builder()
    x = train_data[0]
    if kind == "standard":
        return train(model, train_data, epochs, seed)
    if kind.startswith("spectral/"):
        variant = SPECTRAL_VARIANTS[kind.split("/", 1)[1]]
        scope = variant[0]
        include, gates = None, {}
        if scope in ("pruned", "out"):
            ids = producers(model, x, out=scope == "pruned")
            include = [n for n, m in model.named_modules() if id(m) in ids and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
                       and getattr(m, "groups", 1) == 1]
        if scope == "out":
            gates = dict(train_lam_in=True, train_lam_out=False)
        model = spectralize(model, include=include, l2_phi=0.01 * strength, l2_lam=5e-4 * strength, **gates)
        if scope == "out":  # the same function with lam_in = 1, lam_out = 0, phi = W: w[o, i] = lam_in_i * phi[o, i]
            with torch.no_grad():
                for name in include:
                    layer = model.get_submodule(name)
                    layer.lam_in.fill_(1.0), layer.lam_out.zero_(), layer.phi.neg_()
        if variant[3:] == ("per-layer",):
            per_layer(model)
        return train(model, train_data, epochs, seed, penalty=spectral_penalty)
    ignored = ignored_for(model, x)
    common = dict(ignored_layers=ignored, pruning_ratio=0.5)
    if kind == "group-norm":
        pruner = tp.pruner.GroupNormPruner(model, x[:2], importance("tp-group-l2"), reg=strength, **common)
    elif kind == "growing-reg":
        pruner = tp.pruner.GrowingRegPruner(model, x[:2], importance("tp-group-l2"), reg=strength, delta_reg=strength / 4,
                                            **common)
    elif kind == "slimming":
        pruner = tp.pruner.BNScalePruner(model, x[:2], importance("tp-bn-scale"), reg=strength, **common)
    else:
        raise ValueError(kind)
    return train(model, train_data, epochs, seed, pruner=pruner, growing=kind == "growing-reg")


# ---------------------------------------------------------------- the measure


def scan(model, score, width, data, target, x_ex, *, start: int = 0, finetune=None, params_at=None):
    """Walk GRID from index `start` down; return (last index within target or None, its accuracy, {f: accuracy},
    {f: parameters}).

    `finetune(pruned)` is applied to every pruned model (f < 1) before it is evaluated. `params_at[f]` records (and
    checks) the parameter count of the pruned model at every f: equal for every pipeline.
    """
    best, best_acc, seen, sizes = None, None, {}, {}
    for i in range(start, len(GRID)):
        f = GRID[i]
        pruned = prune(model, score, counts(width, f), x_ex)
        p = sizes[f] = n_params(pruned)
        if params_at is not None:
            if params_at.setdefault(f, p) != p:
                raise AssertionError(f"unequal sizes at f={f}: {p} parameters, another pipeline {params_at[f]}")
        if finetune is not None and f < 1.0:
            finetune(pruned)
        acc = accuracy(pruned, data)
        seen[f] = acc
        if acc < target:
            break
        best, best_acc = i, acc
    return best, best_acc, seen, sizes


def check_prune_nodes(spectral_model, plain, score, width, x, f: float = 0.5, crit: str = "eigenprune") -> dict:
    """Ours through the library: prune_nodes on the spectral model with the same counts must give our pruned model.

    Groups prune_nodes leaves alone (e.g. a depthwise convolution's) are kept whole on both sides and listed.
    """
    keep = counts(width, f)
    alone = {}
    for r in keep:
        try:
            prune_nodes(spectral_model, {r: keep[r]}, example_inputs=x[:2], importance=importance(crit))
        except Exception as err:  # noqa: BLE001 - recorded: a group prune_nodes refuses
            alone[r] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    keep_lib = {r: k for r, k in keep.items() if r not in alone}
    if not keep_lib:
        return {"fraction": f, "ok": None, "left_alone": alone}
    mine = prune(plain, score, {r: (keep[r] if r in keep_lib else width[r]) for r in keep}, x)
    lib = prune_nodes(spectral_model, keep_lib, example_inputs=x[:2], importance=importance(crit))
    with torch.no_grad():
        diff = float((lib.eval()(x) - mine(x)).abs().max())
    return {"fraction": f, "ok": diff < 1e-4 and n_params(lib) == n_params(mine), "max_abs_diff": diff,
            "params_prune_nodes": n_params(lib), "params_bench": n_params(mine), "left_alone": alone}


def measure(plain, score, width, data, target, x, ft, params_at, full_params, *, with_ft: bool = True) -> dict:
    """The measure on `data` (validation or test): kept parameter fraction within `target`, without fine-tuning and
    (with_ft) with it, the fine-tuning scan starting below the without-fine-tuning answer."""
    best, acc0, seen0, size0 = scan(plain, score, width, data, target, x, params_at=params_at)
    out = {"fraction_no_ft": 1.0 if best is None else params_at[GRID[best]] / full_params, "within_no_ft": best is not None,
           "accuracy_no_ft": acc0, "unpruned_accuracy": seen0[1.0], "seen_no_ft": seen0, "sizes": dict(size0)}
    if not with_ft:
        return out
    first = 1 if best is None else best + 1
    best_ft, acc1, seen1, size1 = None, None, {}, {}
    if first < len(GRID):
        best_ft, acc1, seen1, size1 = scan(plain, score, width, data, target, x, start=first, finetune=ft, params_at=params_at)
    if best_ft is None:
        best_ft, acc1 = best, acc0
    out.update(fraction_ft=1.0 if best_ft is None else params_at[GRID[best_ft]] / full_params, within_ft=best_ft is not None,
               accuracy_ft=acc1, seen_ft=seen1)
    out["sizes"].update(size1)
    return out


def sweep_kind(kind, builder, splits, epochs, seed, strength_idx, crit, width, std_val, ft, params_at, full_params):
    """Train `kind` at each strength and measure it on the validation split; choose one strength for the
    without-fine-tuning column (its validation measure without fine-tuning) and one for the with-fine-tuning column
    (its validation measure with fine-tuning); ties go to the higher unpruned validation accuracy."""
    (x, y), val = splits[0], splits[1]
    sweep = []
    for s in [strengths(kind)[i] for i in strength_idx]:
        m = trained(builder, kind, s, splits, epochs, seed)
        plain = despectralize(copy.deepcopy(m)) if kind.startswith("spectral/") else m
        r = measure(plain, scores(plain, crit, x, y), width, val, std_val - TOLERANCE, x, ft, params_at, full_params)
        sweep.append({"strength": s, "val_accuracy": r["unpruned_accuracy"], "val_fraction": r["fraction_no_ft"],
                      "val_within": r["within_no_ft"], "val_fraction_ft": r["fraction_ft"], "val_within_ft": r["within_ft"],
                      "model": m, "plain": plain})
    no_ft = min(sweep, key=lambda r: (r["val_fraction"], -r["val_accuracy"]))
    with_ft = min(sweep, key=lambda r: (r["val_fraction_ft"], r["val_fraction"], -r["val_accuracy"]))
    public = [{k: v for k, v in r.items() if k not in ("model", "plain")} for r in sweep]
    return {"no_ft": no_ft, "ft": with_ft, "sweep": public}


def scaled(epochs: int, scale: float) -> int:
    """A model's training epochs under --epochs-scale (at least 1)."""
    return max(1, round(epochs * scale))


def run_one(name: str, seed: int, quick: bool, strength_idx: list[int], ours: list[str] | None = None,
            kinds: list[str] | None = None, epochs_scale: float = 1.0) -> dict:
    """Every pipeline (or those of `kinds`' trainings, standard always) on one model and seed; every training (not the
    fine-tuning) runs for the model's epochs times `epochs_scale`."""
    global GRID, FT_EPOCHS
    torch.set_num_threads(1)
    if quick:  # a smoke test: 3 fractions, 1 epoch of fine-tuning (set here too: --jobs workers import afresh)
        GRID, FT_EPOCHS = QUICK_GRID, 1
    builder, load, epochs, has_bn = prune_zoo.models(quick)[name]
    epochs = scaled(epochs, epochs_scale)
    splits = load()
    train_data, val, test = splits
    x, y = train_data
    start, cpu = time.perf_counter(), time.process_time()
    base = trained(builder, "standard", None, splits, epochs, seed)
    width = widths(base, x)
    full_params = n_params(base)
    std_val, std_test = accuracy(base, val), accuracy(base, test)
    params_at: dict[float, int] = {}
    ft = lambda m: train(m, train_data, FT_EPOCHS, seed + 1, lr=FT_LR)  # noqa: E731
    plan = [p for p in pipelines(ours or OURS) if p[1] != "slimming" or has_bn]
    if kinds is not None:
        plan = [p for p in plan if p[1] == "standard" or p[1].split("/")[0] in kinds]
    own: dict[str, str] = {}  # each training's strength is chosen with the criterion of its first pipeline (ours, not
    for _, t, c in plan:      # the TP L1 diagnostic on the same training)
        if t != "standard":
            own.setdefault(t, c)
    chosen = {"standard": {"no_ft": {"model": base, "plain": base, "strength": None},
                           "ft": {"model": base, "plain": base, "strength": None}, "sweep": None}}
    for kind, crit in own.items():
        chosen[kind] = sweep_kind(kind, builder, splits, epochs, seed, strength_idx, crit, width, std_val, ft, params_at,
                                  full_params)

    rows = []
    target = std_test - TOLERANCE
    for pipeline, kind, crit in plan:
        entry = chosen[kind]
        a, b = entry["no_ft"], entry["ft"]
        sc_a = scores(a["plain"], crit, x, y)
        ra = measure(a["plain"], sc_a, width, test, target, x, ft, params_at, full_params, with_ft=a is b)
        if a is b:
            rb, sc_b = ra, sc_a
        else:
            sc_b = scores(b["plain"], crit, x, y)
            rb = measure(b["plain"], sc_b, width, test, target, x, ft, params_at, full_params)
        row = {"model": name, "seed": seed, "pipeline": pipeline, "training": kind, "criterion": crit,
               "strength": b["strength"], "strength_no_ft": a["strength"], "sweep": entry["sweep"],
               "unpruned_test_accuracy": rb["unpruned_accuracy"], "unpruned_test_accuracy_no_ft": ra["unpruned_accuracy"],
               "standard_test_accuracy": std_test, "target": target, "params_full": full_params,
               "fraction_no_ft": ra["fraction_no_ft"], "within_no_ft": ra["within_no_ft"], "accuracy_no_ft": ra["accuracy_no_ft"],
               "fraction_ft": rb["fraction_ft"], "within_ft": rb["within_ft"], "accuracy_ft": rb["accuracy_ft"],
               "ft_model_fraction_no_ft": rb["fraction_no_ft"]}  # the FT column's model (its strength) without fine-tuning
        row["params_by_fraction"] = {str(f): p for f, p in {**ra["sizes"], **rb["sizes"]}.items()}  # every pruned model measured
        row["accuracy_by_fraction"] = {"no_ft": {str(f): v for f, v in ra["seen_no_ft"].items()},
                                       "ft": {str(f): v for f, v in rb["seen_ft"].items()}}
        if crit.startswith("eigenprune"):
            row["prune_nodes_check"] = check_prune_nodes(b["model"], b["plain"], sc_b, width, x, crit=crit)
        rows.append(row)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"{name} seed {seed}: {seconds:.0f} s ({cpu:.0f} CPU-s)", flush=True)
    return {"rows": rows, "params_at": {str(f): p for f, p in sorted(params_at.items(), reverse=True)}, "widths": width,
            "params_full": full_params, "seconds": seconds, "cpu_seconds": cpu, "model": name, "seed": seed}


def _run_task(task: tuple) -> dict:
    return run_one(*task)


# ---------------------------------------------------------------- report


def markdown(result: dict) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["model"], r["pipeline"]), []).append(r)

    def cell(rs, tag):
        vals = [r[f"fraction_{tag}"] for r in rs]
        fails = [not r[f"within_{tag}"] for r in rs]
        per = ", ".join("fail" if bad else f"{v:.3f}" for v, bad in zip(vals, fails))
        return f"{sum(vals) / len(vals):.3f}{'†' if any(fails) else ''} [{per}]"

    def chosen(r):
        if r["strength"] is None:
            return "-"
        return f"{r['strength_no_ft']:g}/{r['strength']:g}"

    lines = ["| model | pipeline | strength no FT/FT | unpruned acc % | kept params, no FT | kept params, FT |",
             "|---|---|---|---|---|---|"]
    for (model, pipeline), rs in groups.items():
        strength = ", ".join(chosen(r) for r in rs)
        acc = sum(r["unpruned_test_accuracy"] for r in rs) / len(rs)
        lines.append(f"| {model} | {pipeline} | {strength} | {acc:.1f} | {cell(rs, 'no_ft')} | {cell(rs, 'ft')} |")
    return "\n".join(lines)


def machine() -> dict:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), model)
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import version

    return {"cpu": model, "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_pruning": version("torch-pruning"), "threads_per_job": 1,
            "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def merge(paths: list[Path], out: Path) -> dict:
    """One result from several runs' JSON (parts of one benchmark: other models, seeds or trainings). Rows are keyed by
    (model, seed, pipeline); a key found twice must have the same numbers (the standard pipelines, which every part
    runs) and is kept once. Equal sizes are checked across all parts."""
    parts = [json.loads(Path(q).read_text()) for q in paths]
    rows, seen, models = [], {}, {}
    for part in parts:
        for r in part["rows"]:
            key = (r["model"], r["seed"], r["pipeline"])
            if key in seen:  # the standard pipelines run in every part: the same numbers (deterministic), kept once
                if seen[key] != (r["fraction_no_ft"], r["fraction_ft"]):
                    raise SystemExit(f"{key} differs between the merged files: {seen[key]} and "
                                     f"{(r['fraction_no_ft'], r['fraction_ft'])}")
                continue
            seen[key] = (r["fraction_no_ft"], r["fraction_ft"])
            rows.append(r)
        for name, info in part["models"].items():
            ref = models.setdefault(name, info)["params_at"]
            if any(ref.get(f, v) != v for f, v in info["params_at"].items()):
                raise SystemExit(f"unequal sizes across the merged files for {name}")
    order = {name: i for i, name in enumerate(prune_zoo.models(False))}
    rows.sort(key=lambda r: (order.get(r["model"], 99), r["seed"]))
    result = {"merged_from": [str(q) for q in paths], "runs": [{k: v for k, v in part.items() if k not in ("rows", "table")}
                                                                for part in parts], "models": models, "rows": rows}
    result["table"] = markdown(result)
    out.write_text(json.dumps(result, indent=1))
    print(result["table"])
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="merge these result files into --out and stop")
    parser.add_argument("--quick", action="store_true", help="CI form: tiny models and data, 1 seed, strengths 0 and 2")
    parser.add_argument("--seeds", type=int, default=None, help="how many seeds (default 5; 1 with --quick)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first..first+n-1 (default 0): split a run in parts")
    parser.add_argument("--models", default=None, help="comma-separated subset of " + ", ".join(prune_zoo.models(True)))
    parser.add_argument("--strengths", default=None, help="indices into each sweep, e.g. 0,2 (default all 3; 0,2 with --quick)")
    parser.add_argument("--ours", default=",".join(OURS),
                        help="spectral variant(s) to measure, the first as ours: " + ", ".join(SPECTRAL_VARIANTS))
    parser.add_argument("--kinds", default=None, help="only these trainings besides standard, e.g. spectral "
                        "(default all: spectral, group-norm, growing-reg, slimming)")
    parser.add_argument("--epochs-scale", type=float, default=1.0,
                        help="train every model for its epochs times this (default 1; fine-tuning unchanged)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes over (model, seed) (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "real_models.json")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    names = list(prune_zoo.models(args.quick))
    if args.models:
        unknown = [m for m in args.models.split(",") if m not in names]
        if unknown:
            parser.error(f"unknown model(s) {unknown}; known: {names}")
        names = args.models.split(",")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 5)
    if seeds < 1:
        parser.error(f"--seeds must be >= 1, got {seeds}")
    idx = [int(i) for i in args.strengths.split(",")] if args.strengths else ([0, 2] if args.quick else [0, 1, 2])
    if not idx or any(not 0 <= i < 3 for i in idx):
        parser.error("--strengths takes indices 0, 1, 2")
    global GRID, FT_EPOCHS
    if args.quick:
        GRID, FT_EPOCHS = QUICK_GRID, 1
    seed_list = list(range(args.first_seed, args.first_seed + seeds))
    ours = args.ours.split(",")
    if any(v not in SPECTRAL_VARIANTS for v in ours):
        parser.error(f"--ours takes variants of {list(SPECTRAL_VARIANTS)}, got {ours}")
    kinds = args.kinds.split(",") if args.kinds else None
    if not (math.isfinite(args.epochs_scale) and args.epochs_scale > 0):
        parser.error(f"--epochs-scale must be a finite number > 0, got {args.epochs_scale}")
    tasks = [(n, s, args.quick, idx, ours, kinds, args.epochs_scale) for n in names for s in seed_list]
    info = {"machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial.jsonl")  # each (model, seed) as it finishes: a killed run keeps its parts
    partial.write_text("")
    parts = []

    def keep(part):
        parts.append(part)
        with partial.open("a") as fh:
            fh.write(json.dumps(part) + "\n")

    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for part in pool.imap_unordered(_run_task, tasks):
                keep(part)
    else:
        for t in tasks:
            keep(run_one(*t))
    parts.sort(key=lambda p: (names.index(p["model"]), p["seed"]))
    zoo = prune_zoo.models(args.quick)
    result = {
        **info, "seconds": time.perf_counter() - start, "quick": args.quick, "seeds": seed_list, "jobs": args.jobs,
        "grid": GRID, "tolerance_points": TOLERANCE, "epochs": {n: scaled(zoo[n][2], args.epochs_scale) for n in names},
        "epochs_scale": args.epochs_scale,
        "lr": LR, "batch": BATCH, "finetune": {"epochs": FT_EPOCHS, "lr": FT_LR},
        "strengths": {**{k: [v[i] for i in idx] for k, v in STRENGTHS.items()},
                      **{f"spectral/{v}": [SPECTRAL_VARIANTS[v][1][i] for i in idx] for v in ours}},
        "ours": ours, "variants": {v: SPECTRAL_VARIANTS[v][0] for v in ours}, "kinds": kinds,
        "models": {p["model"]: {"params_full": p["params_full"], "widths": p["widths"], "params_at": p["params_at"]}
                   for p in parts},
        "per_run_seconds": {f"{p['model']}/{p['seed']}": p["seconds"] for p in parts},
        "per_run_cpu_seconds": {f"{p['model']}/{p['seed']}": p["cpu_seconds"] for p in parts},
        "rows": [r for p in parts for r in p["rows"]],
    }
    for p in parts:  # equal sizes across seeds too
        ref = result["models"][p["model"]]["params_at"]
        assert all(ref.get(f, v) == v for f, v in p["params_at"].items()), f"unequal sizes across seeds of {p['model']}"
    table = markdown(result)
    print(table)
    print(f"machine: {info['machine']['cpu']} ({info['machine']['cpus']} cores), {info['date']}, seeds {result['seeds']}, "
          f"{result['seconds']:.0f} s")
    args.out.write_text(json.dumps({**result, "table": table}, indent=1))
    partial.unlink()
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
