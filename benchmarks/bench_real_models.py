"""Spectral training + eigenprune's criterion against direct training + Torch-Pruning's criteria, on three real models.

    nice -n 10 python benchmarks/bench_real_models.py [--seeds 1] [--tiny] [--out benchmarks/results/real_models.json]

Models (from examples/): a residual CNN on scikit-learn's 8x8 digits, a residual MLP on a CSV table
(make_classification, 4 classes), a 2-layer transformer encoder on the digits (rows as tokens). Each is
trained twice from the same initialisation: spectral (lam_out trains) and direct (lam_out frozen at 1),
both with the same L2 penalty. Pairs compared: spectral + eigenprune (EigenImportance), and on the direct
model eigenprune, Torch-Pruning 1.6's MagnitudeImportance p=1 and p=2 and TaylorImportance (its defaults).

Every criterion keeps the same fraction f of each prunable channel group (Torch-Pruning's local pruning;
the same groups for all). Reported per pair: the fewest channels kept, over the grid of f, such that the
test accuracy at this f and at every larger f is at most 1 point below the unpruned model's, without
fine-tuning and with a short fine-tuning (FINETUNE_EPOCHS of Adam at FINETUNE_LR) after pruning; parameter
counts; CPU latency (one thread, median of 30) at batch 1 and 256 of the unpruned model and of the model
pruned at the with-fine-tuning f. The table gives means over seeds, with each seed's count in brackets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import cnn_digits  # noqa: E402
import resmlp_table  # noqa: E402
import transformer_digits  # noqa: E402
from _common import accuracy, build, count_parameters, latency_ms, prune, score, table, train  # noqa: E402

GRID = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.01]
"""Kept fractions, scanned from the largest down."""
FINETUNE_EPOCHS = 2
FINETUNE_LR = 1e-3
PAIRS = [("spectral", "eigenprune"), ("direct", "eigenprune"), ("direct", "tp-magnitude-l1"), ("direct", "tp-magnitude-l2"),
         ("direct", "tp-taylor")]


def _models(tiny: bool, folder: Path) -> dict:
    limit = 300 if tiny else None
    return {
        "cnn-digits": (cnn_digits.DigitsCNN, cnn_digits.load(limit=limit), 2 if tiny else 25),
        "resmlp-csv": (resmlp_table.ResidualMLP, resmlp_table.load(resmlp_table.write_csv(folder, 400 if tiny else 4000)),
                       2 if tiny else 30),
        "transformer-digits": (transformer_digits.RowTransformer, transformer_digits.load(limit=limit), 2 if tiny else 30),
    }


def _smallest(model, criterion, data, full, finetune: int, seed: int) -> dict:
    """Scan GRID downwards; the last f whose accuracy (after `finetune` epochs) is within 1 point, and what it keeps."""
    x_train, y_train, x_test, y_test = data
    scored = score(model, criterion, x_train, y_train)
    best = None
    for f in GRID:
        pruned, kept, width = prune(model, scored, f, x_train, y_train)
        if finetune and kept < width:  # f = 1 is the unpruned model: nothing to fine-tune
            train(pruned, x_train, y_train, finetune, lr=FINETUNE_LR, seed=seed + 1)
        acc = accuracy(pruned, x_test, y_test)
        if acc < full - 1.0:
            break
        best = {"fraction": f, "kept": kept, "width": width, "accuracy": acc, "params": count_parameters(pruned), "model": pruned}
    return best


def run(tiny: bool, seeds: int) -> dict:
    import tempfile

    torch.set_num_threads(1)  # small layers: threads cost more than they give
    results = []
    with tempfile.TemporaryDirectory() as folder:
        models = _models(tiny, Path(folder))
    for name, (builder, data, epochs) in models.items():
        x_train, y_train, x_test, y_test = data
        for seed in range(seeds):
            trained = {t: train(build(builder, t, seed), x_train, y_train, epochs, seed=seed) for t in ("spectral", "direct")}
            for training, criterion in PAIRS:
                start = time.perf_counter()
                model = trained[training]
                full = accuracy(model, x_test, y_test)
                no_ft = _smallest(model, criterion, data, full, 0, seed)
                ft = _smallest(model, criterion, data, full, FINETUNE_EPOCHS, seed)
                row = {"model": name, "seed": seed, "training": training, "criterion": criterion, "full_accuracy": full,
                       "width": no_ft["width"] if no_ft else None, "params_full": count_parameters(model)}
                for tag, found in (("no_ft", no_ft), ("ft", ft)):
                    row[f"kept_{tag}"] = found["kept"] if found else None
                    row[f"accuracy_{tag}"] = found["accuracy"] if found else None
                    row[f"params_{tag}"] = found["params"] if found else None
                for batch in (1, 256):
                    x = x_test.repeat(batch // len(x_test) + 1, *[1] * (x_test.dim() - 1))[:batch]
                    row[f"latency_full_b{batch}_ms"] = latency_ms(model, x, reps=30)
                    row[f"latency_ft_b{batch}_ms"] = latency_ms(ft["model"], x, reps=30) if ft else None
                row["seconds"] = time.perf_counter() - start
                results.append(row)
                print(f"{name} seed {seed} {training:8s} {criterion:16s} full {full:5.1f}  kept (no ft) {row['kept_no_ft']}  "
                      f"kept (ft) {row['kept_ft']} of {row['width']}  [{row['seconds']:.0f} s]", flush=True)
    return {"rows": results, "grid": GRID, "finetune_epochs": FINETUNE_EPOCHS, "finetune_lr": FINETUNE_LR, "seeds": seeds,
            "tiny": tiny}


def markdown(result: dict) -> str:
    """One row per model and pair: means over seeds (per-seed values in brackets for the kept counts)."""
    groups: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["model"], r["training"], r["criterion"]), []).append(r)

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    def kept(rs, tag):
        values = [r[f"kept_{tag}"] for r in rs]
        m = mean(values)
        return f"{m:.1f} [{', '.join('-' if v is None else str(v) for v in values)}]" if m is not None else "-"

    rows = []
    for (model, training, criterion), rs in groups.items():
        def ms(key, rs=rs):
            m = mean([r[key] for r in rs])
            return "-" if m is None else f"{m:.2f}"

        rows.append({
            "model": model, "training + criterion": f"{training} + {criterion}", "full acc %": mean([r["full_accuracy"] for r in rs]),
            "of": rs[0]["width"], "kept, no FT": kept(rs, "no_ft"), "kept, FT": kept(rs, "ft"),
            "params full -> FT": f"{rs[0]['params_full']} -> {mean([r['params_ft'] for r in rs]) or 0:.0f}",
            "ms b1 full -> FT": f"{ms('latency_full_b1_ms')} -> {ms('latency_ft_b1_ms')}",
            "ms b256 full -> FT": f"{ms('latency_full_b256_ms')} -> {ms('latency_ft_b256_ms')}",
        })
    return table(rows, list(rows[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per model (default 1)")
    parser.add_argument("--tiny", action="store_true", help="tiny data and epochs: a smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_models.json")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    start = time.perf_counter()
    result = run(args.tiny, args.seeds)
    result.update({
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": time.perf_counter() - start,
    })
    from importlib.metadata import version

    result["machine"]["torch_pruning"] = version("torch-pruning")  # the module's __version__ says 1.6.0 in 1.6.1
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
