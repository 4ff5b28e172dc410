"""Bad input, round 2 (issue #12, sections 2-5 and more): every case through the real CLI.

Each case runs `eigenprune ...` in-process in a fresh folder holding only its input files and
asserts: exit code 2, stderr is exactly one line starting `error:` (no traceback), nothing on
stdout, and every input file byte-identical afterwards with no file or folder added or removed.
`python tests/test_bad_input_cases.py` prints the table of docs/reliability.md ("Bad input, round 2")
with the messages the program gives now.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY, edit_safetensors_header  # noqa: E402
from eigenprune.cli import app  # noqa: E402
from eigenprune.core.plans import LayerPlan, make_student  # noqa: E402
from eigenprune.experiments.config import parse_config  # noqa: E402
from eigenprune.experiments.grid import plan_chunks  # noqa: E402
from eigenprune.experiments.plan import check_memory  # noqa: E402
from eigenprune.experiments.runner import run_experiment  # noqa: E402
from eigenprune.pruning.checkpoint import load_model, save_model  # noqa: E402

runner = CliRunner()
STUDENT = "run/chunks/spectral-w6_12/students/spectral-N12-t0.safetensors"
FAILED = "run/chunks/direct-w6_12/students/direct-N12-t0.safetensors"
STORED = {**TINY, "workers": 1, "data": {"n_train": 200, "n_test": 150, "teacher": {"widths": [4, 4]}},
          "direct": {**TINY["direct"], "lr": 1e10}}
"""The stored run: spectral students N=6, 12 of a teacher 10->4->4->1; every direct student diverges (lr 1e10)."""


# --- input files -------------------------------------------------------------------------------------

def rows(n: int = 40, *, a=None, y=None, header: str = "a,b,y") -> str:
    """A small CSV: columns a, b (numbers) and y; `a` / `y` replace one value (row 3) by a given text."""
    lines = [header]
    for i in range(n):
        av = a if (a is not None and i == 2) else f"{(i * 7) % 11 / 3:.3f}"
        yv = y if (y is not None and i == 2) else f"{i % 5 / 2:.2f}"
        lines.append(f"{av},{(i * 3) % 7 - 2},{yv}")
    return "\n".join(lines) + "\n"


def csv_config(csv: dict | None = None, **top) -> str:
    body = {**TINY, "student": {"widths": [4], "head": "linear"},
            "data": {"source": "csv", "csv": {"path": "d.csv", "target": "y", **(csv or {})}}}
    for key, value in top.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return yaml.safe_dump(body)


def edited_arch(change: Callable[[list], None], source: str = "good.safetensors") -> Callable[[Path], None]:
    """Setup: a copy of `source` named edited.safetensors whose stored architecture `change` edits."""
    def setup(d: Path) -> None:
        def edit(header):
            arch = json.loads(header["__metadata__"]["eigenprune"])
            change(arch)
            header["__metadata__"]["eigenprune"] = json.dumps(arch)
        (d / "edited.safetensors").write_bytes(edit_safetensors_header((d / source).read_bytes(), edit))
    return setup


def good_model(d: Path) -> None:
    model = make_student(10, [LayerPlan(6, "spectral"), LayerPlan(4, "direct", 0.0, 0.0), LayerPlan(1, "fixed", 0.0, 0.0)], seed=1)
    save_model(model, d / "good.safetensors")


def act_model(d: Path) -> None:
    save_model(nn.Sequential(nn.Linear(10, 6), nn.LeakyReLU(0.1), nn.Linear(6, 4), nn.GELU(), nn.Linear(4, 1)),
               d / "good.safetensors")


def unchained(d: Path) -> None:
    save_model(nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1)), d / "edited.safetensors")


def classifier(d: Path) -> None:
    model = make_student(10, [LayerPlan(6, "spectral"), LayerPlan(3, "direct", 0.0, 0.0, bias=True)], seed=2)
    save_model(model, d / "clf.safetensors")


def tensors(**named) -> Callable[[Path], None]:
    """Setup: a safetensors data file v.safetensors holding the given tensors."""
    return lambda d: save_file({k: v.contiguous() for k, v in named.items()}, str(d / "v.safetensors"))


def damaged_student(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Setup: bad.safetensors, the stored spectral student with `change` applied to its tensors."""
    def setup(d: Path) -> None:
        model, extra = load_model(d / STUDENT)
        state = model.state_dict()
        change(state)
        model.load_state_dict(state)
        save_model(model, d / "bad.safetensors", extra)
    return setup


def _nan_row(s):
    s["0.phi"][3] = float("nan")


def _inf_lam(s):
    s["0.lam_out"][1] = float("inf")


def index_csv(d: Path) -> None:
    import pandas as pd

    pd.read_csv(d / "d.csv").to_csv(d / "d.csv")  # with pandas' default index=True


def extra_trial_text(d: Path) -> None:
    def edit(header):
        extra = json.loads(header["__metadata__"]["extra"])
        header["__metadata__"]["extra"] = json.dumps({**extra, "trial": "first"})
    (d / "edited.safetensors").write_bytes(edit_safetensors_header((d / STUDENT).read_bytes(), edit))


def two_runs(d: Path) -> None:
    shutil.copytree(d / "run", d / "run2")


# --- the cases -------------------------------------------------------------------------------------

@dataclass
class Case:
    """One bad input: the command line (run in a folder holding `files`), what it shows for the docs,
    and a part of the message it must give."""

    id: str
    args: list[str]
    expect: str
    files: dict[str, str | bytes] = field(default_factory=dict)
    setup: tuple[Callable[[Path], None], ...] = ()
    run: bool = False  # copy the stored run folder to ./run first
    show: str = ""  # the input, as the docs table shows it (default: the command line)
    section: str = "more"


RUN_CSV = ["run", "c.yaml", "--out", "out", "--quiet"]
PRUNE = ["prune", STUDENT, "--out", "p.safetensors"]

CASES = [
    # section 2: garbage accepted with exit 0
    Case("csv-feature-inf", RUN_CSV, "column 'a' holds inf (data row 3)", {"d.csv": rows(a="inf"), "c.yaml": csv_config()},
         show="CSV feature value `inf`", section="2"),
    Case("csv-feature-neg-inf", RUN_CSV, "column 'a' holds -inf", {"d.csv": rows(a="-inf"), "c.yaml": csv_config()},
         show="CSV feature value `-inf`", section="2"),
    Case("csv-feature-1e308", RUN_CSV, "column 'a' is not finite once standardized",
         {"d.csv": rows(a="1e308"), "c.yaml": csv_config()}, show="CSV feature value `1e308` (its std overflows)", section="2"),
    Case("csv-target-inf", RUN_CSV, "column 'y' holds inf", {"d.csv": rows(y="inf"), "c.yaml": csv_config()},
         show="CSV target value `inf`", section="2"),
    Case("csv-target-1e300", RUN_CSV, "whose squared error overflows float32", {"d.csv": rows(y="1e300"), "c.yaml": csv_config()},
         show="CSV target value `1e300` (float32 training)", section="2"),
    Case("csv-target-1e300-float64", RUN_CSV, "whose squared error overflows float64",
         {"d.csv": rows(y="1e300"), "c.yaml": csv_config(dtype="float64")}, show="CSV target `1e300` with `dtype: float64`",
         section="2"),
    Case("prune-failed-student", ["prune", FAILED, "--out", "p.safetensors"], "the unpruned model's validation loss is inf", run=True,
         show="`prune --keep auto` on the run's own failed (diverged) student", section="2"),
    Case("prune-nan-phi-row", ["prune", "bad.safetensors", "--keep", "3", "--out", "p.safetensors"],
         "the model's 0.phi holds 10 NaN/inf value(s)", run=True, setup=(damaged_student(_nan_row),),
         show="`prune --keep 3` on a student with a NaN row in `phi`", section="2"),
    Case("prune-inf-lam-out", ["prune", "bad.safetensors", "--keep", "0.5", "--out", "p.safetensors"],
         "the model's 0.lam_out holds 1 NaN/inf value(s)", run=True, setup=(damaged_student(_inf_lam),),
         show="`prune --keep 0.5` on a student with `inf` in `lam_out`", section="2"),
    Case("prune-zero-row-data", ["prune", "good.safetensors", "--data", "v.safetensors", "--out", "p.safetensors"],
         "x_val has no rows", setup=(good_model, tensors(x=torch.zeros(0, 10), y=torch.zeros(0))),
         show="`prune --keep auto --data v.safetensors` with x [0, 10], y [0]", section="2"),
    Case("prune-nan-data", ["prune", "good.safetensors", "--data", "v.safetensors", "--out", "p.safetensors"],
         "x_val holds 1 NaN/inf value(s)",
         setup=(good_model, tensors(x=torch.ones(8, 10).index_put_((torch.tensor([2]), torch.tensor([3])), torch.tensor(float("nan"))),
                                    y=torch.zeros(8))),
         show="`prune --keep auto --data v.safetensors` with a NaN in x", section="2"),
    Case("csv-duplicate-header", RUN_CSV, "repeats the column name(s) ['y'] in its header",
         {"d.csv": rows(header="a,b,y").replace("a,b,y\n", "a,y,y\n"), "c.yaml": csv_config()},
         show="CSV header `a,y,y` (pandas renames the second `y`)", section="2"),
    Case("csv-one-class", RUN_CSV, "has one class only", {"d.csv": rows().replace(",0.00\n", ",1\n").replace(",0.50\n", ",1\n")
                                                         .replace(",1.00\n", ",1\n").replace(",1.50\n", ",1\n").replace(",2.00\n", ",1\n"),
                                                         "c.yaml": csv_config({"task": "classification"})},
         show="classification CSV whose target has one class", section="2"),
    Case("yaml-duplicate-section", ["run", "c.yaml", "--out", "out", "--quiet"], "duplicate key 'student' (first at line 1)",
         {"c.yaml": "student: {widths: [4]}\ntrials: 1\nstudent: {rest: [3]}\n"}, show="`student:` twice in a config",
         section="2"),
    Case("yaml-duplicate-nested", ["run", "c.yaml", "--out", "out", "--quiet"], "duplicate key 'lr'",
         {"c.yaml": "spectral:\n  lr: 0.01\n  epochs: 3\n  lr: 0.02\n"}, show="`spectral: {lr: ..., lr: ...}` (nested)",
         section="2"),
    Case("config-duplicate-key", ["config", "c.yaml"], "duplicate key 'trials'", {"c.yaml": "trials: 1\ntrials: 2\n"},
         show="`eigenprune config` on a file with `trials:` twice", section="2"),
    Case("csv-index-column", RUN_CSV, "has a column without a name (pandas calls it 'Unnamed: 0'",
         {"d.csv": rows(), "c.yaml": csv_config()}, setup=(index_csv,),
         show="CSV written by `DataFrame.to_csv` with its index column", section="2"),
    Case("csv-target-in-features", RUN_CSV, "lists the target 'y'",
         {"d.csv": rows(), "c.yaml": csv_config({"features": ["a", "y"]})}, show="`features: [a, y]` with `target: y`",
         section="2"),
    Case("csv-n-train", RUN_CSV, "config: data.n_train (500) only applies to data.source teacher",
         {"d.csv": rows(), "c.yaml": csv_config(data={"source": "csv", "csv": {"path": "d.csv", "target": "y"}, "n_train": 500})},
         show="`data.n_train: 500` with CSV data", section="2"),
    Case("csv-input-dim", RUN_CSV, "data.input_dim (3) only applies to data.source teacher",
         {"d.csv": rows(), "c.yaml": csv_config(data={"source": "csv", "csv": {"path": "d.csv", "target": "y"}, "input_dim": 3})},
         show="`data.input_dim: 3` with CSV data", section="2"),
    Case("digits-n-test", ["run", "--set", "data.source=digits", "--set", "student.head=linear", "--set", "data.n_test=10",
                           "--out", "out", "--quiet"], "data.n_test (10) only applies", show="digits with `data.n_test=10`",
         section="2"),
    Case("batch-larger-than-set", ["run", "t.yaml", "--set", "spectral.batch_size=500", "--out", "out", "--quiet"],
         "spectral.batch_size 500 is larger than the 200 training patterns", {"t.yaml": yaml.safe_dump(TINY)},
         show="`spectral.batch_size=500` with 200 training patterns", section="2"),
    Case("batch-larger-than-fit", ["plan", "t.yaml", "--set", "regularization.mode=path", "--set", "direct.batch_size=200",
                                   "--measure", "0"], "direct.batch_size 200 is larger than the 160 training patterns (40 of the 200",
         {"t.yaml": yaml.safe_dump(TINY)}, show="`direct.batch_size=200` on a path (160 of 200 patterns fit)", section="2"),
    Case("trials-true", ["run", "--set", "trials=true", "--out", "out", "--quiet"], "trials: must be a number, not the boolean true",
         show="`--set trials=true`", section="2"),
    Case("lr-true", ["plan", "--set", "spectral.lr=true", "--measure", "0"], "spectral.lr: must be a number, not the boolean true",
         show="`--set spectral.lr=true`", section="2"),
    Case("compare-lr-inf", ["compare", "--set", "train.lr=.inf", "--out", "out", "--quiet"],
         "train.lr: Input should be a finite number (got inf)", show="`compare --set train.lr=.inf`", section="2"),
    Case("compare-seed-negative", ["compare", "--set", "seed=-1", "--out", "out", "--quiet"],
         "seed: Input should be greater than or equal to 0 (got -1)", show="`compare --set seed=-1`", section="2"),
    Case("prune-rtol-nan", [*PRUNE, "--rtol", "nan"], "rtol and atol must be finite numbers >= 0, got rtol=nan", run=True,
         show="`prune --rtol nan`", section="2"),
    Case("prune-atol-inf", [*PRUNE, "--atol", "inf"], "got rtol=0.05, atol=inf", run=True, show="`prune --atol inf`", section="2"),
    Case("prune-layers-empty", [*PRUNE, "--keep", "3", "--layers="], "--layers takes comma-separated hidden layer indices", run=True,
         show="`prune --layers=` (empty)", section="2"),
    Case("plan-100000-trials", ["plan", "--set", "trials=100000", "--measure", "0"], "chunk spectral-w200-tr0_229 (230 students)",
         show="`plan --set trials=100000` (answered in milliseconds; before: no answer after 120 s)", section="2"),
    Case("plan-measure-huge", ["plan", "--measure", "1000000"], "Invalid value for '--measure'",
         show="`plan --measure 1000000`", section="2"),
    # section 3: tracebacks
    Case("prune-auto-labels-for-regression", ["prune", "good.safetensors", "--data", "v.safetensors", "--out", "p.safetensors"],
         "y holds integer class labels (torch.int64) but the model has one output",
         setup=(good_model, tensors(x=torch.randn(8, 10), y=torch.arange(8))),
         show="`prune --keep auto` of a regression model with integer labels y", section="3"),
    Case("prune-auto-floats-for-classifier", ["prune", "clf.safetensors", "--data", "v.safetensors", "--out", "p.safetensors"],
         "the model has 3 outputs (a classifier) but y holds floats", setup=(classifier, tensors(x=torch.randn(8, 10), y=torch.randn(8))),
         show="`prune --keep auto` of a 3-class classifier with float y", section="3"),
    Case("prune-auto-label-out-of-range", ["prune", "clf.safetensors", "--data", "v.safetensors", "--out", "p.safetensors"],
         "class labels in y must be 0..2 (the model has 3 outputs), got 0..7",
         setup=(classifier, tensors(x=torch.randn(8, 10), y=torch.arange(8))), show="3-class classifier, labels 0..7", section="3"),
    Case("prune-auto-y-column", ["prune", "good.safetensors", "--data", "v.safetensors", "--out", "p.safetensors"],
         "validation data must be x [P, 10] and y [P], got x [8, 10] and y [8, 1]",
         setup=(good_model, tensors(x=torch.randn(8, 10), y=torch.randn(8, 1))), show="`y` of shape [P, 1]", section="3"),
    Case("prune-auto-x-wrong-width", ["prune", "good.safetensors", "--data", "v.safetensors", "--out", "p.safetensors"],
         "got x [8, 3] and y [8]", setup=(good_model, tensors(x=torch.randn(8, 3), y=torch.randn(8))),
         show="`x` with 3 columns for a 10-input model", section="3"),
    Case("csv-header-only", RUN_CSV, "has a header but no data rows", {"d.csv": "a,b,y\n", "c.yaml": csv_config()},
         show="header-only CSV", section="3"),
    Case("set-broken-yaml", ["run", "--set", "student.widths=[20,,30]", "--out", "out", "--quiet"],
         "--set student.widths=[20,,30]: the value is not valid YAML at line 1: expected the node content, but found ','",
         show="`--set student.widths=[20,,30]`", section="3"),
    Case("ckpt-not-chaining", ["prune", "edited.safetensors", "--keep", "3", "--out", "p.safetensors"],
         "layer 2 takes 5 inputs, but the linear layer before it has 6 outputs", setup=(unchained,),
         show="checkpoint whose layers do not chain: 10→6, then 5→4 (the tensors agree with the architecture)",
         section="3"),
    Case("ckpt-in-1e13", ["prune", "edited.safetensors", "--keep", "3", "--out", "p.safetensors"],
         "layer 0 (spectral) is 10000000000000→6, but the tensor 0.phi is [6, 10]",
         setup=(good_model, edited_arch(lambda a: a[0].update({"in": 10**13}))), show="edited checkpoint `\"in\": 1e13`",
         section="3"),
    Case("ckpt-in-float", ["export", "edited.safetensors", "--onnx", "m.onnx"], "'in' must be a positive integer, got 10.5",
         setup=(good_model, edited_arch(lambda a: a[0].update({"in": 10.5}))), show="edited checkpoint `\"in\": 10.5`",
         section="3"),
    Case("ckpt-bad-slope", ["prune", "edited.safetensors", "--keep", "3", "--out", "p.safetensors"],
         "layer 1 (leaky_relu): negative_slope must be a finite number, got 'steep'",
         setup=(act_model, edited_arch(lambda a: a[1].update({"negative_slope": "steep"}))),
         show="edited checkpoint: `leaky_relu` with `negative_slope: \"steep\"`", section="3"),
    Case("ckpt-bad-gelu", ["prune", "edited.safetensors", "--keep", "3", "--out", "p.safetensors"],
         "layer 3 (gelu): approximate must be 'none' or 'tanh', got 'fast'",
         setup=(act_model, edited_arch(lambda a: a[3].update({"approximate": "fast"}))),
         show="edited checkpoint: `gelu` with `approximate: \"fast\"`", section="3"),
    Case("ckpt-empty-arch", ["prune", "edited.safetensors", "--keep", "3", "--out", "p.safetensors"],
         "the architecture has no linear layer (it is empty)", setup=(good_model, edited_arch(lambda a: a.clear())),
         show="edited checkpoint: empty architecture `[]`", section="3"),
    Case("ckpt-bias-text", ["prune", "edited.safetensors", "--keep", "3", "--out", "p.safetensors"],
         "layer 0 (spectral): 'bias' must be true or false, got 'no'",
         setup=(good_model, edited_arch(lambda a: a[0].update({"bias": "no"}))), show="edited checkpoint `\"bias\": \"no\"`",
         section="3"),
    # section 4: messages that pointed the wrong way
    Case("csv-not-numeric-shows-value", RUN_CSV, "column 'a' is not numeric (e.g. 'abc')",
         {"d.csv": rows(a="abc"), "c.yaml": csv_config()}, show="CSV feature column with one `abc`", section="4"),
    Case("csv-target-not-numeric", RUN_CSV, "column 'y' is not numeric (e.g. 'high'); use task: classification",
         {"d.csv": rows(y="high"), "c.yaml": csv_config()}, show="regression target with one `high`", section="4"),
    Case("prune-data-csv", [*PRUNE, "--data", "my.csv"], "--data my.csv: not a safetensors file", {"my.csv": rows()}, run=True,
         show="`prune --data my.csv`", section="4"),
    Case("prune-data-emptydir", [*PRUNE, "--data", "emptydir"], "--data emptydir: not a run folder (no config.yaml in it)",
         run=True, setup=(lambda d: (d / "emptydir").mkdir(),), show="`prune --data emptydir`", section="4"),
    Case("csv-features-empty", RUN_CSV, "data.csv.features: List should have at least 1 item",
         {"d.csv": rows(), "c.yaml": csv_config({"features": []})}, show="`features: []`", section="4"),
    Case("csv-relative-missing", ["run", "cfg/c.yaml", "--out", "out", "--quiet"], "/cfg/d.csv; a relative path in a config file",
         {"cfg/c.yaml": csv_config(), "d.csv": rows()}, show="`path: d.csv` in cfg/c.yaml, the CSV beside the cwd instead",
         section="4"),
    # section 5: usability
    Case("prune-count-above-width", [*PRUNE, "--keep", "25"], "keep=25 exceeds the width 12 of layer 0", run=True,
         show="`prune --keep 25` on an N=12 student (only layer 0 is pruned by default now)", section="5"),
    Case("collapse-same-run-twice", ["collapse", "run", "./run", "--out", "c"], "collapse got the run folder", run=True,
         show="`collapse run ./run`", section="5"),
    Case("collapse-one-teacher-width", ["collapse", "run", "run2", "--out", "c"],
         "at least two different teacher widths h_T, got only h_T=4", run=True, setup=(two_runs,),
         show="`collapse` of two runs with the same teacher width", section="5"),
    # more, found on the way
    Case("csv-is-folder", RUN_CSV, "d.csv is a folder, not a CSV file", {"c.yaml": csv_config()},
         setup=(lambda d: (d / "d.csv").mkdir(),), show="`data.csv.path` names a folder"),
    Case("csv-empty-file", RUN_CSV, "is empty (no header row)", {"d.csv": "", "c.yaml": csv_config()}, show="empty CSV file (0 bytes)"),
    Case("csv-semicolons", RUN_CSV, "is it separated by ';' or tabs?", {"d.csv": rows().replace(",", ";"), "c.yaml": csv_config()},
         show="a `;`-separated CSV"),
    Case("csv-only-target", RUN_CSV, "has only the target column 'y'", {"d.csv": "y\n" + "1\n" * 20, "c.yaml": csv_config()},
         show="CSV with only the target column"),
    Case("csv-two-rows", RUN_CSV, "has 2 row(s): with test_fraction 0.25 that leaves 1 for training",
         {"d.csv": rows(2), "c.yaml": csv_config()}, show="CSV with 2 rows"),
    Case("csv-fractional-labels", RUN_CSV, "has non-integer values (e.g. 0.5); task classification needs class labels",
         {"d.csv": rows(), "c.yaml": csv_config({"task": "classification"})}, show="classification target `0.5`, `1.5`, ..."),
    Case("csv-feature-twice", RUN_CSV, "lists a column twice (['a'])",
         {"d.csv": rows(), "c.yaml": csv_config({"features": ["a", "a", "b"]})}, show="`features: [a, a, b]`"),
    Case("csv-missing-feature", RUN_CSV, "no column(s) ['c'] in", {"d.csv": rows(), "c.yaml": csv_config({"features": ["a", "c"]})},
         show="`features: [a, c]` (no column c)"),
    Case("csv-bool-feature", RUN_CSV, "column 'a' is not numeric (e.g. True)", {"d.csv": "a,y\n" + "True,1\nFalse,2\n" * 10,
                                                                             "c.yaml": csv_config()},
         show="a feature column of `True`/`False`"),
    Case("csv-binary", RUN_CSV, "data.csv", {"d.csv": bytes(range(256)) * 8, "c.yaml": csv_config()}, show="binary garbage as CSV"),
    Case("csv-block-without-source", ["run", "c.yaml", "--out", "out", "--quiet"], "data.csv is only used with data.source: csv",
         {"c.yaml": "data: {csv: {path: d.csv, target: y}}\n"}, show="`data.csv` given, `data.source` left at teacher"),
    Case("csv-empty-target", RUN_CSV, "data.csv.target: String should have at least 1 character",
         {"d.csv": rows(), "c.yaml": csv_config({"target": ""})}, show="`target: \"\"`"),
    Case("methods-twice", ["plan", "--set", "methods=[spectral,spectral]", "--measure", "0"], "methods lists ['spectral'] more than once",
         show="`methods: [spectral, spectral]` (two chunks of one id)"),
    Case("multipliers-twice", ["plan", "--set", "regularization.mode=path", "--set", "regularization.multipliers=[1,1]",
                               "--measure", "0"], "regularization.multipliers lists [1.0] more than once",
         show="`regularization.multipliers: [1, 1]`"),
    Case("teacher-too-large", ["run", "--set", "data.teacher.widths=[1000000000]", "--out", "out", "--quiet"],
         "the teacher needs about", show="`data.teacher.widths=[1000000000]` (40 GB of teacher weights; before: accepted by plan)"),
    Case("set-duplicate-in-value", ["run", "--set", "student={widths: [4], widths: [5]}", "--out", "out", "--quiet"],
         "duplicate key 'widths'", show="`--set 'student={widths: [4], widths: [5]}'`"),
    Case("set-workers-fraction", ["run", "--set", "workers=1.5", "--out", "out", "--quiet"], "workers: Input should be a valid integer",
         show="`--set workers=1.5`"),
    Case("set-threshold-bool", ["plan", "--set", "analysis.threshold=false", "--measure", "0"], "must be a number, not the boolean false",
         show="`--set analysis.threshold=false`"),
    Case("set-test-fraction-one", ["run", "--set", "data.test_fraction=1", "--out", "out", "--quiet"],
         "data.test_fraction: Input should be less than 1", show="`--set data.test_fraction=1`"),
    Case("set-critical-tol-inf", ["run", "--set", "analysis.critical_rel_tol=.inf", "--out", "out", "--quiet"],
         "analysis.critical_rel_tol: Input should be a finite number", show="`--set analysis.critical_rel_tol=.inf`"),
    Case("compare-name-dotdot", ["compare", "--set", "name=..", "--quiet"], "name: String should match pattern",
         show="`compare --set name=..` (would have written to runs/..)"),
    Case("compare-batch-too-large", ["compare", "--set", "train.batch_size=5000", "--out", "out", "--quiet"],
         "train.batch_size 5000 is larger than the 4000 training patterns", show="`compare --set train.batch_size=5000`"),
    Case("compare-trials-bool", ["compare", "--set", "trials=yes", "--out", "out", "--quiet"],
         "trials: must be a number, not the boolean true",
         show="`compare --set trials=yes` (YAML 1.1 reads yes as true)"),
    Case("compare-critical-tol-inf", ["compare", "--set", "critical_tol=.inf", "--out", "out", "--quiet"],
         "critical_tol: Input should be a finite number", show="`compare --set critical_tol=.inf`"),
    Case("prune-keep-zero", [*PRUNE, "--keep", "0"], "keep must be a count >= 1", run=True, show="`prune --keep 0`"),
    Case("prune-keep-negative", [*PRUNE, "--keep", "-3"], "got '-3'", run=True, show="`prune --keep -3`"),
    Case("prune-keep-fraction-above-one", [*PRUNE, "--keep", "1.5"], "got '1.5'", run=True, show="`prune --keep 1.5`"),
    Case("prune-keep-threshold-one", [*PRUNE, "--keep", ">1"], "got '>1'", run=True, show="`prune --keep '>1'`"),
    Case("prune-keep-nan", [*PRUNE, "--keep", "nan"], "got 'nan'", run=True, show="`prune --keep nan`"),
    Case("prune-keep-percent-zero", [*PRUNE, "--keep", "0%"], "got '0%'", run=True, show="`prune --keep 0%`"),
    Case("prune-keep-word", [*PRUNE, "--keep", "half"], "got 'half'", run=True, show="`prune --keep half`"),
    Case("prune-layer-out-of-range", [*PRUNE, "--keep", "3", "--layers", "7"], "layer must be a hidden layer index in 0..1, got 7",
         run=True, show="`prune --layers 7` (two hidden layers)"),
    Case("prune-layer-negative", [*PRUNE, "--keep", "3", "--layers", "-1"], "got -1", run=True, show="`prune --layers -1`"),
    Case("prune-layer-output", [*PRUNE, "--keep", "3", "--layers", "2"], "got 2", run=True, show="`prune --layers 2` (the output layer)"),
    Case("prune-data-without-auto", [*PRUNE, "--keep", "3", "--data", "run"], "--data is only used with --keep auto", run=True,
         show="`prune --keep 3 --data run`"),
    Case("prune-data-missing", [*PRUNE, "--data", "nothere"], "--data nothere: not found", run=True, show="`prune --data nothere`"),
    Case("prune-data-no-y", ["prune", "good.safetensors", "--data", "v.safetensors", "--out", "p.safetensors"],
         "needs tensors named x [P, D] and y [P], found ['x']", setup=(good_model, tensors(x=torch.randn(8, 10))),
         show="data file with `x` only"),
    Case("prune-data-int-x", ["prune", "good.safetensors", "--data", "v.safetensors", "--out", "p.safetensors"],
         "validation x must hold floating-point numbers, got torch.int64",
         setup=(good_model, tensors(x=torch.ones(8, 10, dtype=torch.long), y=torch.randn(8))), show="data file with integer `x`"),
    Case("prune-checkpoint-is-csv", ["prune", "d.csv", "--keep", "3", "--out", "p.safetensors"],
         "d.csv: not a safetensors file (it starts with text)",
         {"d.csv": rows()}, show="`prune d.csv`"),
    Case("prune-unpruned-loss-inf", ["prune", "bad.safetensors", "--data", "v.safetensors", "--out", "p.safetensors"],
         "the unpruned model's validation loss is inf", setup=(good_model, lambda d: save_model(
             make_student(10, [LayerPlan(6, "spectral"), LayerPlan(1, "fixed", 0.0, 0.0)], seed=1), d / "bad.safetensors"),
             tensors(x=torch.full((8, 10), 1e30), y=torch.zeros(8))),
         show="finite model, finite data, but an overflowing loss (x = 1e30)"),
    Case("export-missing", ["export", "nothere.safetensors", "--onnx", "m.onnx"], "checkpoint not found: nothere.safetensors",
         show="`export` of a missing checkpoint"),
    Case("plan-measure-negative", ["plan", "--measure", "-1"], "Invalid value for '--measure'", show="`plan --measure -1`"),
    Case("collapse-missing", ["collapse", "nothere", "--out", "c"], "nothere", show="`collapse nothere`"),
    Case("compare-criteria-twice", ["compare", "--set", "criteria=[eigenvalue,eigenvalue]", "--out", "out", "--quiet"],
         "criteria lists ['eigenvalue'] more than once", show="`compare --set criteria=[eigenvalue,eigenvalue]` (trained twice)"),
    Case("compare-widths-twice", ["compare", "--set", "widths=[40,40]", "--out", "out", "--quiet"],
         "widths lists [40] more than once", show="`compare --set widths=[40,40]` (rows doubled in the summary)"),
    Case("csv-home-path-missing", ["run", "--set", "data.source=csv", "--set", "data.csv.path=~/no-such-eigenprune.csv",
                                   "--set", "data.csv.target=y", "--set", "student.head=linear", "--out", "out", "--quiet"],
         "no-such-eigenprune.csv", show="`--set data.csv.path=~/no-such-eigenprune.csv` (`~` is expanded now)"),
    Case("prune-extra-trial-text", ["prune", "edited.safetensors", "--data", "run", "--out", "p.safetensors"],
         "its metadata names trial 'first' and teacher 0; both must be integers", run=True, setup=(extra_trial_text,),
         show="a student whose metadata says `\"trial\": \"first\"`, `--keep auto --data run`"),
    Case("prune-data-run-broken-config", [*PRUNE, "--data", "run"], "config.yaml", run=True,
         setup=(lambda d: (d / "run" / "config.yaml").write_text("trials: [1,\n"),),
         show="`prune --data run` where run/config.yaml is broken YAML"),
    Case("csv-test-fraction-large", RUN_CSV, "has 40 row(s): with test_fraction 0.99 that leaves 0 for training",
         {"d.csv": rows(), "c.yaml": csv_config(data={"source": "csv", "csv": {"path": "d.csv", "target": "y"}, "test_fraction": 0.99})},
         show="`data.test_fraction: 0.99` with 40 rows"),
    Case("prune-keep-float-count", [*PRUNE, "--keep", "5.0"], "got '5.0'", run=True,
         show="`prune --keep 5.0` (a fraction must be in (0, 1]; a count is written 5)"),
    Case("set-bool-word", ["run", "--set", "save_students=maybe", "--out", "out", "--quiet"],
         "save_students: Input should be a valid boolean", show="`--set save_students=maybe`"),
    Case("set-widths-scalar", ["run", "--set", "student.widths=6", "--out", "out", "--quiet"],
         "student.widths: Input should be a valid list (got 6)", show="`--set student.widths=6` (not a list)"),
    Case("set-seed-too-large", ["run", "--set", "seed=99999999999999999999", "--out", "out", "--quiet"],
         "seed: Input should be less than 9223372036854775808", show="`--set seed=99999999999999999999`"),
    Case("set-name-empty", ["run", "--set", "name=", "--out", "out", "--quiet"], "name: Input should be a valid string (got None)",
         show="`--set name=` (empty)"),
    Case("set-lr-overflow", ["run", "--set", "spectral.lr=1e400", "--out", "out", "--quiet"],
         "spectral.lr: Input should be a finite number", show="`--set spectral.lr=1e400` (overflows to inf)"),
    Case("trials-1e12", ["plan", "--set", "trials=1000000000000", "--measure", "0"],
         "trials: Input should be less than or equal to 1000000", show="`plan --set trials=1000000000000` (before: MemoryError)"),
    Case("compare-param-bool", ["compare", "--set", "params={random: {seed: true}}", "--out", "out", "--quiet"],
         "params.random.seed: must be a number, not the boolean true", show="`compare --set 'params={random: {seed: true}}'`"),
    Case("compare-param-nan", ["compare", "--set", "params={eigenvalue: {l2_lam: .nan}}", "--out", "out", "--quiet"],
         "params.eigenvalue.l2_lam: Input should be a finite number", show="`compare --set 'params={eigenvalue: {l2_lam: .nan}}'`"),
    Case("config-list-top", ["config", "c.yaml"], "the top level must be a mapping of keys, got list", {"c.yaml": "- 1\n- 2\n"},
         show="a config that is a YAML list"),
    Case("version-extra-arg", ["--version", "--bogus"], "No such option: --bogus", show="`eigenprune --version --bogus`"),
]


# --- running them -----------------------------------------------------------------------------------

def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder`: a file -> its bytes, a folder -> None."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def prepare(case: Case, d: Path, stored: Path | None) -> None:
    if case.run:
        shutil.copytree(stored, d / "run")
    for name, content in case.files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    for step in case.setup:
        step(d)


def invoke(args: list[str]):
    return runner.invoke(app, args, prog_name="eigenprune")


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Path:
    """A finished tiny run (see STORED); cases copy it."""
    return run_experiment(parse_config(STORED), tmp_path_factory.mktemp("stored") / "run", quiet=True)


def _check(case: Case, d: Path, stored: Path, monkeypatch) -> str:
    prepare(case, d, stored)
    before = tree(d)
    monkeypatch.chdir(d)
    result = invoke(case.args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert case.expect in result.stderr, result.stderr
    assert result.stdout == "", result.stdout
    assert tree(d) == before, "files changed"
    return result.stderr.strip()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, stored, tmp_path, monkeypatch):
    _check(case, tmp_path, stored, monkeypatch)


def test_the_case_ids_are_unique_and_cover_sections_2_to_5():
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.section for c in CASES} == {"2", "3", "4", "5", "more"}
    assert sum(c.section == "more" for c in CASES) >= 30


# --- what now works instead of failing ---------------------------------------------------------------

def test_the_planner_splits_100000_trials_in_well_under_a_second():
    cfg = parse_config({"trials": 100000, "data": {"n_train": 10, "n_test": 10}, "student": {"widths": [20]},
                        "spectral": {"batch_size": 10}, "direct": {"batch_size": 10}, "max_memory_gb": 1.5})
    start = time.perf_counter()
    chunks, _ = check_memory(cfg, plan_chunks(cfg), 1, torch.device("cpu"))
    assert time.perf_counter() - start < 0.5
    assert len(chunks) > 2 and sum(len(c.trials) for c in chunks) == 2 * 100000


def test_default_prune_touches_only_the_ranked_layer_and_says_so(stored, tmp_path):
    out = tmp_path / "p.safetensors"
    result = invoke(["prune", str(stored / STUDENT.removeprefix("run/")), "--keep", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "10→12→10→1 pruned to 10→5→10→1" in result.stdout
    assert "layer 0 (spectral): 12 → 5 nodes; layer 1 (dense, unregularized): not pruned" in result.stdout
    both = invoke(["prune", str(stored / STUDENT.removeprefix("run/")), "--keep", "0.5", "--layers", "0,1", "--out", str(out), "--force"])
    assert both.exit_code == 0 and "10→6→5→1" in both.stdout, both.output


def test_a_float64_model_with_float32_validation_data(tmp_path):
    model = make_student(10, [LayerPlan(6, "spectral"), LayerPlan(1, "fixed", 0.0, 0.0)], seed=1, dtype=torch.float64)
    save_model(model, tmp_path / "m.safetensors")
    save_file({"x": torch.randn(32, 10), "y": torch.randn(32)}, str(tmp_path / "v.safetensors"))
    result = invoke(["prune", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "v.safetensors"),
                     "--out", str(tmp_path / "p.safetensors")])
    assert result.exit_code == 0, result.output
    assert "validation loss" in result.stdout and next(load_model(tmp_path / "p.safetensors")[0].parameters()).dtype == torch.float64


def test_a_relative_csv_path_is_read_from_the_config_files_folder(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "d.csv").write_text(rows(100))
    (tmp_path / "cfg" / "c.yaml").write_text(csv_config(trials=1, workers=1))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke(["run", "../cfg/c.yaml", "--out", "out", "--quiet"])
    assert result.exit_code == 0, result.output
    stored_path = yaml.safe_load((elsewhere / "out" / "config.yaml").read_text())["data"]["csv"]["path"]
    assert stored_path == str(tmp_path / "cfg" / "d.csv")


def test_version_short_help_and_help_text_keep_brackets():
    version = invoke(["--version"])
    assert version.exit_code == 0 and version.stdout.startswith("eigenprune ")
    short = invoke(["run", "-h"])
    assert short.exit_code == 0 and "eigenprune[ray]" in short.stdout.replace("\n", " ").replace("  ", " ")


def test_the_stored_failed_student_is_really_a_failed_run_student(stored):
    import pandas as pd

    res = pd.read_parquet(stored / "results.parquet")
    failed = res[res.checkpoint == FAILED.removeprefix("run/")]
    assert list(failed.status) == ["failed"] and set(res[res.method == "spectral"].status) == {"ok"}


# --- the docs table -------------------------------------------------------------------------------------

def case_messages(cases, check, cleanup=None):
    """(case, message) for every case as the program answers now, each case checked by `check(case, folder,
    stored_run, monkeypatch)` in a fresh folder beside one stored run; the folder shows as …, the home folder as ~,
    and | is escaped for a markdown table. `cleanup()` runs after each case. What the docs tables are made of."""
    import _pytest.monkeypatch

    with tempfile.TemporaryDirectory() as tmp:
        stored_run = run_experiment(parse_config(STORED), Path(tmp) / "stored" / "run", quiet=True)
        for i, case in enumerate(cases):
            d = Path(tmp) / f"case{i}"
            d.mkdir()
            mp = _pytest.monkeypatch.MonkeyPatch()
            try:
                message = check(case, d, stored_run, mp).replace(str(d), "…").replace(str(Path.home()), "~").replace("|", "\\|")
            finally:
                mp.undo()
                if cleanup is not None:
                    cleanup()
            yield case, message


def _table() -> str:
    """Markdown rows (input | message) of every case, as the program answers now."""
    lines = []
    for case, message in case_messages(CASES, _check):
        shown = (case.show or "`eigenprune " + " ".join(case.args) + "`").replace("|", "\\|")
        lines.append(f"| {case.section} | {shown} | `{message}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_table())


# --- the Python API: the same inputs raise one typed one-line error ------------------------------------

def _api_model(dtype=torch.float32):
    return make_student(10, [LayerPlan(6, "spectral"), LayerPlan(4, "direct", 0.0, 0.0), LayerPlan(1, "fixed", 0.0, 0.0)],
                        seed=1, dtype=dtype)


def _nan_model():
    model = _api_model()
    with torch.no_grad():
        model[0].phi[2] = float("nan")
    return model


def _api_cases():
    from eigenprune.experiments.config import ConfigError
    from eigenprune.experiments.data import DataError, csv_data
    from eigenprune.pruning.keep import PruneError
    from eigenprune.pruning.prune import prune_nodes

    x, y = torch.randn(16, 10), torch.randn(16)
    return {
        "keep=True": (PruneError, "got True", lambda d: prune_nodes(_api_model(), True)),
        "auto without data": (PruneError, "needs validation data", lambda d: prune_nodes(_api_model(), "auto")),
        "layers=[]": (PruneError, "no layer to prune", lambda d: prune_nodes(_api_model(), 3, layers=[])),
        "keep={}": (PruneError, "no layer to prune", lambda d: prune_nodes(_api_model(), {})),
        "layers=['a']": (PruneError, "layers must be a list of hidden layer indices", lambda d: prune_nodes(_api_model(), 3, layers=["a"])),
        "rtol=nan": (PruneError, "rtol and atol must be finite", lambda d: prune_nodes(_api_model(), "auto", x_val=x, y_val=y,
                                                                                      rtol=float("nan"))),
        "NaN in phi": (PruneError, "the model's 0.phi holds 10 NaN/inf", lambda d: prune_nodes(_nan_model(), 3)),
        "empty x_val": (PruneError, "x_val has no rows", lambda d: prune_nodes(_api_model(), "auto", x_val=x[:0], y_val=y[:0])),
        "inf in y_val": (PruneError, "y_val holds 1 NaN/inf", lambda d: prune_nodes(
            _api_model(), "auto", x_val=x, y_val=y.index_fill(0, torch.tensor([0]), float("inf")))),
        "criterion gives NaN": (PruneError, "got 6 score(s), 6 of them NaN/inf", lambda d: prune_nodes(
            _api_model(), 3, criterion=lambda m, layer, x, y, task: torch.full((6,), float("nan")))),
        "criterion gives 4 scores": (PruneError, "score each of the 6 nodes of layer 0 with a finite number, got 4", lambda d: prune_nodes(
            _api_model(), 3, criterion=lambda m, layer, x, y, task: torch.ones(4))),
        "minimal_width rtol=nan": (PruneError, "rtol and atol must be finite", lambda d: __import__(
            "eigenprune.pruning.search", fromlist=["x"]).minimal_width(_api_model(), x, y, x, y, rtol=float("nan"))),
        "minimal_width on a NaN model": (PruneError, "test loss is nan", lambda d: __import__(
            "eigenprune.pruning.search", fromlist=["x"]).minimal_width(_nan_model(), x, y, x, y)),
        "trials=True": (ConfigError, "trials: must be a number, not the boolean true", lambda d: parse_config({"trials": True})),
        "duplicate key": (ConfigError, "duplicate key 'trials'", lambda d: __import__("eigenprune.experiments.config", fromlist=["x"])
                          .load_config((d / "c.yaml").write_text("trials: 1\ntrials: 2\n") and d / "c.yaml")),
        "csv inf": (DataError, "column 'a' holds inf", lambda d: (d / "d.csv").write_text(rows(a="inf")) and csv_data(
            str(d / "d.csv"), "y", None, "regression", 1, 0, 0.25)),
    }


@pytest.mark.parametrize("name", list(_api_cases()))
def test_python_api_bad_input_raises_one_typed_line(name, tmp_path):
    error, message, call = _api_cases()[name]
    with pytest.raises(error) as err:
        call(tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_python_api_float64_model_with_float32_data_and_default_layers():
    from eigenprune.pruning.chain import ranked_layers
    from eigenprune.pruning.prune import prune_nodes

    model = _api_model(torch.float64)
    assert ranked_layers(model) == [0] and ranked_layers(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))) == [0]
    small = prune_nodes(model, "auto", x_val=torch.randn(32, 10), y_val=torch.randn(32))
    assert [m.out_features for m in small if isinstance(m, nn.Linear)][1:] == [4, 1]  # layer 1 (dense) untouched


def test_a_float64_run_on_csv_data(tmp_path, monkeypatch):
    """Before: `RuntimeError: expected scalar type Float but found Double` (CSV data was always float32)."""
    (tmp_path / "d.csv").write_text(rows(100))
    (tmp_path / "c.yaml").write_text(csv_config(trials=1, workers=1, dtype="float64"))
    monkeypatch.chdir(tmp_path)
    result = invoke(["run", "c.yaml", "--out", "out", "--quiet"])
    assert result.exit_code == 0, result.output
