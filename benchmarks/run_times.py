"""A run folder's measured chunk times against the plan's cost model (issue #25: the real time of a long run).

    python benchmarks/run_times.py runs/paper              # the finished chunks so far (a run may still be going)
    python benchmarks/run_times.py runs/paper --json t.json

Reads only: the run's stored config, each committed chunk's timing.json (its seconds, as the run recorded them) and
the folder's modification time (when it was committed). For every chunk the cost model's minutes are those of
`eigenprune plan` (`plan_run`'s `model_min`, "a 2-core CPU's" minutes; the same chunks, split by the same time bound),
so the table says how far each chunk ran from the model and what is left. A chunk's seconds include the evaluation
after its training; wall time of the whole run (with its resumes) is not here: the run's log has it.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

from eigenprune.experiments.plan import plan_run
from eigenprune.experiments.store import RunFolder, RunFolderError


def chunk_times(run: Path) -> dict:
    folder = RunFolder(run)
    try:
        plan, _ = plan_run(folder.read_config())
        seconds = folder.chunk_seconds(list(plan.chunk))["chunk_seconds"]  # the run's own reader of timing.json
        committed = {c: folder.entry(f"chunks/{c}").stat().st_mtime for c in seconds}
    except RunFolderError as err:
        raise SystemExit(str(err)) from None
    rows, left = [], []
    for r in plan.to_dict("records"):
        c = r["chunk"]
        if c not in seconds:
            left.append({"chunk": c, "model_min": r["model_min"]})
            continue
        done = datetime.fromtimestamp(committed[c], timezone.utc).isoformat(timespec="seconds")
        rows.append({"chunk": c, "model_min": r["model_min"], "seconds": seconds[c], "ratio": seconds[c] / (60 * r["model_min"]),
                     "committed": done})
    rows.sort(key=lambda r: r["committed"])
    return {"run": str(run), "done": rows, "left": left, "model_min_done": sum(r["model_min"] for r in rows),
            "model_min_left": sum(r["model_min"] for r in left), "chunk_seconds_done": sum(r["seconds"] for r in rows)}


def markdown(t: dict) -> str:
    lines = ["| chunk | committed (UTC) | model_min | seconds | seconds per model-second |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['chunk']} | {r['committed'][11:19]} | {r['model_min']:.1f} | {r['seconds']:,.0f} | {r['ratio']:.1f} |"
              for r in t["done"]]
    lines.append(f"\n{len(t['done'])} chunks committed: {t['model_min_done']:.1f} cost-model minutes, "
                 f"{t['chunk_seconds_done']:,.0f} s of chunk time; {len(t['left'])} left: {t['model_min_left']:.1f} "
                 "cost-model minutes")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder of `eigenprune run`")
    parser.add_argument("--json", type=Path, default=None, help="also write the table to this new file")
    args = parser.parse_args(argv)
    if not args.run.is_dir():
        parser.error(f"run folder not found: {args.run}")
    if args.json and (args.json.exists() or args.json.is_symlink()):
        parser.error(f"--json {args.json} exists; give a new path (this script does not replace files)")
    t = chunk_times(args.run)
    print(markdown(t))
    if args.json:
        with open(args.json, "x") as fh:  # exclusive create: never replaces a file or writes through a link
            fh.write(json.dumps(t, indent=1))
    return t


if __name__ == "__main__":
    main()
