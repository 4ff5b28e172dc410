"""The configs ship inside the package and are given by name (`eigenprune run paper`), from a checkout or a wheel."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml
from typer.testing import CliRunner

from eigenprune.cli import app
from eigenprune.experiments.config import SHIPPED_CONFIGS, config_description, load_config, shipped_configs

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
NAMES = ["cpu-deep", "cpu-hard100", "cpu-paper", "cpu-regpath", "deep", "digits", "hard100", "hidden_manifold", "linear",
         "paper", "regpath"]


def test_the_shipped_configs_live_in_the_package_only():
    assert list(shipped_configs()) == NAMES
    assert SHIPPED_CONFIGS == ROOT / "src" / "eigenprune" / "configs"
    assert not (ROOT / "configs").exists()  # one copy of each file in the repository
    assert (SHIPPED_CONFIGS / "recovery" / "cpu-recovery.yaml").is_file()  # eigenprune recovery's, not a run config


def test_config_list_names_every_shipped_config_with_its_description():
    result = runner.invoke(app, ["config", "--list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == NAMES
    paper = next(line for line in lines if line.startswith("paper "))
    assert paper.split(None, 1)[1] == config_description(SHIPPED_CONFIGS / "paper.yaml")
    assert "30 trials" in paper and all(len(line.split(None, 1)[1]) > 20 for line in lines)
    both = runner.invoke(app, ["config", "--list", "paper"])
    assert both.exit_code == 2 and both.stderr.startswith("error: --list takes no CONFIG")


def test_a_name_works_in_config_plan_and_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    shown = runner.invoke(app, ["config", "paper"])
    assert shown.exit_code == 0, shown.output
    assert yaml.safe_load(shown.stdout) == load_config(SHIPPED_CONFIGS / "paper.yaml").model_dump()
    planned = runner.invoke(app, ["plan", "cpu-paper", "--measure", "0"])
    assert planned.exit_code == 0, planned.output
    assert "spectral-w200_500" in planned.stdout and "cost model" in planned.stdout
    seen = {}

    def fake_run(cfg, out, **kwargs):
        seen["cfg"], seen["out"] = cfg, out
        return tmp_path / "run"

    monkeypatch.setattr("eigenprune.experiments.runner.run_experiment", fake_run)
    ran = runner.invoke(app, ["run", "paper", "--set", "trials=2"])
    assert ran.exit_code == 0, ran.output
    assert (seen["cfg"].name, seen["cfg"].trials, seen["cfg"].student.widths[-1]) == ("paper", 2, 1500)
    assert seen["out"] == Path("runs") / "paper"
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_wins_over_a_name_and_a_folder_does_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "paper").mkdir()  # a folder of the same name (the user's paper, say) is not a config
    assert yaml.safe_load(runner.invoke(app, ["config", "paper"]).stdout)["trials"] == 30
    shutil.rmtree(tmp_path / "paper")
    (tmp_path / "paper").write_text("trials: 2\n")
    mine = runner.invoke(app, ["config", "paper"])
    assert mine.exit_code == 0 and yaml.safe_load(mine.stdout)["trials"] == 2


def test_an_unknown_name_is_one_line_listing_the_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (["config", "papr"], ["run", "papr"], ["plan", "papr"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and result.stdout == ""
        assert result.stderr.startswith("error: unknown config 'papr': neither a file nor a shipped config (cpu-deep, ")
        assert all(name in result.stderr for name in NAMES) and "eigenprune config --list" in result.stderr
    old = runner.invoke(app, ["run", "configs/paper.yaml"])  # the path from before the configs moved
    assert old.exit_code == 2 and old.stderr == ("error: config file not found: configs/paper.yaml; the shipped configs "
                                                 "install with eigenprune and are given by name: paper\n")
    other = runner.invoke(app, ["run", "mine/exp.yaml"])
    assert other.exit_code == 2 and other.stderr == "error: config file not found: mine/exp.yaml\n"
    assert list(tmp_path.iterdir()) == []


def test_the_configs_come_by_name_from_an_installed_wheel(tmp_path):
    """A wheel built from this checkout, installed into a fresh virtual environment (the system's packages
    visible, eigenprune itself only from the wheel), run from a folder with no configs/: about 20-40 s."""
    src = tmp_path / "src"  # build from a copy: nothing (build/, *.egg-info) is written into the checkout
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PIP_NO_INDEX="1")
    pip = [sys.executable, "-m", "pip", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    wheel = next((tmp_path / "dist").glob("eigenprune-*.whl"))
    packed = set(zipfile.ZipFile(wheel).namelist())
    assert {f"eigenprune/configs/{n}.yaml" for n in NAMES} | {"eigenprune/configs/recovery/cpu-recovery.yaml"} <= packed
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-build-isolation", str(wheel)],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import eigenprune; print(eigenprune.__file__)"], env=env, cwd=elsewhere,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where  # the wheel's copy, not the checkout's or an editable install's
    listed = subprocess.run([str(venv / "bin" / "eigenprune"), "config", "--list"], env=env, cwd=elsewhere,
                            capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == NAMES
    shown = subprocess.run([str(venv / "bin" / "eigenprune"), "config", "paper"], env=env, cwd=elsewhere,
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout) == load_config(SHIPPED_CONFIGS / "paper.yaml").model_dump()
    assert list(elsewhere.iterdir()) == []
