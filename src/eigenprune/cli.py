"""The `eigenprune` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from eigenprune.checkpoint import CheckpointError
from eigenprune.config import ConfigError, load_config
from eigenprune.data import DataError
from eigenprune.store import RunFolderError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Spectral training and eigenvalue-ranked pruning of MLPs.")

USER_ERRORS = (ConfigError, RunFolderError, CheckpointError, DataError)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--set takes KEY=VALUE (e.g. spectral.epochs=100), got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config; omit for the embedded quick config")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run folder (default runs/<name>)")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N or auto (overrides the config)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a config field, e.g. --set trials=2")] = [],  # noqa: B006
    fresh: Annotated[bool, typer.Option(help="delete an existing run folder of this config and start over")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Train the grid of a config, analyse it, and write results, figures and report.html."""
    from eigenprune.experiment import run_experiment

    try:
        overrides = _overrides(set_)
        if device is not None:
            overrides["device"] = device
        cfg = load_config(config, overrides)
        path = run_experiment(cfg, out or Path("runs") / cfg.name, fresh=fresh, quiet=quiet)
    except USER_ERRORS as err:
        _fail(str(err))
    typer.echo(f"results in {path} (open {path / 'report.html'})")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run folder made by `eigenprune run`")]) -> None:
    """Rebuild the figures and report.html of a run folder from its stored results (no training)."""
    from eigenprune.report import build_report

    try:
        path = build_report(run_dir)
    except USER_ERRORS as err:
        _fail(str(err))
    typer.echo(f"wrote {path}")


@app.command()
def collapse(
    run_dirs: Annotated[list[Path], typer.Argument(help="run folders, e.g. one per teacher width")],
    out: Annotated[Path, typer.Option(help="folder for collapse.png and collapse.json")] = Path("runs/collapse"),
) -> None:
    """Rescale the spectral pruning curves of several runs (delta/max vs n/h_T - 1) and measure their collapse."""
    from eigenprune.report import collapse_runs

    try:
        result = collapse_runs(run_dirs, out)
    except USER_ERRORS as err:
        _fail(str(err))
    typer.echo(f"spread before {result['spread_before']:.3f}, after {result['spread_after']:.3f} "
               f"(ratio {result['ratio']:.2f}); wrote {out / 'collapse.png'}")


@app.command("config")
def show_config(config: Annotated[Optional[Path], typer.Argument(help="YAML config to resolve")] = None) -> None:
    """Print a config with every default filled in (no argument: the embedded quick config)."""
    try:
        cfg = load_config(config)
    except USER_ERRORS as err:
        _fail(str(err))
    sys.stdout.write(cfg.to_yaml())


if __name__ == "__main__":
    app()
