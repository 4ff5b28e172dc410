"""Bad input, round 3: the developers' hunt (issue #22). The cases the hunt found unacceptable, fixed, each tested here.

The pattern of round 3 (tests/test_bad_input_round3_library.py, whose `Case` and `_check` this file uses): a CLI case
exits 2 with one `error:` line and nothing on stdout; a Python call raises the library's own exception with a
one-line message; both within seconds, with every input file byte-identical and none added. Then what now works
instead of failing: a pruned model keeps the model's training mode, children forked while a signal arrives do not
print a traceback, and a failed commit says what to do (disk full, file size limit) or that the folder was replaced.
The table of every case tried is in docs/reliability.md ("Bad input, round 3: the developers' hunt").
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from eigenprune import despectralize, prune_nodes, spectral_penalty, spectralize  # noqa: E402
from eigenprune.core.convert import SpectralizeError  # noqa: E402
from eigenprune.experiments.backends import child_signals, signals_held  # noqa: E402
from eigenprune.pruning import PruneError  # noqa: E402
from eigenprune.pruning.checkpoint import CheckpointError, save_model  # noqa: E402
from test_bad_input_cases import invoke, stored  # noqa: E402, F401 (stored: a fixture)
from test_bad_input_round3_cli import _tiny_run  # noqa: E402
from test_bad_input_round3_library import Case, _check, export, mlp  # noqa: E402

ExportError = export.ExportError
X = torch.randn(5, 4)


def scripted_inside() -> nn.Sequential:
    model = mlp()
    model[2] = torch.jit.script(model[2])
    return model


def zero_width() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 0), nn.ReLU(), nn.Linear(0, 2))


CASES = [
    # the CLI
    Case("max-memory-1e308", "`plan --set max_memory_gb=1e308` (before: OverflowError traceback)",
         "max_memory_gb: Input should be less than or equal to 1000000",
         cli=["plan", "--measure", "0", "--set", "max_memory_gb=1e308"]),
    Case("set-key-newline", "`plan --set $'tri\\nals=1'` (before: `error: … invalid config: tri`, the line cut at the newline)",
         "got the key 'tri\\nals'", cli=["plan", "--measure", "0", "--set", "tri\nals=1"]),
    Case("set-key-space", "`plan --set 'spectral. lr=1'`", "KEY a config field, dotted", cli=["plan", "--set", "spectral. lr=1"]),
    # spectralize, despectralize, spectral_penalty
    Case("spectralize-scripted", "`spectralize(torch.jit.script(m))` (before: RuntimeError: get_submodule is not supported)",
         "spectralize takes a Python nn.Module, got a TorchScript module (RecursiveScriptModule)",
         lambda d: spectralize(torch.jit.script(mlp())), SpectralizeError),
    Case("despectralize-scripted", "`despectralize(torch.jit.script(m))`", "despectralize takes a Python nn.Module, got a TorchScript",
         lambda d: despectralize(torch.jit.script(mlp())), SpectralizeError),
    Case("penalty-not-a-module", "`spectral_penalty('x')` (before: AttributeError)", "spectral_penalty takes an nn.Module, got str",
         lambda d: spectral_penalty("x"), SpectralizeError),
    # prune_nodes
    Case("prune-zero-width-chain", "`prune_nodes` of Linear(4, 0) -> ReLU -> Linear(0, 2) (before: `keep=1 exceeds the width 0 … "
         "in 1..0`)", "the model's 0.weight is empty (shape [0, 4]: a layer of width 0): nothing to prune",
         lambda d: prune_nodes(zero_width(), 1), PruneError),
    Case("prune-zero-width-graph", "the same with example_inputs (before: RuntimeError: index_add_(): Expected dtype int32/int64)",
         "the model's 0.weight is empty (shape [0, 4]", lambda d: prune_nodes(zero_width(), 1, example_inputs=X), PruneError),
    Case("prune-scripted-submodule", "`prune_nodes(m, 3, example_inputs=x)`, m[2] a `torch.jit.script` Linear (before: RuntimeError: "
         "register_forward_pre_hook is not supported on ScriptModules)", "cannot prune Sequential: 2 is a TorchScript module",
         lambda d: prune_nodes(scripted_inside(), 3, example_inputs=X), PruneError),
    Case("prune-scripted-model", "`prune_nodes(torch.jit.script(m), 3, example_inputs=x)`", "the model is a TorchScript module",
         lambda d: prune_nodes(torch.jit.script(mlp()), 3, example_inputs=X), PruneError),
    # export and checkpoints
    Case("export-zero-rows", "`export_module_onnx(m, torch.ones(0, 4), 'z.onnx')` (before: wrote z.onnx, checked on nothing)",
         "example_inputs[0] has no rows (shape [0, 4])", lambda d: export.export_module_onnx(mlp(), torch.ones(0, 4), d / "z.onnx"),
         ExportError),
    Case("save-conv", "`save_model(nn.Sequential(nn.Conv2d(1, 2, 3)), 'c.safetensors')` (before: TypeError)",
         "save_model writes MLPs only: cannot read Conv2d as part of an MLP",
         lambda d: save_model(nn.Sequential(nn.Conv2d(1, 2, 3)), d / "c.safetensors"), CheckpointError),
    Case("save-scripted", "`save_model(torch.jit.script(m), 'j.safetensors')` (before: TypeError)",
         "save_model writes MLPs only: cannot read RecursiveScriptModule as an MLP",
         lambda d: save_model(torch.jit.script(mlp()), d / "j.safetensors"), CheckpointError),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hunt_bad_input_is_one_typed_line_and_changes_nothing(case, tmp_path, monkeypatch):
    _check(case, tmp_path, monkeypatch)


def test_the_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


# --- what now works instead of failing ----------------------------------------------------------------------

@pytest.mark.parametrize("graph", [False, True], ids=["chain", "graph"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_a_pruned_model_keeps_the_training_mode_of_the_model(graph, training):
    """Before: the chain path returned a model in training mode (its Dropout active) from a model in eval mode."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    model = spectralize(model).train(training)
    small = prune_nodes(model, 3, example_inputs=X) if graph else prune_nodes(model, 3)
    assert [m.training for m in small.modules()] == [training] * len(list(small.modules()))
    if not training:  # the same outputs twice: Dropout is off
        torch.testing.assert_close(small(X), small(X), rtol=0, atol=0)


def test_spectralize_leaves_a_layer_of_width_0_alone(caplog):
    """Before: ValueError('SpectralLinear sizes must be positive integers, got 4x0') from inside the conversion."""
    with caplog.at_level("WARNING", logger="eigenprune"):
        model = spectralize(zero_width())
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert "spectralize left 0 (Linear) alone: it has no weights (shape [0, 4]: a layer of width 0)" in caplog.text


def _child_sleeps() -> None:
    time.sleep(1.0)  # a child that is slow to take over its signals (a loaded machine): SIGTERM comes before
    child_signals()
    time.sleep(10)


def test_a_child_signalled_before_it_has_its_handlers_ends_without_a_traceback():
    """The CLI turns SIGTERM into a KeyboardInterrupt, which a fork inherits; before, a worker or the figure drawer
    signalled in the moment after the fork printed multiprocessing's traceback (seen with SIGSTOP, SIGCONT, SIGINT).
    Now the signal waits, blocked, until the child has its own handlers, then ends it as SIGTERM does."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with signals_held():
            child = mp.get_context("fork").Process(target=_child_sleeps)
            child.start()
        os.kill(child.pid, signal.SIGTERM)
        child.join(20)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert child.exitcode == -signal.SIGTERM  # ended by the signal itself, not by an exception (exit code 1)


def _fail_writes(error: OSError):
    """For `_tiny_run`: every later temporary file or folder in the run folder fails with `error`."""
    def before_second_commit(folder):
        import eigenprune.experiments.store as store

        def refuse(parent, name, directory=False):
            raise error
        store.temp_path = refuse
    return before_second_commit


@pytest.mark.parametrize("error, remedy", [
    (OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"), "free some disk space"),
    (OSError(27, "File too large"), "raise the file size limit (ulimit -f)"),
], ids=["disk-full", "file-too-large"])
def test_a_commit_that_fails_for_lack_of_space_says_so(error, remedy, tmp_path, monkeypatch):
    """Before: '… No space left on device; … make the folder writable and rerun' (a writable folder, a full disk)."""
    import eigenprune.experiments.store as store

    monkeypatch.setattr(store, "temp_path", store.temp_path)  # undone after the test
    calls, err = _tiny_run(tmp_path, monkeypatch, _fail_writes(error))
    assert f"the chunks committed before are kept: {remedy} and rerun the same command to resume" in err, err


def test_a_run_folder_replaced_mid_run_is_not_written_into(tmp_path, monkeypatch):
    """Before: the run went on in the folder made at its place, wrote its marker, tables and report there, exit 0."""
    def replace(folder):
        os.rename(folder.path, folder.path.with_name("moved"))
        folder.path.mkdir()
        (folder.path / "notes.txt").write_text("NOTES")

    calls, err = _tiny_run(tmp_path, monkeypatch, replace)
    assert "parent/run was replaced by another folder while eigenprune was working in it" in err, err
    assert sorted(p.name for p in (tmp_path / "parent" / "run").iterdir()) == ["notes.txt"]
    assert (tmp_path / "parent" / "run" / "notes.txt").read_text() == "NOTES"
    moved = tmp_path / "parent" / "moved"
    assert sorted(p.name for p in (moved / "chunks").iterdir()) == [calls[0]]  # the first chunk, whole, where it was
    shutil.rmtree(moved)


@pytest.mark.parametrize("change", ["removed", "link"])
def test_figures_removed_or_replaced_by_a_link_mid_report(change, request, tmp_path, monkeypatch):
    """Before: a traceback (FileNotFoundError: the report read each PNG back from figures/, which was gone, or was a
    link: the report would have embedded the user's file of that name). Now the report embeds the bytes it wrote:
    figures/ removed is made again; figures/ a link is refused in one line, the link's target untouched."""
    from eigenprune.experiments.store import OwnedFolder

    run = tmp_path / "run"
    shutil.copytree(request.getfixturevalue("stored"), run)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "losses.png").write_text("MINE")
    original, written = OwnedFolder.write, []

    def write(self, rel, content, durable=False):
        path = original(self, rel, content, durable)
        written.append(rel)
        if len(written) == 1:  # right after the first figure
            shutil.rmtree(run / "figures")
            if change == "link":
                os.symlink(victim, run / "figures")
        return path

    monkeypatch.setattr(OwnedFolder, "write", write)
    result = invoke(["report", str(run)])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if change == "removed":
        assert result.exit_code == 0, result.output
        assert len(list((run / "figures").glob("*.png"))) == len(written) - 2  # all but the first; report.html, the marker
    else:
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert "figures is a symbolic link; eigenprune never reads, writes or deletes through a link" in result.stderr
        assert [p.name for p in victim.iterdir()] == ["losses.png"] and (victim / "losses.png").read_text() == "MINE"
