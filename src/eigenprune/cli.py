"""The `eigenprune` command line."""

from __future__ import annotations

import atexit
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml
from typer.core import TyperGroup

from eigenprune import __version__
from eigenprune.core.errors import EigenpruneError
from eigenprune.core.io import OutputError, check_output, check_path, first_line, special_kind
from eigenprune.experiments.config import (
    ConfigDeprecation,
    YamlLimitError,
    config_description,
    load_config,
    safe_load,
    shipped_configs,
    yaml_problem,
)
from eigenprune.experiments.store import RunFolder, RunFolderError

try:
    from typer import TyperException as _UsageError  # newer typer parses arguments without click
except ImportError:
    from click import ClickException as _UsageError


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that every cleanup runs (workers end, the lock goes)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


class _OneLineErrors(TyperGroup):
    """Usage errors (unknown option, bad value, missing argument) as one `error: ...` line, exit code 2."""

    def main(
        self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
        standalone_mode: bool = True, **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if not argv:  # bare `eigenprune`: the help text, as typer shows it
            return super().main(argv, prog_name, complete_var, standalone_mode=standalone_mode, **extra)
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, _raise_interrupted)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM or SIGHUP in a command that has no message of its own
            typer.echo("interrupted", err=True)
            code = 128 + getattr(err, "signum", signal.SIGINT)
        except _UsageError as err:
            ctx = getattr(err, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"error: {' '.join(err.format_message().split())}{hint}", err=True)
            code = err.exit_code
        except typer.Abort:
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        """Run the command. The one place eigenprune's own errors (`EigenpruneError`) become one `error:` line and exit
        status 2; Ctrl-C, SIGTERM or SIGHUP in a command without a message of its own says so, with exit status
        128 + the signal (typer itself would turn any of them into a silent 130)."""
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warnings(warnings.showwarning)
                return super().invoke(ctx)
        except EigenpruneError as err:
            _fail(str(err))
        except KeyboardInterrupt as err:
            typer.echo("interrupted", err=True)
            raise typer.Exit(128 + getattr(err, "signum", signal.SIGINT)) from None


def _one_line_warnings(show: Callable[..., None]) -> Callable[..., None]:
    """`warnings.showwarning` that writes a config's old option name (`ConfigDeprecation`) as one `warning:` line and
    leaves every other warning to `show`."""
    def show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, ConfigDeprecation):
            typer.echo(f"warning: {message}", err=True)
        else:
            show(message, category, *args, **kwargs)
    return show_warning


app = typer.Typer(
    cls=_OneLineErrors, add_completion=False, no_args_is_help=True, help="Spectral training and eigenvalue-ranked pruning.",
    rich_markup_mode=None,  # help texts are plain: Rich markup would swallow `eigenprune[ray]`
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"eigenprune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")] = False,
) -> None:
    """Spectral training and eigenvalue-ranked pruning of PyTorch models."""


CONFIG_HELP = ("a YAML config file, or the name of a config shipped with eigenprune (e.g. paper; `eigenprune config --list`; "
               "an existing file of that name wins); omit for the embedded quick config")

def _fail(message: str) -> None:
    """One `error:` line (the first line of `message`: an error re-raised from a Ray task carries its remote traceback), exit 2."""
    typer.echo(f"error: {first_line(RuntimeError(message))}", err=True)
    raise typer.Exit(2)


def _out_folder(path: Path) -> Path:
    """An output folder given with --out (or runs/<name>), refused in one line (`OutputError`) before any work where
    the file system cannot hold its name or it is a dangling symlink (mkdir would say only "File exists")."""
    check_path(path, "--out")
    if path.is_symlink() and not path.exists():
        raise OutputError(f"--out {path} is a symlink to {os.readlink(path)}, which does not exist; eigenprune will not "
                          "create a folder through a symlink: give the real folder or another --out")
    return path


def _overrides(pairs: list[str], **options: object) -> dict:
    """--set KEY=VALUE pairs as config overrides, plus the command's own options that were given (not None)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--set takes KEY=VALUE (e.g. spectral.epochs=100), got {pair!r}")
        if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):  # a newline in it would cut the error line short
            _fail(f"--set takes KEY=VALUE with KEY a config field, dotted (e.g. spectral.epochs), got the key {key!r}")
        try:
            out[key] = safe_load(value)
        except YamlLimitError as err:
            _fail(f"--set {key}=...: YAML with {err.problem}")
        except yaml.YAMLError as err:
            _fail(f"--set {pair}: the value is not valid YAML{yaml_problem(err)} (lists look like [20,30])")
    return out | {k: v for k, v in options.items() if v is not None}


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Argument(help=CONFIG_HELP)] = None,
    out: Annotated[Optional[Path], typer.Option(help="run folder (default runs/<name>)")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N or auto (overrides the config)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a config field, e.g. --set trials=2")] = [],  # noqa: B006
    fresh: Annotated[bool, typer.Option(help="start over: remove what earlier runs wrote in the folder, nothing else")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    workers: Annotated[Optional[int], typer.Option(min=0, help="worker processes, or CPUs of a new local Ray; 0 = one per core")] = None,
    backend: Annotated[str, typer.Option(help="local (this machine) or ray (a Ray cluster, needs eigenprune[ray])")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: a local one)")] = None,
) -> None:
    """Train the grid of a config, analyse it, and write results, figures and report.html.

    Rerunning the same command resumes: finished chunks are kept, the rest are trained.
    """
    from eigenprune.experiments.runner import run_experiment
    from eigenprune.reporting.report import build_report

    if backend not in ("local", "ray"):
        _fail(f"--backend must be local or ray, got {backend!r}")
    overrides = _overrides(set_, device=device, workers=workers)
    cfg = load_config(config, overrides)
    try:
        path = run_experiment(cfg, _out_folder(out or Path("runs") / cfg.name), fresh=fresh, quiet=quiet, backend=backend,
                              address=address, finish=lambda p: build_report(p, quiet=quiet))
    except KeyboardInterrupt as err:
        typer.echo("interrupted: finished chunks are kept; rerun the same command to resume", err=True)
        raise typer.Exit(128 + getattr(err, "signum", signal.SIGINT)) from None
    typer.echo(f"results in {path} (open {path / 'report.html'})")


MAX_MEASURE = 1000
"""The most Adam steps `plan --measure` times per chunk (the estimate is steady after a few dozen)."""


@app.command()
def plan(
    config: Annotated[Optional[Path], typer.Argument(help=CONFIG_HELP)] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N or auto (overrides the config)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a config field, e.g. --set trials=2")] = [],  # noqa: B006
    workers: Annotated[Optional[int], typer.Option(min=0, help="worker processes (0 = one per core)")] = None,
    measure: Annotated[int, typer.Option(min=0, max=MAX_MEASURE, help="Adam steps to time per chunk for the estimate "
                                                                        f"(0: no timing, at most {MAX_MEASURE})")] = 30,
) -> None:
    """Show what `eigenprune run` would train: chunks, students, steps, memory, the cost model's training
    minutes (what max_chunk_minutes bounds), and the training time to expect from timing a few steps of each
    chunk on this machine. Writes nothing."""
    from eigenprune.experiments.plan import plan_run

    overrides = _overrides(set_, device=device, workers=workers)
    table, info = plan_run(load_config(config, overrides), measure)
    formats = {"memory_gb": "{:.2f}".format, "model_min": "{:.1f}".format, "step_ms": "{:.3f}".format, "train_s_estimate": "{:.0f}".format}
    typer.echo(table.to_string(index=False, formatters={k: f for k, f in formats.items() if k in table}))
    typer.echo(f"device {info['device']}, {info['workers']} worker(s) x {info['threads_per_worker']} thread(s), "
               f"memory limit {info['memory_limit_gb']:.2f} GB per worker")
    bound = "no bound: max_chunk_minutes null" if info["max_chunk_minutes"] is None else f"max_chunk_minutes {info['max_chunk_minutes']:g}"
    typer.echo(f"cost model (model_min, a 2-core CPU's): {len(table)} chunks, the longest {table['model_min'].max():.1f} min "
               f"({bound}), {info['model_min_total']:.1f} min of chunk time in all")
    if measure:
        typer.echo(f"estimated training: {info['train_s_estimate_wall']:.0f} s wall ({info['train_s_estimate_sequential']:.0f} s "
                   f"of chunk time), from {measure} steps per chunk timed one chunk at a time (workers side by side can be "
                   f"slower); evaluation, analysis and the report come on top")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run folder made by `eigenprune run`")]) -> None:
    """Rebuild the figures and report.html of a run folder from its stored results (no training)."""
    from eigenprune.reporting.report import build_report

    path = build_report(check_path(run_dir, "run folder", RunFolderError))
    typer.echo(f"wrote {path}")


@app.command()
def collapse(
    run_dirs: Annotated[list[Path], typer.Argument(help="run folders, e.g. one per teacher width")],
    out: Annotated[Path, typer.Option(help="folder for collapse.png and collapse.json")] = Path("runs/collapse"),
) -> None:
    """Rescale the spectral pruning curves of several runs (delta/max vs n/h_T - 1) and measure their collapse."""
    from eigenprune.reporting.collapse import collapse_runs

    result = collapse_runs([check_path(r, "run folder", RunFolderError) for r in run_dirs], _out_folder(out))
    nc = result["by_critical_point"]
    typer.echo(f"rescaled by h_T: spread before {result['spread_before']:.3f}, after {result['spread_after']:.3f} "
               f"(ratio {result['ratio']:.2f}); by n_c: after {nc['spread_after']:.3f} (ratio {nc['ratio']:.2f}); wrote {out}")


@app.command("config")
def show_config(
    config: Annotated[Optional[Path], typer.Argument(help=CONFIG_HELP)] = None,
    list_: Annotated[bool, typer.Option("--list", help="list the shipped configs: their names, a line on each")] = False,
) -> None:
    """Print a config with every default filled in (no argument: the embedded quick config), or list the shipped ones."""
    if list_:
        if config is not None:
            _fail(f"--list takes no CONFIG (got {config}); `eigenprune config NAME` prints one")
        names = shipped_configs()
        width = max(map(len, names))
        for name, path in names.items():
            typer.echo(f"{name:<{width}}  {config_description(path)}")
        return
    cfg = load_config(config)
    sys.stdout.write(cfg.to_yaml())



# --- Pruning as a product: prune, export, compare ---------------------------------------------------


def _validation_data(checkpoint: Path, data: Optional[Path], extra: dict):
    """(x, y, task) for keep=auto: a safetensors file with tensors x and y, or the run folder the checkpoint came from."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from eigenprune.experiments.data import make_data
    from eigenprune.pruning.keep import PruneError

    if data is not None:
        check_path(data, "--data", PruneError)
        if data.exists() and not data.is_dir() and not data.is_file():  # read as a file, it would never end (/dev/zero, a FIFO)
            raise PruneError(f"--data {data}: not a regular file ({special_kind(data, data.stat().st_mode)}); --data takes the run "
                             "folder the checkpoint came from or a safetensors file with tensors x and y")
    if data is not None and data.is_file():
        with open(data, "rb") as f:
            head = f.read(9)
        if len(head) < 9 or head[8:9] != b"{":  # a safetensors file starts with a u64 header size and a JSON header
            raise PruneError(f"--data {data}: not a safetensors file; --data takes the run folder the checkpoint came from "
                             "or a safetensors file with tensors x [P, D] and y [P] (e.g. safetensors.torch.save_file)")
        try:
            tensors = load_file(str(data))
        except (SafetensorError, OSError, ValueError) as err:
            raise PruneError(f"{data}: not a readable safetensors file ({err})") from None
        if not {"x", "y"} <= set(tensors):
            raise PruneError(f"{data}: a data file needs tensors named x [P, D] and y [P], found {sorted(tensors)}")
        x, y = tensors["x"], tensors["y"]
        return x, y, "regression" if y.is_floating_point() else "classification"
    if data is not None and not data.exists():
        raise PruneError(f"--data {data}: not found; pass the run folder the checkpoint came from or a safetensors file with x and y")
    if data is not None and not (data / "config.yaml").is_file():
        raise PruneError(f"--data {data}: not a run folder (no config.yaml in it); pass the run folder the checkpoint came "
                         "from or a safetensors file with tensors x and y")
    run_dir = data
    if run_dir is None:  # the run folder the checkpoint lies in: the nearest parent with a run marker
        run_dir = next((d for d in checkpoint.resolve().parents if RunFolder(d).is_run_folder()), None)
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        raise PruneError("--keep auto needs validation data: pass --data RUN_DIR (the run folder the checkpoint came from) "
                         "or --data FILE.safetensors (tensors x and y)")
    cfg = RunFolder(run_dir).read_config()
    digest = extra.get("config_digest")
    if digest is not None and digest != cfg.digest():
        raise PruneError(f"{checkpoint} was trained with config {digest}, but {run_dir} holds config {cfg.digest()}")
    trial, teacher = extra.get("trial", 0), extra.get("teacher_index") or 0
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (trial, teacher)):
        raise PruneError(f"{checkpoint}: its metadata names trial {trial!r} and teacher {teacher!r}; both must be integers")
    if not 0 <= trial < cfg.trials:
        raise PruneError(f"{checkpoint} names trial {trial}, but {run_dir} has trials 0..{cfg.trials - 1}")
    if not 0 <= teacher < len(cfg.teacher_list()):
        raise PruneError(f"{checkpoint} names teacher {teacher}, but {run_dir} has {len(cfg.teacher_list())} teacher(s)")
    cfg = cfg.for_teacher(teacher)
    trial_data = make_data(cfg)
    if "data_sha256" in extra and extra["data_sha256"] != trial_data.source_sha256:
        raise PruneError(f"{checkpoint} was trained on data with sha256 {str(extra['data_sha256'])[:12]}, but "
                         f"{cfg.data.csv.path} now has sha256 {str(trial_data.source_sha256)[:12]}: the file changed; "
                         "pass --data FILE.safetensors with the validation data to use")
    n_fit = cfg.regularization.n_fit(trial_data.x_train.shape[1])
    if n_fit < trial_data.x_train.shape[1]:  # the run held out a validation part of the training set: use it
        return trial_data.x_train[trial, n_fit:], trial_data.y_train[trial, n_fit:], trial_data.task
    return trial_data.x_test[trial], trial_data.y_test[trial], trial_data.task


def _check_validation(model, x, y, task: str):
    """x, y as the model's dtype, after checking that they fit the model and the task (one-line PruneError)."""
    import torch

    from eigenprune.core.structure import layer_sizes
    from eigenprune.pruning.keep import PruneError

    sizes = layer_sizes(model)
    n_in, n_out = sizes[0], sizes[-1]
    if x.dim() != 2 or x.shape[1] != n_in or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise PruneError(f"validation data must be x [P, {n_in}] and y [P], got x {list(x.shape)} and y {list(y.shape)}")
    if not x.is_floating_point():
        raise PruneError(f"validation x must hold floating-point numbers, got {x.dtype}")
    if task == "classification":
        if n_out < 2:
            raise PruneError(f"y holds integer class labels ({y.dtype}) but the model has one output (a regression model); "
                             "store y as floats for regression")
        low, high = int(y.min()) if y.numel() else 0, int(y.max()) if y.numel() else 0
        if low < 0 or high >= n_out:
            raise PruneError(f"class labels in y must be 0..{n_out - 1} (the model has {n_out} outputs), got {low}..{high}")
    elif n_out != 1:
        raise PruneError(f"the model has {n_out} outputs (a classifier) but y holds floats ({y.dtype}); "
                         f"classification needs integer labels 0..{n_out - 1} in y")
    dtype = next(model.parameters()).dtype
    return x.to(dtype), (y.to(dtype) if task == "regression" else y.to(torch.long))


def _layer_kind(layer) -> str:
    from eigenprune.core.layers import SpectralLinear

    if not isinstance(layer, SpectralLinear):
        return "dense"
    if layer.role == "spectral":
        return "spectral"
    return f"{layer.role}, regularized" if layer.ranked else "dense, unregularized"


@app.command()
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="a model saved by eigenprune (e.g. runs/quick/chunks/*/students/*.safetensors)")],
    keep: Annotated[str, typer.Option(help="nodes to keep per hidden layer: a count (25), a fraction (0.1 or 10%), "
                                           "a threshold on normalised importance (>0.05), or auto")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="the pruned model's file (default: ./<CHECKPOINT stem>-pruned.safetensors)")] = None,
    layers: Annotated[Optional[str], typer.Option(help="hidden linear layers to prune, comma-separated indices (default: the "
                                                       "layers the training method ranks: spectral or L2-regularized ones)")] = None,
    data: Annotated[Optional[Path], typer.Option(help="validation data for --keep auto: a run folder (its config regenerates "
                                                      "the data; the checkpoint's trial's held-out validation part if the run "
                                                      "has one, else its test set) or a safetensors file with tensors x and y")] = None,
    rtol: Annotated[float, typer.Option(help="auto: allowed validation-loss increase, relative to the full model's")] = 0.05,
    atol: Annotated[float, typer.Option(help="auto: allowed validation-loss increase, absolute")] = 0.0,
    force: Annotated[bool, typer.Option(help="replace an existing output file that eigenprune wrote (never any other file)")] = False,
) -> None:
    """Physically remove the least important hidden nodes; writes a smaller model of plain nn.Linear layers."""
    import torch

    from eigenprune.core.losses import task_loss
    from eigenprune.core.structure import as_sequential, layer_sizes, linear_layers
    from eigenprune.pruning.chain import ranked_layers
    from eigenprune.pruning.checkpoint import is_checkpoint, load_model, save_model
    from eigenprune.pruning.keep import PruneError, parse_keep
    from eigenprune.pruning.prune import prune_nodes

    target = check_output(out or Path(checkpoint.stem + "-pruned.safetensors"),  # not inside a run folder's chunk
                          inputs=[checkpoint, *([data] if data is not None else [])], force=force, ours=is_checkpoint,
                          kind="an eigenprune checkpoint (safetensors)", suffix=".safetensors")
    spec = parse_keep(keep)
    try:
        chosen = None if layers is None else [int(v) for v in layers.split(",")]
    except ValueError:
        raise PruneError(f"--layers takes comma-separated hidden layer indices (e.g. 0 or 0,1), got {layers!r}") from None
    if data is not None and spec.kind != "auto":
        raise PruneError(f"--data is only used with --keep auto (got --keep {keep})")
    model, extra = load_model(checkpoint)
    x = y = None
    task = "regression"
    if spec.kind == "auto":
        x, y, task = _validation_data(checkpoint, data, extra)
        x, y = _check_validation(model, x, y, task)
    chosen = ranked_layers(model) if chosen is None else chosen
    small = prune_nodes(model, spec, layers=chosen, x_val=x, y_val=y, rtol=rtol, atol=atol, task=task)
    save_model(small, target, {**extra, "pruned_from": str(checkpoint), "keep": keep, "sizes": layer_sizes(small)})
    before, after = layer_sizes(model), layer_sizes(small)
    hidden = linear_layers(as_sequential(model))[:-1]
    how = "; ".join(f"layer {i} ({_layer_kind(m)}): " + (f"{before[i + 1]} → {after[i + 1]} nodes" if i in chosen else
                                                         "not pruned (--layers to include it)") for i, m in enumerate(hidden))
    message = f"{'→'.join(map(str, before))} pruned to {'→'.join(map(str, after))} with --keep {keep} ({how})"
    if x is not None:
        with torch.no_grad():
            loss_before, loss_after = float(task_loss(model(x), y, task)), float(task_loss(small(x), y, task))
        message += f"; validation loss {loss_before:.4g} → {loss_after:.4g}"
    typer.echo(f"{message}; wrote {target}")


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="a model saved by eigenprune (pruned or not)")],
    onnx: Annotated[Path, typer.Option("--onnx", help="the ONNX file to write")],
    rtol: Annotated[float, typer.Option(help="allowed onnxruntime-vs-torch difference, relative to the largest output")] = 1e-4,
    force: Annotated[bool, typer.Option(help="replace an existing ONNX file that eigenprune wrote (never any other file)")] = False,
) -> None:
    """Export a saved model to ONNX (dynamic batch dimension). The file is written only after onnxruntime
    reproduces torch's outputs on random inputs (needs onnxruntime, part of the `onnx` extra)."""
    from eigenprune.pruning.checkpoint import load_model
    from eigenprune.pruning.export import ExportError, export_onnx, is_onnx_export

    if not rtol >= 0 or rtol == float("inf"):
        raise ExportError(f"--rtol must be a finite number >= 0, got {rtol}")
    check_output(onnx, inputs=[model], force=force, ours=is_onnx_export, option="--onnx", kind="an ONNX file")
    net, _ = load_model(model)
    path, diff = export_onnx(net, onnx, rtol, overwrite=force)
    typer.echo(f"wrote {path} (onnxruntime vs torch on 257 random inputs: max relative difference {diff:.2g})")


@app.command()
def compare(
    config: Annotated[Optional[Path], typer.Argument(help="YAML compare config; omit for the defaults (see docs/pruning.md)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output folder (default runs/<name>)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a field, e.g. --set trials=2")] = [],  # noqa: B006
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Train students with every importance criterion and tabulate recovered width, loss and ΔMSE (parquet + markdown)."""
    from eigenprune.experiments.compare import load_compare_config, run_compare

    cfg = load_compare_config(config, _overrides(set_))
    path = run_compare(cfg, _out_folder(out or Path("runs") / cfg.name), quiet=quiet)
    sys.stdout.write((path / "compare.md").read_text())
    typer.echo(f"tables in {path}")


@app.command()
def recovery(
    config: Annotated[Optional[Path], typer.Argument(help="YAML recovery config (the documented grid: recovery/cpu-recovery.yaml "
                                                     "in the package); omit for the defaults")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output folder (default runs/<name>): new, empty or an earlier recovery's")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a field, e.g. --set trials=1")] = [],  # noqa: B006
    report: Annotated[Optional[Path], typer.Option("--report", help="only (re)draw the figures of a finished recovery folder")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress lines")] = False,
) -> None:
    """The recovery diagram: does the spectral student find the teacher? Trains wide students and capacity networks over a
    grid of teachers; writes tables and figures (docs/recovery.md). Exit status 1 (tables written) if a network diverged."""
    from eigenprune.experiments.recovery import load_recovery_config, open_finished, prepare_out, recover
    from eigenprune.reporting.recovery import write_figures

    if report is not None:
        if config is not None or out is not None or set_:
            _fail("--report DIR only redraws the figures of DIR; give it without CONFIG, --out or --set")
        folder = open_finished(report)
        write_figures(folder)
        folder.release()
        return
    cfg = load_recovery_config(config, _overrides(set_))
    folder = prepare_out(_out_folder(out or Path("runs") / cfg.name))
    try:
        derived, failed = recover(cfg, folder, log=(lambda m: None) if quiet else (lambda m: typer.echo(m, err=True)))
        write_figures(folder)
    finally:
        folder.release()
    typer.echo(derived["collapse"].to_string(index=False))
    typer.echo(f"tables and figures in {folder.path}")
    if failed:
        typer.echo(f"error: {failed} networks diverged (NaN/inf loss); they are left out of the tables' summaries", err=True)
        raise typer.Exit(1)


def main() -> None:
    """The `eigenprune` command: `app`, then a quick exit with its exit status.

    Once the command has returned, the interpreter's own first steps of an exit are done (threading's
    shutdown: `concurrent.futures` stops its idle pools, such as the one torch.compile keeps, and the
    non-daemon threads are joined), then every exit handler (multiprocessing's, `weakref.finalize`'s
    temporary-folder cleanups, logging's) and the streams are flushed; then the process leaves with
    `os._exit` instead of tearing down its modules one by one. That teardown writes nothing and took
    0.5 s after importing torch alone, 1.1-1.5 s after a quick run (measured: docs/benchmarks.md);
    everything eigenprune writes is closed and fsynced before its command returns. An exception that
    escapes `app` (a bug) leaves the ordinary way, with its traceback.
    """
    try:
        app(prog_name="eigenprune")
        code: object = 0
    except SystemExit as done:
        code = done.code
    except KeyboardInterrupt as err:  # Ctrl-C while typer builds the command, before `_OneLineErrors.main` catches it
        typer.echo("interrupted", err=True)
        code = 128 + getattr(err, "signum", signal.SIGINT)
    try:
        shutdown = getattr(threading, "_shutdown", None)  # CPython's (3.10-3.13); without it no thread is waited for
        if shutdown is not None:
            shutdown()
        atexit._run_exitfuncs()
    except KeyboardInterrupt:  # Ctrl-C or a signal while the exit handlers run
        typer.echo("interrupted", err=True)
        code = 130
    if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
