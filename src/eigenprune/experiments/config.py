"""Validated run configuration.

The defaults *are* the embedded "quick" config: a CPU-sized version of the paper's experiment
(PAPER.md section 2) that keeps many small Adam steps so the effect shows on 2 cores: 8,000
training patterns, batch 100, 400 spectral epochs (32,000 steps), 75 direct epochs, 3 trials,
widths 20/60/200 (the paper: 10,000 patterns, batch 300/500, 2,000 epochs, 30 trials). A YAML file
only needs the fields it changes. Every validation problem becomes one `ConfigError` line that
names the field, the bad value and what is valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from eigenprune.core.errors import EigenpruneError
from eigenprune.core.io import input_file
from eigenprune.core.training import TrainSpec


def _not_bool(value: Any) -> Any:
    """Refuse true/false where a number belongs (pydantic would read them as 1 and 0)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not the boolean {str(value).lower()}")
    return value


NoBool = BeforeValidator(_not_bool)
Float = Annotated[float, Field(allow_inf_nan=False), NoBool]
PositiveInt = Annotated[int, Field(gt=0), NoBool]
NonNegativeInt = Annotated[int, Field(ge=0), NoBool]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False), NoBool]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False), NoBool]
Fraction = Annotated[float, Field(gt=0, lt=1), NoBool]
Seed = Annotated[int, Field(ge=0, lt=2**63), NoBool]


Dtype = Literal["float32", "float64"]

RunName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
"""A run's name: its default folder runs/<name> (a file name may have 255 bytes)."""

MAX_TRIALS = 1_000_000
"""The most trials a config may ask for (the paper uses 30); beyond it even listing them costs seconds and gigabytes."""

MAX_MEMORY_GB = 1_000_000.0
"""The largest `max_memory_gb` (a petabyte): the limit is counted in bytes as an integer, which 1e308 GB is not."""
Trials = Annotated[int, Field(gt=0, le=MAX_TRIALS), NoBool]


def repeated(values: list) -> list:
    """The values that occur more than once in `values`, sorted (in linear time: a list may hold 100,000 widths)."""
    return sorted(v for v, n in Counter(values).items() if n > 1)


MAX_GRID = 1000
"""The most entries of a list that spans the grid (student.widths, regularization.multipliers, teachers): the
paper trains 10 widths; 1,000 widths make about 2,000 chunks, planned in a tenth of a second."""


class ConfigError(EigenpruneError, ValueError):
    """A configuration problem, stated in one line."""


class ConfigDeprecation(FutureWarning):
    """A config uses an option's old name (see `RENAMED`): it is read, and the new name should replace it."""


RENAMED = {"compile": "compile_step"}
"""Old -> new name of a top-level key of `Config` (two options were called compile: this one and backprop's value)."""

RENAMED_VALUES = {("backprop", "compile"): "autograd_compiled"}
"""(key, old value) -> new value of a top-level key of `Config`."""


def renamed(data: dict) -> tuple[dict, list[str]]:
    """`data` (a config mapping) with the old names of `RENAMED` and `RENAMED_VALUES` replaced by the new ones, and a
    note for each; ValueError where both an old key and its new one are given."""
    notes = []
    for old, new in RENAMED.items():
        if old in data:
            if new in data:
                raise ValueError(f"{old} is the old name of {new}; give {new} alone")
            data = {(new if k == old else k): v for k, v in data.items()}
            notes.append(f"{old} is now called {new} (the old name is read for now)")
    for (key, old), new in RENAMED_VALUES.items():
        if isinstance(data.get(key), str) and data[key] == old:
            data = {**data, key: new}
            notes.append(f"{key}: {old} is now called {key}: {new} (the old name is read for now)")
    return data, notes


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Settings(StrictModel):
    """What every experiment (`run`, `compare`, `recovery`) is set by: its name (the default folder runs/<name>),
    the seed every other seed derives from (see `experiment_seeds`), the trials and the dtype."""

    name: RunName = "quick"
    seed: Seed = 0
    trials: Trials = 3
    dtype: Dtype = "float32"


class Schedule(StrictModel):
    """How a group of students trains: Adam's learning rate, the batch size and the number of epochs."""

    lr: PositiveFloat
    batch_size: PositiveInt
    epochs: PositiveInt

    def train_spec(self, task: str = "regression", **options: object) -> TrainSpec:
        """The `TrainSpec` of this schedule (the one place one is built from a config); `options` are
        TrainSpec's run-wide fields (backprop, cuda_graph, compile_step, optimizer)."""
        return TrainSpec(lr=self.lr, batch_size=self.batch_size, epochs=self.epochs, task=task, **options)


class TeacherConfig(StrictModel):
    kind: Literal["mlp", "linear", "hidden_manifold"] = "mlp"
    widths: Annotated[list[PositiveInt], Field(min_length=1)] = [20, 10]
    seed: Seed = 1234
    latent_dim: PositiveInt = 5


class CsvConfig(StrictModel):
    """A user's table: feature columns (default: every other column) and one target column."""

    path: Annotated[str, Field(min_length=1)]
    target: Annotated[str, Field(min_length=1)]
    features: Annotated[list[str], Field(min_length=1)] | None = None
    task: Literal["regression", "classification"] = "regression"


class DataConfig(StrictModel):
    source: Literal["teacher", "digits", "csv"] = "teacher"
    csv: CsvConfig | None = None
    test_fraction: Fraction = 0.25  # real data (digits, csv): held-out share per trial
    input_dim: PositiveInt = 10
    n_train: PositiveInt = 8000
    n_test: PositiveInt = 4000
    seed: Seed = 0
    standardize_targets: bool = False
    teacher: TeacherConfig = TeacherConfig()


class MethodConfig(Schedule):
    l2_phi: NonNegativeFloat = 0.01
    l2_lam: NonNegativeFloat = 5e-4


class SpectralConfig(MethodConfig):
    lr: PositiveFloat = 0.005
    batch_size: PositiveInt = 100
    epochs: PositiveInt = 400


class DirectConfig(MethodConfig):
    lr: PositiveFloat = 0.002
    batch_size: PositiveInt = 100
    epochs: PositiveInt = 75


class StudentConfig(StrictModel):
    widths: Annotated[list[PositiveInt], Field(min_length=1, max_length=MAX_GRID)] = [20, 60, 200]
    rest: list[PositiveInt] = [10]
    deep: bool = False  # every hidden layer trains with the method and its L2 (else: the paper's dense, unregularized rest)
    head: Literal["sum", "linear"] = "sum"  # sum: the paper's frozen all-ones readout; linear: a trainable dense output layer


class AnalysisConfig(StrictModel):
    threshold: Fraction = 0.05
    probe_kept: list[PositiveInt] = [20, 30]
    critical_rel_tol: PositiveFloat = 0.1  # n_c: pruning costs <= this x the full test loss
    search_rel_tol: PositiveFloat = 0.1  # joint search: training loss may rise by this fraction
    accuracy_tol: Annotated[float, Field(ge=0, lt=1), NoBool] = 0.01  # classification: smallest width within this of full accuracy


class RegularizationConfig(StrictModel):
    """Fixed strengths (the paper) or a path: K multipliers of every L2 coefficient, trained together.

    On a path, `validation_fraction` of each trial's training set is held out (not trained on) to
    choose a strength: "best" = lowest mean validation loss; "1se" = the largest strength whose mean
    validation loss is within one standard error (over trials) of the best; "stable" = the best
    validation loss inside the longest plateau of the effective dimension (see `regpath`).
    """

    mode: Literal["fixed", "path"] = "fixed"
    multipliers: Annotated[list[PositiveFloat], Field(min_length=1, max_length=MAX_GRID)] = [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0]
    validation_fraction: Fraction = 0.2
    rule: Literal["best", "1se", "stable"] = "1se"

    def strengths(self) -> list[float]:
        """The L2 multipliers trained: `multipliers` on a path, else [1.0]."""
        return list(self.multipliers) if self.mode == "path" else [1.0]

    def n_fit(self, n_train: int) -> int:
        """Training patterns actually trained on, out of `n_train` (on a path the rest is held out as the
        validation set that chooses the strength); ConfigError where that leaves no training or no validation part."""
        if self.mode != "path":
            return n_train
        n_fit = n_train - round(n_train * self.validation_fraction)
        if n_fit < 1 or n_fit == n_train:
            raise ConfigError(f"regularization.validation_fraction {self.validation_fraction} leaves no training or no "
                              f"validation patterns out of {n_train} training patterns")
        return n_fit


class ParityConfig(StrictModel):
    """Options that reproduce the authors' Keras code where it differs from ours (docs/reproduction.md,
    "Differences from the authors' code"); the defaults are ours.

    optimizer: torch's Adam, or `keras_adam` (eps added before the bias correction, float32 beta and lr).
    effective_dim: `per_trial` normalises each student's importance by its own maximum and counts values
    > threshold; `authors` normalises by the maximum over all trials of a width (and strength) in a chunk
    and counts values >= threshold. importance_scale: `sqrt_n` multiplies the stored importance by
    sqrt(N) (their `RescaledEigenvalue`; rankings and normalised values are unchanged). l2_float32: round
    the L2 coefficients to float32, as Keras does even in float64 runs.
    """

    optimizer: Literal["adam", "keras_adam"] = "adam"
    effective_dim: Literal["per_trial", "authors"] = "per_trial"
    importance_scale: Literal["none", "sqrt_n"] = "none"
    l2_float32: bool = False


class Config(Settings):
    """`eigenprune run`'s settings (the defaults: the quick run)."""

    device: str = "cpu"
    cuda_graphs: bool = False  # on CUDA, capture each training epoch once in a CUDA graph and replay it
    # manual: the hand-written batched step; fused: its first layer in Triton kernels (CUDA, float32);
    # autograd: the same batched forward differentiated by torch.autograd (slower here; docs/benchmarks.md);
    # autograd_compiled: autograd of that forward compiled by torch.compile (the old name compile is read: RENAMED_VALUES)
    backprop: Literal["manual", "fused", "autograd", "autograd_compiled"] = "manual"
    # backprop manual: the hand-written step under torch.compile, fewer kernels per step (needs a C++ compiler on a
    # CPU; the old name compile is read: RENAMED)
    compile_step: bool = False
    # backprop manual: the first layer in cache-sized tiles of this many activations (batched.tiled; 0: never);
    # auto: on a CPU, for chunks whose steps hold more than measure.TILE_FROM first-layer activations
    tile: Literal["auto"] | NonNegativeInt = "auto"
    methods: Annotated[list[Literal["spectral", "direct"]], Field(min_length=1)] = ["spectral", "direct"]
    data: DataConfig = DataConfig()
    # several teachers in one run (each replaces data.teacher); empty = data.teacher
    teachers: Annotated[list[TeacherConfig], Field(max_length=MAX_GRID)] = []
    regularization: RegularizationConfig = RegularizationConfig()
    student: StudentConfig = StudentConfig()
    spectral: SpectralConfig = SpectralConfig()
    direct: DirectConfig = DirectConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    parity: ParityConfig = ParityConfig()  # the authors' code's choices, as options
    save_students: bool = True
    workers: NonNegativeInt = 0
    max_memory_gb: Annotated[PositiveFloat, Field(le=MAX_MEMORY_GB)] | None = None  # None: 80% of the memory available at the start
    max_chunk_minutes: PositiveFloat | None = 10.0  # split chunks by trials to train within this (cost model); None: never

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any, info: ValidationInfo) -> Any:
        """Read the old names of `RENAMED` (run folders and configs written before the rename); where the config is
        a user's (`parse_config`), say so with a `ConfigDeprecation` warning."""
        if not isinstance(data, dict):
            return data
        data, notes = renamed(data)
        if notes and (info.context or {}).get("warn_renamed"):
            warnings.warn(f"{info.context.get('source', 'config')}: {'; '.join(notes)}", ConfigDeprecation, stacklevel=2)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        for field, values in (("methods", self.methods), ("regularization.multipliers", self.regularization.multipliers)):
            if len(set(values)) < len(values):
                raise ValueError(f"{field} lists {repeated(values)} more than once; list each once")
        d = self.data
        if d.source != "teacher":
            fields = type(d).model_fields
            given = [f"data.{k} ({getattr(d, k)!r})" if k != "teacher" else "data.teacher"
                     for k in ("input_dim", "n_train", "n_test", "standardize_targets", "teacher")
                     if getattr(d, k) != fields[k].default]
            if given:
                verb = "apply" if len(given) > 1 else "applies"
                raise ValueError(f"{', '.join(given)} only {verb} to data.source teacher; with {d.source} data "
                                 f"the file sets the inputs and rows (split by data.test_fraction)")
        if d.source != "csv" and d.csv is not None:
            raise ValueError(f"data.csv is only used with data.source: csv (got data.source {d.source})")
        if self.data.source == "csv" and self.data.csv is None:
            raise ValueError("data.source is csv but data.csv (path, target) is missing")
        if self.data.source != "teacher" and self.student.head != "linear":
            raise ValueError(f"data.source {self.data.source} needs student.head: linear (the sum readout only fits teacher data)")
        if self.data.source != "teacher" and self.teachers:
            raise ValueError("teachers are only used with data.source: teacher")
        if self.backprop == "fused" and self.dtype != "float32":
            raise ValueError(f"backprop: fused runs in float32, not {self.dtype}")
        try:  # the step options' rules live once, in TrainSpec
            self.train_spec(self.methods[0], "regression")
        except ValueError as err:
            raise ValueError(f"backprop {self.backprop}, cuda_graphs {str(self.cuda_graphs).lower()}, compile_step "
                             f"{str(self.compile_step).lower()}: {err}") from None
        if self.tile not in ("auto", 0) and (self.backprop != "manual" or self.compile_step):
            raise ValueError(f"tile applies to backprop: manual without compile_step, not {self.backprop}"
                             + (" with compile_step" if self.compile_step else ""))
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("cpu", "cuda", "auto") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("must be cpu, cuda, cuda:N or auto")
        return v

    def method(self, name: str) -> MethodConfig:
        return getattr(self, name)

    def teacher_list(self) -> list[TeacherConfig]:
        """The run's teachers: `teachers` if given, else the one `data.teacher`."""
        return list(self.teachers) or [self.data.teacher]

    def for_teacher(self, index: int) -> Config:
        """This config with `data.teacher` set to teacher `index` of `teacher_list()`."""
        teacher = self.teacher_list()[index]
        return self.model_copy(update={"data": self.data.model_copy(update={"teacher": teacher})})

    def train_spec(self, method: str, task: str) -> TrainSpec:
        """How `method`'s students train in this run: its schedule with the run-wide step options."""
        return self.method(method).train_spec(task, backprop=self.backprop, cuda_graph=self.cuda_graphs,
                                              optimizer=self.parity.optimizer, compile_step=self.compile_step)

    def digest(self) -> str:
        """A hash of everything that changes results (not the device, CUDA graphs, kernels or tiling, the name, the worker
        count, the memory limit or the chunk time bound: they change floating-point rounding at most)."""
        payload = self.model_dump(exclude={"device", "cuda_graphs", "backprop", "compile_step", "tile", "name", "workers", "max_memory_gb",
                                           "max_chunk_minutes"})
        if self.parity == ParityConfig():  # the defaults: digests (and resumable folders) from before the option stay valid
            del payload["parity"]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping (at any depth) is an error:
    plain YAML keeps the last one and silently drops the first (a whole `student:` section, say)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first + 1}); each key may appear once", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


MAX_YAML_DEPTH = 32
"""The deepest nesting of lists and mappings a config may have (eigenprune's own go 4 deep); PyYAML builds
nested values recursively, so a few hundred levels would end in a RecursionError."""

MAX_YAML_VALUES = 100_000
"""The most values (scalars, lists, mappings) a config may hold once its aliases are expanded: a list of
10,000 widths is 10,001; an alias "bomb" (9 levels of 9 aliases, 9^9 values) would take minutes and gigabytes."""


class YamlLimitError(yaml.YAMLError):
    """YAML that parses, but is nested too deep or expands to too many values (see `MAX_YAML_DEPTH`, `MAX_YAML_VALUES`)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _check_size(text: str) -> None:
    """Refuse (`YamlLimitError`) a document nested deeper than `MAX_YAML_DEPTH` or holding more than
    `MAX_YAML_VALUES` values with aliases expanded, from its event stream (no recursion, no values built).

    libyaml's parser where PyYAML has it (ten times faster, docs/reliability.md); a document it cannot
    parse is checked again with PyYAML's own parser, whose error (if any) is the one `safe_load` reports."""
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            return _count_values(yaml.parse(text, Loader=fast))
        except YamlLimitError:
            raise
        except yaml.YAMLError:
            pass
    _count_values(yaml.parse(text, Loader=yaml.SafeLoader))


def _count_values(events) -> None:
    """`_check_size` on a stream of YAML events: each open list or mapping counts what it holds, an anchored
    one keeps its count for its aliases."""
    open_counts: list[int] = []  # values inside each open list/mapping, aliases expanded
    open_anchors: list[str | None] = []
    anchored: dict[str, int] = {}
    total = aliases = 0
    for event in events:
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(open_counts) >= MAX_YAML_DEPTH:
                raise YamlLimitError(f"lists and mappings nested more than {MAX_YAML_DEPTH} deep (at line {event.start_mark.line + 1}); "
                                     "a config needs a few levels")
            open_counts.append(1)
            open_anchors.append(event.anchor)
            continue
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            size, anchor = open_counts.pop(), open_anchors.pop()
            if anchor is not None:
                anchored[anchor] = size
        elif isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor is not None:
                anchored[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            size, aliases = anchored.get(event.anchor, 1), aliases + 1  # an undefined alias: composing reports it
        else:
            continue
        if open_counts:
            open_counts[-1] += size
        else:
            total += size
        if total + sum(open_counts) > MAX_YAML_VALUES:
            how = f" once its {aliases} alias(es) are expanded (an alias bomb?)" if aliases else ""
            raise YamlLimitError(f"more than {MAX_YAML_VALUES:,} values{how}; a config needs far fewer")


def safe_load(text: str) -> object:
    """`yaml.safe_load`, refusing duplicate keys (see `_UniqueKeyLoader`) and documents nested too deep or
    too large once aliases are expanded (`YamlLimitError`, checked before anything is built); raises `yaml.YAMLError`."""
    _check_size(text)
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line: 'at line N: problem'."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{where}: {problem}"


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = repr(e["input"])
        got = got if len(got) <= 80 else got[:77] + "..."
        parts.append(f"{where}: {msg} (got {got})" if e["type"] != "missing" and e["loc"] else f"{where}: {msg}")
    return "invalid config: " + "; ".join(parts)


def parse_config(data: object, source: str = "config", model: type[BaseModel] | None = None) -> Config:
    """Validate a mapping (e.g. parsed YAML) into a `Config` (or another pydantic `model`); raises `ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return (model or Config).model_validate(data, context={"warn_renamed": True, "source": source})
    except ValidationError as err:
        raise ConfigError(f"{source}: {_one_line(err)}") from None


def read_yaml(path: str | Path | None, overrides: dict | None = None, default: str = "default config") -> tuple[object, str]:
    """The parsed YAML of `path` (None: an empty mapping, named `default`) with `overrides` (dotted keys)
    applied, and the name of its source; every problem is a one-line `ConfigError`."""
    data: object = {}
    source = default
    if path is not None:
        p = input_file(path, "config file", ConfigError)
        source = str(p)
        try:
            data = safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{p}: not a UTF-8 text file (byte {err.start} is {err.object[err.start:err.start + 1]!r})") from None
        except OSError as err:
            raise ConfigError(f"{p}: cannot be read ({err.strerror})") from None
        except YamlLimitError as err:
            raise ConfigError(f"{p}: YAML with {err.problem}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML{yaml_problem(err)}") from None
        data = _resolve_csv_path(data, p.parent)
    if overrides and data is None:
        data = {}
    if overrides and isinstance(data, dict):
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{source}: cannot set {dotted}: {key} is not a section (it holds {node!r})")
            node[leaf] = value
        data = _resolve_csv_path(data, Path.cwd())  # a path given with --set is read from the current folder
    return data, source


def _resolve_csv_path(data: object, folder: Path) -> object:
    """A relative `data.csv.path` in a config file is read from the file's folder (not the current
    directory), one given with --set from the current folder, and `~` is expanded: the path becomes
    absolute, so the run folder's copy of the config finds it too and its bytes can be hashed."""
    csv = data.get("data") if isinstance(data, dict) else None
    csv = csv.get("csv") if isinstance(csv, dict) else None
    if isinstance(csv, dict) and isinstance(csv.get("path"), str) and csv["path"] and not os.path.isabs(csv["path"]):
        csv["path"] = os.path.normpath(os.path.join(folder.resolve(), os.path.expanduser(csv["path"])))
    return data


SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""The run configs that install with eigenprune (package data, src/eigenprune/configs/*.yaml), given by name:
`eigenprune run paper`. The first line of each file's leading comment is its one-line description."""


def shipped_configs() -> dict[str, Path]:
    """Name (the file's stem) -> file of every shipped run config, sorted by name."""
    return {p.stem: p for p in sorted(SHIPPED_CONFIGS.glob("*.yaml"))}


def config_description(path: Path) -> str:
    """A config file's one-line description: the first line of its leading comment ("" if it has none)."""
    first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    return first.removeprefix("#").strip() if first.startswith("#") else ""


def resolve_config(config: str | Path | None) -> Path | None:
    """The file a command's CONFIG argument names: an existing file as given (a file wins over a name), else the
    shipped config of that name (`shipped_configs`; a folder of that name does not hide it). A bare word that
    names nothing is a one-line `ConfigError` listing the names; anything else stays a path, for `read_yaml` to
    report."""
    if config is None or Path(config).is_file():
        return None if config is None else Path(config)
    text, names = str(config), shipped_configs()
    if text in names:
        return names[text]
    path = Path(text)
    if not path.exists() and "/" not in text and os.sep not in text and path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"unknown config {text!r}: neither a file nor a shipped config ({', '.join(names)}); "
                          "see `eigenprune config --list`")
    if not path.exists() and path.stem in names:  # e.g. configs/paper.yaml, from before the configs moved into the package
        raise ConfigError(f"config file not found: {text}; the shipped configs install with eigenprune and are given by name: "
                          f"{path.stem}")
    return path


def load_config(path: str | Path | None, overrides: dict | None = None) -> Config:
    """Load a YAML config (None = the embedded defaults; a shipped config by name, see `resolve_config`) and
    apply `overrides` (dotted keys)."""
    return parse_config(*read_yaml(resolve_config(path), overrides))
