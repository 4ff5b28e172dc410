"""The three examples run end to end in their tiny form and print their table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", ["cnn_digits.py", "resmlp_table.py", "transformer_digits.py"])
def test_example_runs_in_tiny_form(script):
    pytest.importorskip("sklearn")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--tiny"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| training | criterion | full acc | channels kept")
    rows = lines[1:]  # the separator row starts with "|---"
    assert [r.split(" | ")[:2] for r in rows] == [["| spectral", "eigenprune"], ["| direct", "eigenprune"], ["| direct", "tp-magnitude-l2"]]
    for row in rows:
        kept, total = row.split(" | ")[3].split("/")
        assert 0 < int(kept) < int(total)  # it pruned
