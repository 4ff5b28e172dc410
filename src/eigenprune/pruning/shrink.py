"""One call from a model and its data to the smallest model within a tolerance: `shrink`.

A thin layer over the library's pieces: `core.training.fit` trains (the reference without sparsity, then each
spectral strength of a short path), `spectralize` + `spectral_penalty` make the training spectral,
`select_channels` scores each trained model once, `choose_channels` + `prune_graph` cut it at each kept fraction
(largest first), `fit` fine-tunes the cut model, `evaluate` measures it on the validation data. Every model tried is
a row of the result's table. `minimal_width` (pruning/search.py) is the chain-MLP, one-layer form of the idea.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Union

import torch
import torch_pruning as tp
from torch import nn

from eigenprune.core.convert import OPTIONS, despectralize, spectral_penalty, spectralize
from eigenprune.core.io import first_line
from eigenprune.core.losses import Task
from eigenprune.core.training import Data, TrainingError, TrainSpec, data_batches, evaluate, fit
from eigenprune.pruning.graph import ChannelPlan, LayerRef, choose_channels, prune_graph, select_channels
from eigenprune.pruning.keep import PruneError

log = logging.getLogger("eigenprune")

Strength = Union[float, dict, str]
"""One point of the path: a multiplier m on the spectral layers' default penalty (`spectralize(l2_phi=0.01 m,
l2_lam=5e-4 m)`), a dict of `spectralize` keyword options, or "standard" (no spectral training: the reference model,
pruned by the same criterion)."""

BASE_PENALTY = {"l2_phi": 0.01, "l2_lam": 5e-4}
"""The spectral layers' default coefficients; a numeric strength m multiplies both."""

DEFAULT_STRENGTHS: tuple[Strength, ...] = (0.1, 0.3, 1.0, "standard")
"""The default path: the benchmark's spectral sweep (benchmarks/bench_real_models.py, where the strength chosen on
validation ranged over 0.1-1 by model and seed) and standard training, which the same benchmark found as good or
better on several models (docs/pruning.md, "Real models, round 2"); it costs only fine-tuning (the reference model
is already trained), and the smallest model within tolerance wins whichever training made it."""

DEFAULT_FRACTIONS = (0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.07, 0.05)
"""Kept fractions of every channel group tried after the unpruned model, largest first (the benchmark's grid)."""

DEFAULT_TRAINING = TrainSpec(lr=2e-3, batch_size=64, epochs=10)
DEFAULT_FINETUNE = TrainSpec(lr=1e-3, batch_size=64, epochs=2)


@dataclass
class ShrinkResult:
    """What `shrink` chose and everything it tried.

    `model`: the chosen model (plain layers, eval mode, fine-tuned when fine-tuning was on); `kept`: its kept fraction
    of every pruned channel group (1.0: not pruned); `params` and `params_full`: its parameter count and the given
    model's; `metric` ("accuracy" or "loss"), `value`: the chosen model's validation value of it; `reference`,
    `target`: the reference value and the limit a model had to reach; `strength`: the point of the path it came from;
    `trained`: the trained, unpruned model the pruning plan was made on (spectral layers); `plan`: the channels kept
    (None when not pruned), so `prune_nodes(trained, plan, example_inputs=x)` is `model` before fine-tuning;
    `rows`: one dict per model tried (training, strength, kept, params, pruned: value right after pruning,
    finetuned: after fine-tuning or None, within); `reference_model`: the standard-trained model (reference "standard").
    """

    model: nn.Module
    kept: float
    params: int
    params_full: int
    metric: str
    value: float
    reference: float
    target: float
    strength: Strength | None
    trained: nn.Module
    plan: ChannelPlan | None
    rows: list[dict] = field(default_factory=list)
    reference_model: nn.Module | None = None

    def to_markdown(self) -> str:
        """The table of every model tried, as Markdown."""
        m = self.metric
        lines = [f"| training | strength | kept | params | val {m}, pruned | val {m}, fine-tuned | within |",
                 "|---|---|---:|---:|---:|---:|---|"]
        for r in self.rows:
            tuned = "-" if r["finetuned"] is None else f"{r['finetuned']:.4g}"
            lines.append(f"| {r['training']} | {_label(r['strength'])} | {r['kept']:g} | {r['params']:,} | {r['pruned']:.4g} | "
                         f"{tuned} | {'yes' if r['within'] else 'no'} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return (f"chose strength {_label(self.strength)}, kept {self.kept:g}: {self.params:,} of {self.params_full:,} "
                f"parameters, val {self.metric} {self.value:.4g} (reference {self.reference:.4g}, limit {self.target:.4g})\n"
                + self.to_markdown())


def _label(strength: Strength | None) -> str:
    if strength is None:
        return "-"
    if isinstance(strength, dict):
        return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in strength.items())
    return strength if isinstance(strength, str) else f"{strength:g}"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class _Run:
    """What every step of one `shrink` call shares."""

    train: Data
    val: Data
    task: Task
    training: TrainSpec
    finetune: TrainSpec | None
    seed: int
    example: torch.Tensor
    prune_options: dict
    say: Callable[[str], None]
    target: float = math.nan

    def measure(self, model: nn.Module, what: str) -> float:
        """The validation metric of `model`; a non-finite loss or metric is a PruneError, never a result."""
        values = evaluate(model, self.val, self.task)
        for name, value in values.items():  # the loss too: argmax of NaN logits is a finite accuracy of garbage
            if not math.isfinite(value):
                raise PruneError(f"the validation {name} of {what} is {value}: the validation data hold NaN/inf or the model diverged")
        return values["accuracy" if self.task == "classification" else "loss"]

    def within(self, value: float) -> bool:
        return value >= self.target if self.task == "classification" else value <= self.target

    def fit(self, model: nn.Module, spec: TrainSpec, what: str, penalty=None) -> nn.Module:
        try:
            return fit(model, self.train, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, seed=self.seed,
                       task=self.task, penalty=penalty, optimizer=spec.optimizer)
        except TrainingError as err:
            raise PruneError(f"{what}: {err}") from err


def _reporter(progress: bool | Callable[[str], object]) -> Callable[[str], None]:
    """Progress lines go to the "eigenprune" logger (INFO), and to stderr (progress=True) or to a callable."""
    if not (isinstance(progress, bool) or callable(progress)):
        raise PruneError(f"progress must be True, False or a callable taking one line of text, got {type(progress).__name__}")

    def say(line: str) -> None:
        log.info("shrink: %s", line)
        if progress is True:
            print(f"shrink: {line}", file=sys.stderr, flush=True)
        elif callable(progress):
            progress(line)

    return say


def _check_args(tolerance: float, task: str, reference: object, strengths: Sequence, fractions: Sequence) -> list[float]:
    """One line naming the bad value; returns the fractions, largest first."""
    if task not in ("classification", "regression"):
        raise PruneError(f"task must be 'classification' or 'regression', got {task!r}")
    if not (isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool) and math.isfinite(tolerance) and tolerance >= 0):
        raise PruneError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if task == "classification" and tolerance >= 1:
        raise PruneError(f"tolerance is a share of accuracy (0.01 = one point), so it must be < 1; got {tolerance!r}")
    if not (reference in ("standard", "as-given") or (isinstance(reference, (int, float)) and not isinstance(reference, bool)
                                                       and math.isfinite(reference) and reference >= 0)):
        raise PruneError(f"reference must be 'standard', 'as-given' or a finite number >= 0 (an accuracy in [0, 1] or a loss), "
                         f"got {reference!r}")
    if task == "classification" and isinstance(reference, (int, float)) and reference > 1:
        raise PruneError(f"reference is an accuracy in [0, 1] (0.95 = 95%), got {reference!r}")
    if isinstance(strengths, (str, dict)) or not len(strengths):
        raise PruneError(f"strengths must be a non-empty list (numbers, dicts of spectralize options, 'standard'), got {strengths!r}")
    for s in strengths:
        if isinstance(s, dict) and (unknown := sorted(set(s) - {*OPTIONS, "include", "exclude"})):
            raise PruneError(f"a strength's spectralize options must be among {', '.join(OPTIONS)}, include, exclude; "
                             f"got {', '.join(map(str, unknown))}")
        if not (s == "standard" or isinstance(s, dict) or (isinstance(s, (int, float)) and not isinstance(s, bool)
                                                           and math.isfinite(s) and s >= 0)):
            raise PruneError(f"a strength must be a finite number >= 0, a dict of spectralize options or 'standard', got {s!r}")
    bad = [f for f in fractions if not (isinstance(f, float) and 0 < f < 1)]
    if bad or not len(fractions):
        raise PruneError(f"fractions must be a non-empty list of floats in (0, 1) (kept shares), got {list(fractions)!r}")
    return sorted(set(fractions), reverse=True)


def _check_fits(model: nn.Module, data: Data, name: str, task: Task) -> torch.Tensor:
    """The first two inputs of `data` after checking that its first batch fits `model` and its targets the task."""
    try:
        x, y = next(data_batches(data, name, batch_size=64))
    except TrainingError as err:
        raise PruneError(str(err)) from None
    who = type(model).__name__
    tensors = isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
    labels = data[1] if tensors else y  # tensors: every target, not only the first batch's
    work = copy.deepcopy(model).eval()
    device = next(iter(work.parameters()), torch.zeros(())).device
    try:
        with torch.no_grad():
            out = work(x.to(device))
    except Exception as err:  # noqa: BLE001 - any failure means these inputs do not fit this model
        raise PruneError(f"{name}: inputs of shape {list(x.shape)} do not fit {who}: {type(err).__name__}: {first_line(err)}") from None
    if not isinstance(out, torch.Tensor):
        raise PruneError(f"{who} returns a {type(out).__name__}, not a tensor: shrink needs one output tensor")
    if task == "classification":
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1 or out.dim() != 2:
            raise PruneError(f"{name}: classification needs integer class targets of shape [B] and logits [B, C]; got targets "
                             f"{y.dtype} {list(y.shape)} and output {list(out.shape)}")
        if int(labels.min()) < 0 or int(labels.max()) >= out.shape[1]:  # cross-entropy would index out of range
            raise PruneError(f"{name}: class targets must lie in [0, {out.shape[1]}) ({who} has {out.shape[1]} outputs), "
                             f"got {int(labels.min())}..{int(labels.max())}")
    elif out.squeeze(-1).shape != y.shape or not y.dtype.is_floating_point:
        raise PruneError(f"{name}: regression targets of shape {list(y.shape)} ({y.dtype}) do not fit the output "
                         f"{list(out.shape)}; give float targets of shape {list(out.squeeze(-1).shape)}")
    return x[:2].to(device)


def _reference(model: nn.Module, run: _Run, reference: float | str) -> tuple[float, nn.Module | None, list[dict]]:
    """(reference value, the standard-trained model or None, its table row)."""
    if isinstance(reference, (int, float)):
        return float(reference), None, []
    work = copy.deepcopy(model)
    if reference == "standard":
        run.say(f"standard training ({run.training.epochs} epochs, no sparsity term): the reference")
        run.fit(work, run.training, "standard training")
    value = run.measure(work, f"the {reference} model")
    run.say(f"reference ({reference}): val {'accuracy' if run.task == 'classification' else 'loss'} {value:.4g}")
    row = {"training": "reference", "strength": reference, "kept": 1.0, "params": n_params(work), "pruned": value,
           "finetuned": None, "within": True}
    return value, (work if reference == "standard" else None), [row]


def _trained(model: nn.Module, strength: Strength, run: _Run, standard: nn.Module | None) -> nn.Module:
    """The model trained at `strength` (spectral layers), or the standard one."""
    if strength == "standard":
        if standard is None:
            run.say(f"standard training ({run.training.epochs} epochs, no sparsity term)")
            standard = run.fit(copy.deepcopy(model), run.training, "standard training")
        return standard
    options = dict(strength) if isinstance(strength, dict) else {k: v * strength for k, v in BASE_PENALTY.items()}
    if "include" not in options and "exclude" not in options:  # spectral only where channels are pruned (see shrink)
        options["include"] = list(select_channels(model, 1.0, run.example, ignored_layers=run.prune_options["ignored_layers"]).members)
    work = spectralize(copy.deepcopy(model), **options)
    run.say(f"strength {_label(strength)}: spectral training ({run.training.epochs} epochs)")
    return run.fit(work, run.training, f"spectral training at strength {_label(strength)}", penalty=spectral_penalty)


def _scan(trained: nn.Module, strength: Strength, run: _Run, fractions: list[float]) -> tuple[list[dict], tuple | None]:
    """Rows for the unpruned model and each fraction (largest first, up to the first one out of tolerance), and the
    smallest within: (kept, model, plan, value) or None. The plan is scored once; each fraction only re-decides."""
    kind = "standard" if strength == "standard" else "spectral"
    value = run.measure(trained, f"the model trained at strength {_label(strength)}")
    plain = despectralize(copy.deepcopy(trained)).eval()
    rows = [{"training": kind, "strength": strength, "kept": 1.0, "params": n_params(plain), "pruned": value, "finetuned": None,
             "within": run.within(value)}]
    run.say(f"strength {_label(strength)}, unpruned: val {value:.4g}{'' if rows[0]['within'] else ' (out of tolerance)'}")
    best = (1.0, plain, None, value) if rows[0]["within"] else None
    scored = select_channels(trained, 1.0, run.example, **run.prune_options)
    for f in fractions:
        plan = choose_channels(scored, f, global_ranking=run.prune_options["global_ranking"])
        small = prune_graph(trained, plan, run.example)
        pruned = run.measure(small, f"the model pruned to {f:g}")
        tuned = None
        if run.finetune is not None:
            run.fit(small, run.finetune, f"fine-tuning at kept {f:g}")
            tuned = run.measure(small, f"the model pruned to {f:g} and fine-tuned")
        final = pruned if tuned is None else tuned
        rows.append({"training": kind, "strength": strength, "kept": f, "params": n_params(small), "pruned": pruned,
                     "finetuned": tuned, "within": run.within(final)})
        run.say(f"strength {_label(strength)}, kept {f:g}: {n_params(small):,} parameters, val {pruned:.4g}"
                + ("" if tuned is None else f", fine-tuned {tuned:.4g}") + ("" if rows[-1]["within"] else " (out of tolerance: stop)"))
        if not rows[-1]["within"]:
            break
        best = (f, small.eval(), plan, final)
    return rows, best


def _choose(found: tuple | None, rows: list[dict], run: _Run, model: nn.Module, standard: nn.Module | None,
            reference: float | str, ref: float, tolerance: float) -> tuple:
    """(strength, trained model, (kept, chosen model, plan, value)) of the best candidate found; without one, the
    reference model when there is one (it is within by definition), else a PruneError naming the closest."""
    if found is not None:
        return found[3:]
    if standard is not None:
        return "standard", standard, (1.0, copy.deepcopy(standard).eval(), None, ref)
    if reference == "as-given":
        given = copy.deepcopy(model).eval()
        return None, given, (1.0, given, None, ref)
    final = [r["pruned"] if r["finetuned"] is None else r["finetuned"] for r in rows]
    i = max(range(len(rows)), key=lambda j: final[j] if run.task == "classification" else -final[j])
    raise PruneError(f"no model came within tolerance {tolerance:g} of the reference {ref:.4g} (limit {run.target:.4g}); the "
                     f"closest: strength {_label(rows[i]['strength'])}, kept {rows[i]['kept']:g}, val {final[i]:.4g}")


def shrink(
    model: nn.Module, train: Data, val: Data, *, tolerance: float, task: Task = "classification",
    reference: float | str = "standard", strengths: Sequence[Strength] = DEFAULT_STRENGTHS,
    fractions: Sequence[float] = DEFAULT_FRACTIONS, training: TrainSpec = DEFAULT_TRAINING,
    finetune: TrainSpec | None = DEFAULT_FINETUNE, seed: int = 0, importance: tp.importance.Importance | None = None,
    global_ranking: bool = False, ignored_layers: Sequence[LayerRef] | None = None,
    progress: bool | Callable[[str], object] = False,
) -> ShrinkResult:
    """The smallest model within `tolerance` of a reference on the validation data; `model` is not modified.

    `model`: any model Torch-Pruning can trace (it is trained from the weights it has). `train`, `val`: tensors
    (x, y) or DataLoaders of (x, y) batches. `task`: "classification" (the metric is validation accuracy, a share:
    a model is within when accuracy >= reference - tolerance, so tolerance 0.01 is one point) or "regression" (the
    mean squared error: within when loss <= reference * (1 + tolerance)). `reference`: "standard" (default: a copy
    of `model` trained with the same budget and no sparsity term, as the benchmark measures against), "as-given"
    (`model` itself, e.g. already trained) or a number.

    For each point of `strengths` (see `Strength`) a copy of `model` is spectralized (only the layers that produce
    prunable channels, the variant that pruned furthest in the benchmark: docs/pruning.md; a dict strength with
    `include` or `exclude` chooses otherwise) and trained (`training`:
    lr, batch size, epochs; Adam on the task loss + `spectral_penalty`; batches shuffled from `seed`), scored once
    (`select_channels`: `importance`, default `EigenImportance`; `global_ranking`; `ignored_layers`), then cut to each
    of `fractions` (every channel group keeps that share, ceil, largest first; `choose_channels` + `prune_graph`),
    fine-tuned (`finetune`, no sparsity term; None: off) and measured, until one is out of tolerance. The chosen
    model is the one with the fewest parameters within tolerance (ties: the better metric, then the earlier point).
    When none is, the standard reference model is chosen (kept 1.0); with a numeric reference and no model within,
    a PruneError says how close the best came. `progress`: True prints a line per step to stderr, a callable gets
    each line; they also go to the "eigenprune" logger at INFO. Bad arguments, data that do not fit the model and a
    non-finite training loss or validation metric are a one-line PruneError.
    """
    fractions = _check_args(tolerance, task, reference, strengths, fractions)
    example = _check_fits(model, train, "the training data", task)
    _check_fits(model, val, "the validation data", task)
    run = _Run(train, val, task, replace(training, task=task), finetune and replace(finetune, task=task), seed, example,
               {"importance": importance, "global_ranking": global_ranking, "ignored_layers": ignored_layers},
               _reporter(progress))
    ref, standard, rows = _reference(model, run, reference)
    run.target = ref - tolerance if task == "classification" else ref * (1 + tolerance)
    found = None  # the best so far: (parameters, -accuracy or loss, index on the path, strength, trained model, scan's best)
    for i, strength in enumerate(strengths):
        trained = _trained(model, strength, run, standard)
        tried, best = _scan(trained, strength, run, fractions)
        rows += tried
        if best is not None:
            candidate = (n_params(best[1]), -best[3] if task == "classification" else best[3], i, strength, trained, best)
            found = candidate if found is None or candidate[:3] < found[:3] else found
    strength, trained, (kept, chosen, plan, value) = _choose(found, rows, run, model, standard, reference, ref, tolerance)
    result = ShrinkResult(chosen, kept, n_params(chosen), n_params(model), "accuracy" if task == "classification" else "loss",
                          value, ref, run.target, strength, trained, plan, rows, standard)
    run.say(str(result).splitlines()[0])
    return result
