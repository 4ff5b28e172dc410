import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY
from eigenprune.cli import app
from eigenprune.experiments.config import Config, ConfigError, load_config, parse_config

runner = CliRunner()


def _run(args):
    result = runner.invoke(app, args)
    return result.exit_code, result.stderr, result.stdout


@pytest.mark.parametrize(
    "body, message",
    [
        ({"trials": 2, "bogus": 1}, "bogus: unknown key (got 1)"),
        ({"student": {"widths": [20, -3]}}, "student.widths.1: Input should be greater than 0 (got -3)"),
        ({"trials": "three"}, "trials: Input should be a valid integer"),
        ({"data": {"teacher": {"kind": "quadratic"}}}, "data.teacher.kind: Input should be 'mlp', 'linear' or 'hidden_manifold'"),
        ({"spectral": {"lr": 0}}, "spectral.lr: Input should be greater than 0 (got 0)"),
        ({"device": "tpu"}, "device: must be cpu, cuda, cuda:N or auto (got 'tpu')"),
        ([1, 2], "the top level must be a mapping"),
    ],
)
def test_config_errors_are_one_line_exit_2_and_leave_no_run_folder(tmp_path, body, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(body))
    out = tmp_path / "run"
    code, err, _ = _run(["run", str(cfg), "--out", str(out), "--quiet"])
    assert code == 2
    assert message in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()


def test_missing_config_file_and_bad_yaml(tmp_path):
    code, err, _ = _run(["run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")])
    assert code == 2 and "config file not found" in err and err.count("\n") == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("trials: [1, 2\n")
    code, err, _ = _run(["run", str(bad), "--out", str(tmp_path / "r")])
    assert code == 2 and "not valid YAML at line" in err
    code, err, _ = _run(["run", "--set", "trials", "--out", str(tmp_path / "r")])
    assert code == 2 and "--set takes KEY=VALUE" in err
    assert not (tmp_path / "r").exists()


def test_defaults_are_the_quick_config_and_overrides_apply():
    cfg = load_config(None, {"spectral.epochs": 7, "student.widths": [5]})
    assert cfg.spectral.epochs == 7 and cfg.student.widths == [5]
    assert cfg.data.teacher.widths == [20, 10] and cfg.spectral.lr == 0.005
    assert parse_config({"spectral": {"l2_lam": "5e-4"}}).spectral.l2_lam == 5e-4  # YAML 1.1 reads 5e-4 as text
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"spectral": {"lr_": 1.0}})
    assert Config().digest() == Config(device="cuda", name="other").digest()
    assert Config().digest() != Config(trials=4).digest()


def test_run_end_to_end_writes_the_run_folder(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "name": "tiny"}))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "eigenprune", "run", str(cfg), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("config.yaml", "manifest.json", "summary.json", "results.parquet", "curves.parquet", "report.html"):
        assert (out / name).is_file(), name
    for fig in ("importance_histograms", "effective_dimension", "pruning_curves", "losses"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    res = pd.read_parquet(out / "results.parquet")
    assert {"method", "width", "trial", "teacher_widths", "train_loss", "test_loss", "effective_dim"} <= set(res.columns)
    assert len(res) == 2 * 2 * 2 and set(res.width) == {6, 12} and (res.status == "ok").all()
    imp = pd.read_parquet(out / "importance.parquet")  # effective dimension = nodes above 5% of the top score
    keys = ["method", "width", "trial"]
    counted = imp.groupby(keys).normalized.apply(lambda v: int((v > 0.05).sum()))
    assert (res.set_index(keys).effective_dim == counted.reindex(res.set_index(keys).index)).all()
    curves = pd.read_parquet(out / "curves.parquet")
    assert {"method", "width", "trial", "kept", "test_loss", "delta_loss"} <= set(curves.columns)
    assert len(curves[curves.layer == 1]) == 8 * 10  # the second hidden layer (10 wide) has curves too
    curves = curves[curves.layer == 0]
    assert len(curves) == 2 * 2 * (6 + 12)
    full = curves[curves.kept == curves.width].merge(res, on=["method", "width", "trial"])
    assert (full.delta_loss == 0).all()
    assert (full.test_loss_x - full.test_loss_y).abs().max() < 1e-5
    summary = json.loads((out / "summary.json").read_text())
    assert {(g["method"], g["width"]) for g in summary["groups"]} == {(m, w) for m in ("spectral", "direct") for w in (6, 12)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["device"] == "cpu" and manifest["wall_seconds"] > 0 and manifest["torch"]
    assert Config.model_validate(yaml.safe_load((out / "config.yaml").read_text())).trials == 2


def test_plan_lists_the_chunks_with_memory_and_a_timed_estimate_and_writes_nothing(tmp_path, monkeypatch):
    import math

    from eigenprune.experiments.grid import plan_chunks
    from eigenprune.experiments.plan import chunk_memory, plan_run

    cfg = parse_config({**TINY, "workers": 2})
    table, info = plan_run(cfg, measure_steps=6)
    chunks = {c.id: c for c in plan_chunks(cfg)}
    assert set(table.chunk) == set(chunks) and info["workers"] == 2
    for row in table.itertuples():
        c = chunks[row.chunk]
        m = cfg.method(c.method)
        assert row.steps == m.epochs * math.ceil(cfg.data.n_train / m.batch_size) and row.students == len(c.keys())
        assert row.memory_gb == pytest.approx(chunk_memory(cfg, c) / 1e9)
        assert row.step_ms > 0 and row.train_s_estimate == pytest.approx(row.steps * row.step_ms / 1e3)
    assert table.train_s_estimate.max() <= info["train_s_estimate_wall"] <= info["train_s_estimate_sequential"]
    assert info["train_s_estimate_wall"] >= info["train_s_estimate_sequential"] / 2  # 2 workers share the chunks

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["plan", "--set", "trials=2", "--set", "student.widths=[6,12]", "--measure", "6"])
    assert result.exit_code == 0, result.output
    assert "spectral-w6_12" in result.output and "estimated training:" in result.output
    assert list(tmp_path.iterdir()) == []  # nothing written
    bad = runner.invoke(app, ["plan", "--set", "trials=0"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


def test_backprop_autograd_is_a_config_option_that_trains_like_the_hand_written_step(tmp_path):
    from eigenprune.experiments.runner import run_experiment

    with pytest.raises(ConfigError, match="backprop autograd, cuda_graphs true, compile_step false: cuda_graph needs backprop='manual'"):
        parse_config({"backprop": "autograd", "cuda_graphs": True})
    body = {**TINY, "workers": 1, "dtype": "float64"}
    manual = run_experiment(parse_config(body), tmp_path / "manual", quiet=True)
    auto = run_experiment(parse_config({**body, "backprop": "autograd"}), tmp_path / "auto", quiet=True)
    a, b = pd.read_parquet(manual / "results.parquet"), pd.read_parquet(auto / "results.parquet")
    assert np.allclose(a.test_loss, b.test_loss, rtol=1e-9) and (a.effective_dim == b.effective_dim).all()


def test_the_two_compile_options_have_names_that_say_what_they_do_and_old_configs_still_read(tmp_path):
    """`compile` became `compile_step` (the hand-written step under torch.compile) and `backprop: compile` became
    `backprop: autograd_compiled`: a user's config with an old name is read with one warning line; a run folder's
    stored config.yaml from before is read silently, with the same digest (it resumes)."""
    from eigenprune.experiments.config import ConfigDeprecation, safe_load

    with pytest.warns(ConfigDeprecation, match="compile is now called compile_step"):
        assert parse_config({"compile": True}).compile_step is True
    with pytest.warns(ConfigDeprecation, match="backprop: compile is now called backprop: autograd_compiled"):
        assert parse_config({"backprop": "compile"}).backprop == "autograd_compiled"
    with pytest.raises(ConfigError, match="compile is the old name of compile_step; give compile_step alone"):
        parse_config({"compile": True, "compile_step": False})
    with pytest.raises(ConfigError, match="backprop: Input should be 'manual', 'fused', 'autograd' or 'autograd_compiled'"):
        parse_config({"backprop": "compiled"})
    new = Config()
    old_yaml = new.to_yaml().replace("compile_step: false", "compile: false")
    assert "compile: false" in old_yaml and "compile_step" not in old_yaml
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stored config says nothing
        old = Config.model_validate(safe_load(old_yaml))
    assert old == new and old.digest() == new.digest()
    cfg = tmp_path / "old.yaml"
    cfg.write_text("compile: true\nbackprop: manual\n")
    code, err, out = _run(["config", str(cfg)])
    assert code == 0 and err == f"warning: {cfg}: compile is now called compile_step (the old name is read for now)\n"
    assert "compile_step: true" in out and "\ncompile:" not in out


def test_widths_are_padded_together_only_in_small_steps():
    """pack factor 1.5 as before, and no padding once a step holds more than PAD_LIMIT activations."""
    from eigenprune.experiments.grid import plan_chunks

    quick = [c.id for c in plan_chunks(parse_config({}))]
    assert quick == ["spectral-w20_60", "spectral-w200", "direct-w20_60", "direct-w200"]
    body = {"trials": 30, "student": {"widths": [10, 20, 200, 500, 800, 1000]}, "spectral": {"batch_size": 300}}
    ids = [c.id for c in plan_chunks(parse_config(body)) if c.method == "spectral"]
    # 2 x 30 x 300 x 20 activations: padded; 2 x 30 x 300 x 500 > 2^22: apart, although 1000 <= 1.5 x 700
    assert ids == ["spectral-w10_20", "spectral-w200", "spectral-w500", "spectral-w800", "spectral-w1000"]
    assert [c.id for c in plan_chunks(parse_config(body), pad_limit=float("inf")) if c.method == "spectral"] == [
        "spectral-w10_20", "spectral-w200_500", "spectral-w800_1000"]


def test_narrow_widths_share_a_chunk_when_their_padding_costs_less_than_a_step():
    """cpu-paper: 3 trials x batch 100 = 300 rows a width. Joining 20, 40 and 60 adds at most 3 x 20 x 300 activations
    (the group's size x the width's excess x rows), under STEP_OVERHEAD, although 4 x 60 > 1.5 x 130; 200 would add 4 x 140 x 300."""
    from eigenprune.experiments.grid import STEP_OVERHEAD, plan_chunks

    body = {"trials": 3, "student": {"widths": [10, 20, 40, 60, 200, 500, 1000]}, "spectral": {"batch_size": 100}}
    ids = [c.id for c in plan_chunks(parse_config(body)) if c.method == "spectral"]
    assert ids == ["spectral-w10_20_40_60", "spectral-w200_500", "spectral-w1000"]
    assert 3 * 20 * 300 <= STEP_OVERHEAD < 4 * 140 * 300
    apart = [c.id for c in plan_chunks(parse_config(body), overhead=0) if c.method == "spectral"]
    assert apart == ["spectral-w10_20", "spectral-w40_60", "spectral-w200_500", "spectral-w1000"]  # the pack factor alone


def test_the_command_exits_quickly_with_its_status_after_its_exit_handlers_and_output(tmp_path):
    """`eigenprune` (cli.main) leaves with os._exit once the command is done: the exit status is the command's,
    stdout and stderr are complete, and exit handlers (atexit, weakref.finalize's temporary folders) have run."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import atexit, sys, tempfile, weakref\n"
        "from pathlib import Path\n"
        "import eigenprune.cli as cli\n"
        "work = sys.argv[1]\n"
        "tmp = tempfile.TemporaryDirectory(dir=work)\n"  # cleaned up by weakref.finalize's exit handler
        "atexit.register(lambda: Path(work, 'handler-ran').write_text('yes') and sys.stdout.write('bye'))\n"
        "sys.stdout.write('x' * 100000)\n"  # buffered output, the handler's last of all, must reach the pipe
        "sys.argv = ['eigenprune', *sys.argv[2:]]\n"
        "cli.main()\n"
        "raise AssertionError('main returned')\n")
    for args, status in ((["--version"], 0), (["run", "--set", "trials=0"], 2), (["prune"], 2)):
        work = tmp_path / f"w{status}{len(args)}"
        work.mkdir()
        done = subprocess.run([sys.executable, str(script), str(work), *args], capture_output=True, text=True)
        assert done.returncode == status, done.stderr
        assert done.stdout.startswith("x" * 100000) and done.stdout.endswith("bye") and "main returned" not in done.stderr
        assert (work / "handler-ran").read_text() == "yes" and [p.name for p in work.iterdir()] == ["handler-ran"]
    bad = subprocess.run([sys.executable, "-m", "eigenprune", "run", "--set", "trials=0"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and list(tmp_path.glob("runs")) == []


def test_the_command_exits_with_an_idle_thread_pool_left_behind(tmp_path):
    """torch.compile keeps an idle ThreadPoolExecutor; cli.main must stop it as the interpreter would, not wait on it."""
    script = tmp_path / "pool.py"
    script.write_text("import sys\nfrom concurrent.futures import ThreadPoolExecutor\nimport eigenprune.cli as cli\n"
                      "pool = ThreadPoolExecutor(2)\npool.submit(int).result()\n"
                      "sys.argv = ['eigenprune', '--version']\ncli.main()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("eigenprune "), done.stderr
