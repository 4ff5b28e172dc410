"""Bad input, round 3 (issue #22: configs, data and the command line): every case through the real CLI.

The pattern of round 2 (tests/test_bad_input_cases.py, whose helpers this file imports): each case runs
`eigenprune ...` in-process in a fresh folder holding only its input files and asserts exit code 2, stderr
exactly one line starting `error:`, nothing on stdout, every input byte-identical with nothing added or
removed, and here also an answer within `SECONDS` (only to catch hangs: each answers in about a second).
`python tests/test_bad_input_round3_cli.py` prints the table of docs/reliability.md ("Bad input, round 3").
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from eigenprune.experiments.config import load_config, parse_config  # noqa: E402
from eigenprune.experiments.plan import plan_run  # noqa: E402
from test_bad_input_cases import STORED, Case, _check, case_messages, csv_config, invoke, stored  # noqa: E402, F401 (stored: a fixture)

SECONDS = 20
"""A generous bound on each case's answer, there only to catch a hang (before: minutes or never)."""

T = ["--set", "trials=1", "--set", "student.widths=[20]", "--set", "spectral.epochs=2", "--set", "direct.epochs=2",
     "--set", "data.n_train=300", "--set", "data.n_test=100"]
RUN_CSV = ["run", "c.yaml", "--out", "out", "--quiet"]
LONG_NAME = "a" * 256
LONG_PATH = "/".join(["b" * 200] * 22)  # 4,421 characters
_HELD: list[int] = []  # lock file descriptors a case holds while it runs (closed after it)


def _close_held() -> None:
    while _HELD:
        os.close(_HELD.pop())


def identical_rows(n: int = 40) -> str:
    return "a,b,y\n" + "1.0,2.0,3.0\n" * n


def table(columns: int, n: int = 12) -> str:
    """A CSV with `columns` feature columns c0.. and a target y, `n` rows of varying numbers."""
    head = ",".join(f"c{j}" for j in range(columns)) + ",y\n"
    return head + "".join(",".join(f"{(i * 7 + j * 3) % 11 / 3:.3f}" for j in range(columns + 1)) + "\n" for i in range(n))


def alias_bomb() -> str:
    """9 levels of 9 aliases (9^9 strings) under unknown keys, then a valid field."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\ntrials: 1\n"


def fifo(name: str):
    return lambda d: os.mkfifo(d / name)


def symlink(name: str, target: str):
    return lambda d: os.symlink(target, d / name)


def empty_folders(*names: str):
    def setup(d: Path) -> None:
        for name in names:
            (d / name).mkdir()
    return setup


def held_lock(d: Path) -> None:
    """The stored run, without its merged results, locked as a running `eigenprune run` holds it."""
    (d / "run" / "results.parquet").unlink()
    fd = os.open(d / "run" / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _HELD.append(fd)


CASES = [
    # 1. data that trained to nonsense with status ok
    Case("csv-identical-rows", RUN_CSV, "column 'a' holds the same value (1) in every row",
         {"d.csv": identical_rows(), "c.yaml": csv_config()}, show="CSV of 40 identical rows `1.0,2.0,3.0` (before: ok, test MSE 8.9)"),
    Case("csv-constant-feature", RUN_CSV, "column 'b' holds the same value (7)",
         {"d.csv": "a,b,y\n" + "".join(f"{i},7,{i % 3}\n" for i in range(40)), "c.yaml": csv_config()},
         show="CSV feature column `b` always 7"),
    Case("csv-constant-target", RUN_CSV, "column 'y' holds the same value (5) in every row; there is nothing to learn",
         {"d.csv": "a,b,y\n" + "".join(f"{i},{i % 7},5\n" for i in range(40)), "c.yaml": csv_config()},
         show="regression target always 5"),
    Case("csv-target-1e18", RUN_CSV, "cannot fit values beyond ±1e+06: standardize the target first",
         {"d.csv": "a,b,y\n" + "".join(f"{i},{i % 7},{(1 + i % 5) * 1e18:g}\n" for i in range(40)), "c.yaml": csv_config()},
         show="regression targets around 1e18 (before: ok, test MSE 4e36)"),
    # 2. hangs
    Case("yaml-alias-bomb-config", ["config", "c.yaml"], "more than 100,000 values once its",
         {"c.yaml": alias_bomb()}, show="`eigenprune config` of a YAML alias bomb (9 levels of 9, under unknown keys; before: no answer)"),
    Case("yaml-alias-bomb-run", ["run", "c.yaml", "--out", "out", "--quiet"], "(an alias bomb?)",
         {"c.yaml": alias_bomb()}, show="`eigenprune run` of the same file (before: no answer)"),
    Case("csv-100000-columns", RUN_CSV, "has 100,001 columns, more than the 10,000 eigenprune reads",
         {"d.csv": table(100_000), "c.yaml": csv_config()}, show="CSV of 100,000 columns x 12 rows (before: no answer after 300 s)"),
    Case("plan-10000-widths", ["plan", "--measure", "0", "--set", "student.widths=[" + ",".join(map(str, range(1, 10_001))) + "]"],
         "student.widths: List should have at most 1000 items", show="`plan` with 10,000 widths (before: 5.6 s)"),
    Case("plan-path-10000-widths", ["plan", "--measure", "0", "--set", "regularization.mode=path",
                                    "--set", "student.widths=[" + ",".join(map(str, range(1, 10_001))) + "]"],
         "student.widths: List should have at most 1000 items", show="`plan` of a regularization path with 10,000 widths (before: 26.7 s)"),
    Case("plan-5000-chunks", ["plan", "c.yaml", "--measure", "0"], "more than the 5,000 eigenprune plans",
         {"c.yaml": yaml.safe_dump({"teachers": [{"widths": [i]} for i in range(1, 101)], "student": {"widths": list(range(1, 1001))}})},
         show="100 teachers x 1,000 widths (7,800 chunks)"),
    Case("csv-header-field-too-large", RUN_CSV, "field larger than field limit (131072)",
         {"d.csv": "a," + "b" * 200_000 + ",y\n1,2,3\n4,5,6\n", "c.yaml": csv_config()}, show="a CSV header name of 200,000 characters"),
    # 3. tracebacks: names too long, deep nesting
    Case("run-out-long-name", ["run", *T, "--out", LONG_NAME, "--quiet"], "is 256 bytes long, more than the 255",
         show="`run --out` with a 256-character name"),
    Case("run-out-long-path", ["run", *T, "--out", LONG_PATH, "--quiet"], "more than the 4,095 the system allows",
         show="`run --out` with a path of 4,421 characters"),
    Case("compare-out-long-name", ["compare", "--out", LONG_NAME, "--quiet"], "is 256 bytes long, more than the 255",
         show="`compare --out` with a 256-character name"),
    Case("compare-out-long-path", ["compare", "--out", LONG_PATH, "--quiet"], "more than the 4,095 the system allows",
         show="`compare --out` with a path of 4,421 characters"),
    Case("collapse-out-long-name", ["collapse", "r1", "r2", "--out", LONG_NAME], "is 256 bytes long, more than the 255",
         show="`collapse --out` with a 256-character name"),
    Case("collapse-out-long-path", ["collapse", "r1", "r2", "--out", LONG_PATH], "more than the 4,095 the system allows",
         show="`collapse --out` with a path of 4,421 characters"),
    Case("prune-out-long-name", ["prune", "run/chunks/spectral-w6_12/students/spectral-N12-t0.safetensors", "--keep", "3",
                                 "--out", LONG_NAME + ".safetensors"], "is 268 bytes long, more than the 255", run=True,
         show="`prune --out` with a file name of 268 characters"),
    Case("run-name-10000", ["run", *T, "--set", "name=" + "n" * 10_000, "--quiet"], "name: String should have at most 100 characters",
         show="`run --set name=` of 10,000 characters"),
    Case("compare-name-10000", ["compare", "--set", "name=" + "n" * 10_000, "--quiet"], "name: String should have at most 100 characters",
         show="`compare --set name=` of 10,000 characters"),
    Case("yaml-5000-deep-list", ["config", "c.yaml"], "nested more than 32 deep", {"c.yaml": "x: " + "[" * 5000 + "]" * 5000 + "\n"},
         show="a 5,000-deep list in a config (before: RecursionError)"),
    Case("yaml-3000-deep-mapping", ["run", "c.yaml", "--quiet"], "nested more than 32 deep",
         {"c.yaml": "x: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n"}, show="a 3,000-deep mapping in a config (before: RecursionError)"),
    Case("set-3000-deep-widths", ["plan", "--set", "student.widths=" + "[" * 3000 + "]" * 3000],
         "--set student.widths=...: YAML with lists and mappings nested more than 32 deep",
         show="`--set student.widths=` a 3,000-deep list (before: RecursionError)"),
    # 4. messages that pointed the wrong way
    Case("report-while-running", ["report", "run"], "is in use by a running eigenprune", run=True, setup=(held_lock,),
         show="`report` of a folder a run is writing (holds `.lock`; before: \"incomplete … rerun eigenprune run\")"),
    Case("collapse-empty-folders", ["collapse", "e1", "e2"], "e1 is not a run folder made by eigenprune (it has no .eigenprune.json)",
         setup=(empty_folders("e1", "e2"),), show="`collapse` of two empty folders (before: \"incomplete … rerun\")"),
    Case("run-out-dangling-symlink", ["run", *T, "--out", "out", "--quiet"], "is a symlink to /nonexistent/x, which does not exist",
         setup=(symlink("out", "/nonexistent/x"),), show="a dangling symlink as `run --out` (before: \"File exists\")"),
    Case("prune-out-dangling-symlink", ["prune", "run/chunks/spectral-w6_12/students/spectral-N12-t0.safetensors", "--keep", "3",
                                        "--out", "p.safetensors"], "will not write through a symlink", run=True,
         setup=(symlink("p.safetensors", "/nonexistent/p.safetensors"),), show="a dangling symlink as `prune --out`"),
    Case("csv-dev-zero", RUN_CSV, "is not a regular file (a symlink to /dev/zero, a character device)", {"c.yaml": csv_config()},
         setup=(symlink("d.csv", "/dev/zero"),), show="CSV path a symlink to /dev/zero (before: \"file not found\")"),
    Case("csv-fifo", RUN_CSV, "is not a regular file (a FIFO (named pipe))", {"c.yaml": csv_config()}, setup=(fifo("d.csv"),),
         show="CSV path a FIFO (before: \"file not found\")"),
    Case("csv-dangling-symlink", RUN_CSV, "d.csv is a symlink to /nonexistent/d.csv, which does not exist", {"c.yaml": csv_config()},
         setup=(symlink("d.csv", "/nonexistent/d.csv"),), show="CSV path a dangling symlink"),
    Case("config-fifo", ["config", "c.yaml"], "config path c.yaml is not a regular file (a FIFO (named pipe))", setup=(fifo("c.yaml"),),
         show="`eigenprune config` of a FIFO (before: \"is not a file\")"),
    Case("prune-data-fifo", ["prune", "run/chunks/spectral-w6_12/students/spectral-N12-t0.safetensors", "--data", "v.safetensors",
                             "--out", "p.safetensors"], "--data v.safetensors: not a regular file (a FIFO", run=True,
         setup=(fifo("v.safetensors"),), show="`prune --data` a FIFO (before: \"not a run folder (no config.yaml in it)\")"),
    Case("prune-checkpoint-dev-zero", ["prune", "m.safetensors", "--keep", "3", "--out", "p.safetensors"],
         "checkpoint path m.safetensors is not a regular file (a symlink to /dev/zero", setup=(symlink("m.safetensors", "/dev/zero"),),
         show="`prune` of a checkpoint that is a symlink to /dev/zero"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_round3_bad_input_is_one_line_exit_2_within_seconds(case, request, tmp_path, monkeypatch):
    run = request.getfixturevalue("stored") if case.run else None
    start = time.perf_counter()
    try:
        _check(case, tmp_path, run, monkeypatch)
    finally:
        _close_held()
    assert time.perf_counter() - start < SECONDS


def test_the_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


# --- what now works, fast -----------------------------------------------------------------------------

def test_the_planner_answers_a_large_grid_in_well_under_a_second():
    """1,000 widths (the most), on a regularization path of 8 strengths: about 800 chunks, many split by
    memory; before, 10,000 widths took 26.7 s. A million trials are refused at once (before: 8.8 s)."""
    widths = list(range(1, 1001))
    for over in ({"student.widths": widths}, {"student.widths": widths, "regularization.mode": "path"}):
        cfg = load_config(None, over)
        start = time.perf_counter()
        table, _ = plan_run(cfg)
        assert time.perf_counter() - start < 1.0 and len(table) > 70 and table.students.min() >= 1
    cfg = load_config(None, {"trials": 1_000_000})
    start = time.perf_counter()
    with pytest.raises(ValueError, match="6000000 students into [0-9,]+ chunks, more than the 5,000"):
        plan_run(cfg)
    assert time.perf_counter() - start < 0.5


def test_a_csv_of_9999_feature_columns_is_planned_in_seconds(tmp_path, monkeypatch):
    (tmp_path / "d.csv").write_text(table(9_999))
    (tmp_path / "c.yaml").write_text(csv_config(spectral={"batch_size": 5}, direct={"batch_size": 5}))
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    result = invoke(["plan", "c.yaml", "--measure", "0"])
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - start < SECONDS and "spectral-w4" in result.stdout


def test_yaml_anchors_within_the_bound_still_work():
    from eigenprune.experiments.config import safe_load

    cfg = parse_config(safe_load("spectral: &m {epochs: 7, batch_size: 20}\ndirect: *m\nstudent: {widths: &w [4, 8], rest: *w}\n"))
    assert cfg.direct.epochs == 7 and cfg.direct.batch_size == 20 and cfg.student.rest == [4, 8]
    deep = "x: " + "[" * 31 + "]" * 31  # at the bound (the mapping and 31 lists): parsed
    assert safe_load(deep)["x"] is not None


# --- a run whose folder goes away or becomes read-only after the first chunk ---------------------------

def _tiny_run(tmp_path, monkeypatch, second_commit):
    """`eigenprune run` of two chunks in this process; `second_commit(folder)` happens before the second commit."""
    from eigenprune.experiments.store import RunFolder

    original, calls = RunFolder.commit_chunk, []

    def commit(self, result):
        calls.append(result.chunk_id)
        if len(calls) == 2:
            second_commit(self)
        return original(self, result)

    monkeypatch.setattr(RunFolder, "commit_chunk", commit)
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    result = invoke(["run", *T, "--set", "workers=1", "--out", "parent/run", "--quiet"])
    assert time.perf_counter() - start < 60
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and result.stdout == "", result.output
    return calls, result.stderr


def test_run_folder_removed_after_the_first_chunk_is_one_line(tmp_path, monkeypatch):
    calls, err = _tiny_run(tmp_path, monkeypatch, lambda folder: shutil.rmtree(folder.path.parent))
    assert len(calls) == 2 and f"cannot commit chunk {calls[1]}: the run folder parent/run is gone" in err, err
    assert not (tmp_path / "parent").exists()


def test_run_folder_read_only_after_the_first_chunk_keeps_the_first(tmp_path, monkeypatch):
    import eigenprune.experiments.store as store

    def read_only(folder):
        def refuse(parent, name, directory=False):
            raise PermissionError(13, "Permission denied", str(parent))
        monkeypatch.setattr(store, "temp_path", refuse)

    calls, err = _tiny_run(tmp_path, monkeypatch, read_only)
    assert f"cannot commit chunk {calls[1]} to parent/run: Permission denied" in err and "rerun the same command to resume" in err, err
    chunks = tmp_path / "parent" / "run" / "chunks"
    assert sorted(p.name for p in chunks.iterdir()) == [calls[0]]  # the first chunk, whole; no temporaries
    assert (chunks / calls[0] / "results.parquet").is_file()
    assert not (tmp_path / "parent" / "run" / "results.parquet").exists()


# --- the docs table -------------------------------------------------------------------------------------

def _table() -> str:
    """Markdown rows (case | message) of every case, as the program answers now."""
    rows = case_messages(CASES, _check, _close_held)
    return "\n".join(f"| {case.show.replace('|', chr(92) + '|')} | `{message}` |" for case, message in rows)


if __name__ == "__main__":
    print(_table())
