"""The recovery diagram: does the spectral student find the teacher? (see eigenprune.experiments.recovery)

    python scripts/recovery.py CONFIG.yaml --out DIR     # train everything, write tables and figures
    python scripts/recovery.py --report DIR              # (re)draw the figures from DIR's tables

DIR must be new or empty. Tables: students, curves, capacity, signals, teachers (raw), summary,
explain, collapse, mean_curves, capacity_curve (parquet; summary/explain/collapse also in
tables.json), config.yaml, manifest.json; figures/*.png. Exits 1 (after writing the tables) if any
network diverged, 2 on a bad config or output folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from eigenprune.experiments.config import ConfigError
from eigenprune.experiments.recovery import analyse, load_recovery_config, prepare_out, run_recovery, write_folder
from eigenprune.experiments.store import OwnedFolder, RunFolderError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report", type=Path, help="only draw the figures of a finished DIR")
    args = ap.parse_args()
    from eigenprune.reporting.recovery import write_figures

    if args.report is not None:
        if not (args.report / "summary.parquet").is_file():
            print(f"error: {args.report} holds no recovery tables (summary.parquet); give a finished --out folder", file=sys.stderr)
            return 2
        try:
            folder = OwnedFolder(args.report, "recovery")
            folder.open()
        except RunFolderError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        write_figures(folder)
        return 0
    if args.config is None or args.out is None:
        print("error: give CONFIG and --out DIR (or --report DIR)", file=sys.stderr)
        return 2
    try:
        cfg = load_recovery_config(args.config)
        out = prepare_out(args.out)
    except (ConfigError, RunFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    tables = run_recovery(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    derived = analyse(tables, cfg)
    write_folder(out, cfg, tables, derived, time.perf_counter() - start)
    failed = int((tables["students"].status != "ok").sum()) + int(tables["capacity"].test_loss.isna().sum())
    write_figures(out)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(derived["collapse"].to_string(index=False))
    if failed:
        print(f"error: {failed} networks diverged (NaN/inf loss); they are left out of the tables' summaries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
