"""Whole `eigenprune run`s of an earlier commit and of this checkout, alternated, so both see the same machine.

    python benchmarks/alternate.py --before 41789cb                        # the quick run, 3 rounds
    python benchmarks/alternate.py --before 41789cb --config src/eigenprune/configs/cpu-paper.yaml --rounds 2

A VM's speed can drift by 30% within the hour, so a before/after comparison is only fair when the two
runs take turns. `--before` is checked out into a temporary git worktree (removed at the end) and run
with its own sources on PYTHONPATH; "after" is this checkout's sources. Each run writes into its own
temporary folder. Prints one row per run (wall seconds of the whole command, the run's own
`wall_seconds` and its chunks' training seconds from manifest.json) and writes them as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(src: Path, config: str | None, folder: Path) -> dict:
    """One `python -m eigenprune run` with the sources in `src`; raises if it fails."""
    env = {**os.environ, "PYTHONPATH": str(src), "MPLCONFIGDIR": str(folder / "mpl")}
    cmd = [sys.executable, "-m", "eigenprune", "run", *([config] if config else []), "--quiet", "--out", str(folder / "run")]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=folder, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    manifest = json.loads((folder / "run" / "manifest.json").read_text())
    split = "chunk_seconds" in manifest  # before the two were kept apart, "chunk_train_seconds" was the whole chunk
    return {"wall_s": round(wall, 2), "run_wall_seconds": manifest["wall_seconds"],
            "chunk_seconds": manifest["chunk_seconds"] if split else manifest["chunk_train_seconds"],
            "chunk_train_seconds": manifest["chunk_train_seconds"] if split else {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git commit (or any ref) to compare this checkout against")
    ap.add_argument("--config", default=None, help="config file (default: the embedded quick config)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    config = str(Path(args.config).resolve()) if args.config else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="eigenprune-alternate-") as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before], check=True, capture_output=True)
        try:
            for r in range(args.rounds):
                for label, src in (("before", tree / "src"), ("after", ROOT / "src")):
                    folder = Path(tmp) / f"{label}-{r}"
                    folder.mkdir()
                    row = {"round": r + 1, "version": label, **one_run(src, config, folder)}
                    rows.append(row)
                    print(f"round {row['round']}  {label:6s}  {row['wall_s']:7.2f} s wall  ({row['run_wall_seconds']:.2f} s in the run; "
                          f"chunks {row['chunk_seconds']}, of which training {row['chunk_train_seconds']})", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True, capture_output=True)
    for label in ("before", "after"):
        walls = [r["wall_s"] for r in rows if r["version"] == label]
        print(f"{label:6s}  {', '.join(f'{w:.1f}' for w in walls)} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"before": args.before, "config": args.config or "quick", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
