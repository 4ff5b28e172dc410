"""Inputs and teachers -> per-trial train/test sets.

Every trial gets fresh inputs from its own seed; the teacher is the same for all trials.
Real data (scikit-learn's digits, a user's CSV) gets a fresh seeded train/test split per trial.
Teachers (all frozen):
  mlp              y = sum of the last hidden layer of a ReLU MLP (the paper's teacher)
  linear           y = x @ w, w Glorot uniform from the teacher seed
  hidden_manifold  x = tanh(z F / sqrt(d)) for a latent z ~ N(0, I_d) and a fixed Gaussian F [d, D];
                   y = sigmoid(mlp_teacher(z)) (Goldt et al.'s hidden-manifold model)
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from eigenprune.core.errors import EigenpruneError
from eigenprune.core.io import check_path, input_file
from eigenprune.core.layers import glorot_uniform_
from eigenprune.core.seeds import derive_seed
from eigenprune.experiments import experiment_seeds
from eigenprune.experiments.builders import make_teacher
from eigenprune.experiments.config import Config, ConfigError, DataConfig


@dataclass
class TrialData:
    """Train/test sets for T trials: x [T, P, D], y [T, P] (float targets, or class indices)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str = "regression"
    n_outputs: int = 1
    target_scale: float = 1.0
    source_sha256: str | None = None  # digest of the user's file the sets came from (None: made from seeds alone)

    def to(self, device: torch.device | str) -> TrialData:
        moved = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
        return replace(self, **moved)


@dataclass(frozen=True)
class DataSpec:
    """What a run's data is, known before anything trains or is written: the task, the input and output
    sizes, the training patterns per trial (`n_train`, of which the first `n_fit` are trained on and the rest
    validate a regularization path), the test patterns, and the sha256 of the user's file the data came from
    (None: made from seeds alone). Made once (`data_spec`) and passed as one value."""

    task: str
    inputs: int
    outputs: int
    n_train: int
    n_fit: int
    n_test: int
    digest: str | None = None


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (part of a run's identity when the run trains on that file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_function(kind: str, input_dim: int, widths: list[int], seed: int, latent_dim: int, dtype: torch.dtype):
    """(draw(n, generator), label(u), embed(u) or None) for a teacher kind: `draw` makes n inputs (or latent
    vectors u), `label` their targets, `embed` maps latent vectors to inputs (None: u are the inputs)."""
    if kind == "mlp":
        net = make_teacher(input_dim, widths, seed, dtype)
        return (lambda n, g: torch.randn(n, input_dim, generator=g, dtype=dtype)), (lambda x: net(x).squeeze(-1)), None
    if kind == "linear":
        w = glorot_uniform_(torch.empty(1, input_dim, dtype=dtype), torch.Generator().manual_seed(seed))
        return (lambda n, g: torch.randn(n, input_dim, generator=g, dtype=dtype)), (lambda x: (x @ w.T).squeeze(-1)), None
    if kind == "hidden_manifold":
        g0 = torch.Generator().manual_seed(seed)
        features = torch.randn(latent_dim, input_dim, generator=g0, dtype=dtype)
        net = make_teacher(latent_dim, widths, seed + 1, dtype)
        embed = lambda z: torch.tanh(z @ features / math.sqrt(latent_dim))  # noqa: E731
        label = lambda z: torch.sigmoid(net(z).squeeze(-1))  # noqa: E731
        return (lambda n, g: torch.randn(n, latent_dim, generator=g, dtype=dtype)), label, embed
    raise ValueError(f"teacher kind must be one of mlp, linear, hidden_manifold, got {kind!r}")


@torch.no_grad()
def teacher_data(
    kind: str, input_dim: int, widths: list[int], teacher_seed: int, data_seed: int, trials: int,
    n_train: int, n_test: int, latent_dim: int = 5, standardize: bool = False, dtype: torch.dtype = torch.float32,
) -> TrialData:
    """Gaussian (or hidden-manifold) inputs labelled by a frozen teacher, fresh inputs per trial.

    With `standardize`, targets are divided by the standard deviation of all training targets
    (losses are then in units of the target variance); the factor is kept in `target_scale`.
    """
    draw, label, embed = teacher_function(kind, input_dim, widths, teacher_seed, latent_dim, dtype)
    xs, ys = [], []
    for t in range(trials):
        g = torch.Generator().manual_seed(derive_seed("data", data_seed, t))
        u = draw(n_train + n_test, g)
        ys.append(label(u))
        xs.append(embed(u) if embed is not None else u)
    x, y = torch.stack(xs), torch.stack(ys)
    scale = float(y[:, :n_train].std()) if standardize else 1.0
    y = y / scale
    return TrialData(x[:, :n_train], y[:, :n_train], x[:, n_train:], y[:, n_train:], target_scale=scale)


class DataError(EigenpruneError, ValueError):
    """A data set that cannot be used as configured, stated in one line."""


MAX_TARGET = 1e6
"""The largest |target| a regression on real data accepts. Targets are not standardized (losses are in the
target's units), and a student that starts with outputs near 1 and moves by Adam's learning rate per step
cannot reach such values (measured: docs/reliability.md, "Regression targets beyond ±1e6")."""


def _split_trials(x: np.ndarray, y: np.ndarray, trials: int, seed: int, test_fraction: float, task: str,
                  dtype: torch.dtype = torch.float32, names: list[str] | None = None, what: str = "the data") -> TrialData:
    """Per trial: a seeded shuffle, the last `test_fraction` as test set, features standardized with
    the training part's mean and std. Refuses (DataError) anything that is not finite once
    standardized in `dtype` (the dtype that trains); `names` are the feature columns' names for messages."""
    n = len(x)
    n_test = max(1, round(n * test_fraction))
    if n - n_test < 2:
        raise DataError(f"{what} has {n} row(s): with test_fraction {test_fraction} that leaves {max(n - n_test, 0)} for "
                        "training; at least 2 training rows are needed")
    names = names or [f"feature {j}" for j in range(x.shape[1])]
    limit = float(torch.finfo(dtype).max)
    if task == "regression" and not np.all(np.abs(y) < limit ** 0.5):  # its squared error would overflow
        worst = float(y[np.argmax(np.abs(y))])
        raise DataError(f"{what}: the target holds {worst:g}, whose squared error overflows {str(dtype).removeprefix('torch.')} "
                        f"(|y| must stay below {limit ** 0.5:.3g}); rescale the target")
    if task == "regression" and np.max(np.abs(y)) > MAX_TARGET:
        worst = float(y[np.argmax(np.abs(y))])
        raise DataError(f"{what}: the target reaches {worst:.3g} (mean {float(np.mean(y)):.3g}, std {float(np.std(y)):.3g}); students "
                        f"train on targets as they are (only features are standardized) and cannot fit values beyond "
                        f"±{MAX_TARGET:.0e}: standardize the target first, (y - mean) / std")
    xs, ys = [], []
    with np.errstate(all="ignore"):
        for t in range(trials):
            order = np.random.default_rng(derive_seed("split", seed, t) % 2**32).permutation(n)
            xt = x[order]
            mean, std = xt[: n - n_test].mean(0), xt[: n - n_test].std(0)
            z = ((xt - mean) / np.where(std > 0, std, 1.0)).astype(np.dtype(str(dtype).removeprefix("torch.")))
            bad = ~np.isfinite(z).all(0) | ~np.isfinite(mean) | ~np.isfinite(std)
            if bad.any():
                j = int(np.nonzero(bad)[0][0])
                raise DataError(f"{what}: column {names[j]!r} is not finite once standardized (values up to "
                                f"{float(np.max(np.abs(x[:, j]))):g}; its mean or std overflows); rescale it")
            xs.append(z)
            ys.append(y[order])
    x_all = torch.tensor(np.stack(xs), dtype=dtype)
    y_all = torch.tensor(np.stack(ys), dtype=torch.long if task == "classification" else dtype)
    n_out = int(y.max()) + 1 if task == "classification" else 1
    return TrialData(x_all[:, : n - n_test], y_all[:, : n - n_test], x_all[:, n - n_test :], y_all[:, n - n_test :],
                     task=task, n_outputs=n_out)


def digits_data(trials: int, seed: int, test_fraction: float, dtype: torch.dtype = torch.float32) -> TrialData:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; no download), split per trial."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split_trials(d.data.astype(np.float64), d.target.astype(np.int64), trials, seed, test_fraction, "classification",
                         dtype, what="digits")


def _first_bad(column, check) -> object:
    """The first value of a pandas column for which `check(value)` is false (for error messages)."""
    for value in column:
        if not check(value):
            return value
    return None


def _header(path: str) -> list[str]:
    """The CSV's header row as written (pandas renames a repeated name `y` to `y.1`)."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        try:
            return next(csv.reader(f), [])
        except csv.Error as err:  # e.g. a field over csv.field_size_limit(): read as a ValueError, one line
            raise ValueError(str(err)) from None


MAX_CSV_COLUMNS = 10_000
"""The most columns a CSV may have: pandas needs about a second to read 10,000 columns (and minutes for
100,000, before anything trains), and each feature is an input node of every student."""


def csv_data(path: str, target: str, features: list[str] | None, task: str, trials: int, seed: int, test_fraction: float,
             dtype: torch.dtype = torch.float32) -> TrialData:
    """A user's CSV: numeric feature columns and a target column (numbers for regression, labels for
    classification), split per trial. Every problem raises `DataError` naming the column. (Longer than 60 lines:
    one check after another, in the order a user meets them; split, they would only pass the frame around.)"""
    import pandas as pd

    p = check_path(Path(path).expanduser(), "data.csv.path", DataError)
    where = f" (looked for {p.resolve()})" if str(p.resolve()) != str(p) else ""
    p = input_file(p, "data.csv.path: file", DataError, label="data.csv.path:", what="CSV file",
                   hint=f"{where}; a relative path in a config file is read from that file's folder")
    path = str(p)
    try:
        header = _header(path)
        if len(header) > MAX_CSV_COLUMNS:
            raise DataError(f"data.csv.path: {path} has {len(header):,} columns, more than the {MAX_CSV_COLUMNS:,} eigenprune "
                            "reads (each feature is an input node of every student); select or reduce the features first")
        df = pd.read_csv(path)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"data.csv.path: {path} is empty (no header row)") from None
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise DataError(f"data.csv.path: cannot read {path} as CSV ({' '.join(str(err).split())})") from None
    repeated = sorted(c for c, n in Counter(header).items() if n > 1)
    if repeated:
        raise DataError(f"data.csv.path: {path} repeats the column name(s) {repeated} in its header; each column needs its own name")
    if target not in df.columns:
        hint = " (the file has one column: is it separated by ';' or tabs? eigenprune reads commas)" if len(df.columns) == 1 else ""
        raise DataError(f"data.csv.target: no column {target!r} in {path}; columns are {list(df.columns)}{hint}")
    if features is not None:
        missing = [c for c in features if c not in df.columns]
        if missing:
            raise DataError(f"data.csv.features: no column(s) {missing} in {path}; columns are {list(df.columns)}")
        if target in features:
            raise DataError(f"data.csv.features: lists the target {target!r}; a model cannot use its target as an input")
        if len(set(features)) < len(features):
            raise DataError(f"data.csv.features: lists a column twice ({sorted(c for c, n in Counter(features).items() if n > 1)})")
    else:
        unnamed = [c for c, h in zip(df.columns, header) if not h.strip()]
        if unnamed:
            raise DataError(f"data.csv.path: {path} has a column without a name (pandas calls it {unnamed[0]!r}; an index "
                            "written by DataFrame.to_csv?); drop it (to_csv(index=False)) or list data.csv.features")
        features = [c for c in df.columns if c != target]
        if not features:
            raise DataError(f"data.csv.path: {path} has only the target column {target!r}; it needs feature columns too")
    if len(df) == 0:
        raise DataError(f"data.csv.path: {path} has a header but no data rows")
    kinds = df.dtypes[features]  # whole-table checks first: a per-column loop is slow on many columns
    numeric = [pd.api.types.is_numeric_dtype(k) and not pd.api.types.is_bool_dtype(k) for k in kinds]
    if not all(numeric):
        c = features[numeric.index(False)]
        bad = _first_bad(df[c], lambda v: pd.isna(v) or (not isinstance(v, bool) and pd.notna(pd.to_numeric(v, errors="coerce"))))
        bad = bad if bad is not None else df[c].iloc[0]
        raise DataError(f"data.csv.features: column {c!r} is not numeric (e.g. {bad!r}); features must be numbers")
    x = df[features].to_numpy(np.float64)
    if np.isnan(x).any():
        j = int(np.nonzero(np.isnan(x).any(0))[0][0])
        raise DataError(f"data.csv.features: column {features[j]!r} has {int(np.isnan(x[:, j]).sum())} missing (NaN) values")
    if not np.isfinite(x).all():
        j = int(np.nonzero(~np.isfinite(x).all(0))[0][0])
        row = int(np.nonzero(~np.isfinite(x[:, j]))[0][0])
        raise DataError(f"data.csv.features: column {features[j]!r} holds {x[row, j]} (data row {row + 1}); features must be finite")
    y = df[target]
    if y.isna().any():
        raise DataError(f"data.csv.target: column {target!r} has {int(y.isna().sum())} missing values")
    if len(x) > 1 and (same := (x == x[0]).all(0)).any():
        j = int(np.nonzero(same)[0][0])
        raise DataError(f"data.csv.features: column {features[j]!r} holds the same value ({x[0, j]:g}) in every "
                        "row; a constant feature carries nothing to learn and cannot be standardized: drop it, or list "
                        "data.csv.features without it")
    if task == "regression":
        if not pd.api.types.is_numeric_dtype(y) or pd.api.types.is_bool_dtype(y):
            bad = _first_bad(y, lambda v: not isinstance(v, bool) and pd.notna(pd.to_numeric(v, errors="coerce")))
            raise DataError(f"data.csv.target: column {target!r} is not numeric (e.g. {bad!r}); use task: classification")
        labels = y.to_numpy(np.float64)
        if not np.isfinite(labels).all():
            row = int(np.nonzero(~np.isfinite(labels))[0][0])
            raise DataError(f"data.csv.target: column {target!r} holds {labels[row]} (data row {row + 1}); targets must be finite")
        if len(labels) > 1 and np.all(labels == labels[0]):
            raise DataError(f"data.csv.target: column {target!r} holds the same value ({labels[0]:g}) in every row; "
                            "there is nothing to learn")
    else:
        if pd.api.types.is_float_dtype(y) and not np.all(np.mod(y, 1) == 0):
            bad = _first_bad(y, lambda v: float(v) % 1 == 0)
            raise DataError(f"data.csv.target: column {target!r} has non-integer values (e.g. {bad!r}); task classification "
                            "needs class labels")
        labels = pd.Categorical(y).codes.astype(np.int64)
        if labels.max() < 1:
            only = y.iloc[0].item() if hasattr(y.iloc[0], "item") else y.iloc[0]
            raise DataError(f"data.csv.target: column {target!r} has one class only ({only!r}); classification needs "
                            "at least 2 classes")
    return _split_trials(x, labels, trials, seed, test_fraction, task, dtype,
                         [str(c) for c in features], what=str(path))


def make_data(cfg: Config) -> TrialData:
    """The trials' train/test sets of a run: teacher data, or a per-trial split of digits or a CSV file."""
    d = cfg.data
    seed = experiment_seeds.data_seed(cfg.seed, d.seed)
    if d.source == "digits":
        return digits_data(cfg.trials, seed, d.test_fraction, getattr(torch, cfg.dtype))
    if d.source == "csv":  # the file's bytes are part of the run's identity: hashed as they are read
        check_path(d.csv.path, "data.csv.path", DataError)  # before is_file(), which raises on a name too long
        digest = file_sha256(d.csv.path) if Path(d.csv.path).is_file() else None
        data = csv_data(d.csv.path, d.csv.target, d.csv.features, d.csv.task, cfg.trials, seed, d.test_fraction,
                        getattr(torch, cfg.dtype))
        return replace(data, source_sha256=digest)
    return teacher_set(d, seed, cfg.trials, getattr(torch, cfg.dtype))


def teacher_set(d: DataConfig, seed: int, trials: int, dtype: torch.dtype) -> TrialData:
    """Teacher-labelled train/test sets of `trials` trials for a data config (see `teacher_data`)."""
    t = d.teacher
    return teacher_data(t.kind, d.input_dim, list(t.widths), t.seed, seed, trials, d.n_train, d.n_test, t.latent_dim,
                        d.standardize_targets, dtype)


def data_spec(cfg: Config, data: TrialData | None = None) -> DataSpec:
    """The `DataSpec` of a run's data: teacher data's from the config; real data's from `data` (made here when
    None, so that bad data fails before a run folder exists). ConfigError where a method's batch is larger than
    the patterns it trains on."""
    if cfg.data.source == "teacher":
        d = cfg.data
        task, inputs, outputs, n_train, n_test, digest = "regression", d.input_dim, 1, d.n_train, d.n_test, None
    else:
        data = make_data(cfg) if data is None else data
        task, inputs, outputs, digest = data.task, data.x_train.shape[-1], data.n_outputs, data.source_sha256
        n_train, n_test = data.x_train.shape[1], data.x_test.shape[1]
    n_fit = cfg.regularization.n_fit(n_train)
    for method in cfg.methods:
        batch = cfg.method(method).batch_size
        if batch > n_fit:
            held = f" ({n_train - n_fit} of the {n_train} are held out for validation)" if n_fit < n_train else ""
            raise ConfigError(f"{method}.batch_size {batch} is larger than the {n_fit} training patterns{held}; "
                              f"use a batch_size of at most {n_fit}")
    return DataSpec(task, inputs, outputs, n_train, n_fit, n_test, digest)


def check_same_data(cfg: Config, data: TrialData, spec: DataSpec) -> None:
    """Refuse (`DataError`) data whose source file is no longer the one the run started on (`spec.digest`)."""
    if data.source_sha256 != spec.digest:
        raise DataError(f"{cfg.data.csv.path} changed while the run was going (sha256 {str(spec.digest)[:12]} at the start, "
                        f"{str(data.source_sha256)[:12]} now); finished chunks are kept, rerun once the file is final")
