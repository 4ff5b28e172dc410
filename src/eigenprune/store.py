"""The run folder: atomic writes, finished chunks, and a guard against mixing configs.

Layout of runs/<name>/:
  config.yaml        the resolved config (its digest decides whether a rerun may resume)
  chunks/<id>/       one finished chunk: results/curves/importance parquet + student checkpoints
  results.parquet, curves.parquet, importance.parquet   all chunks merged
  summary.json, manifest.json, figures/*.png, report.html
Each chunk is written to a temporary folder and renamed into place, so a killed run leaves either a
whole chunk or none; rerunning the same command skips the chunks already there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from eigenprune.config import Config

TABLES = ("results", "curves", "importance", "layers")
GROUP_KEYS = ["teacher_index", "method", "width", "strength"]  # one cell of the grid (trials vary inside)
STUDENT_KEYS = [*GROUP_KEYS, "trial"]  # one student: the key columns shared by every table


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked, stated in one line."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


class RunFolder:
    """A run folder for one config."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def chunks_dir(self) -> Path:
        return self.path / "chunks"

    def prepare(self, cfg: Config, fresh: bool = False) -> None:
        """Create the folder, or check that an existing one was made by the same config."""
        stored = self.path / "config.yaml"
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"output path {self.path} exists and is not a folder")
        if fresh and self.path.exists():
            if stored.exists() or not any(self.path.iterdir()):
                shutil.rmtree(self.path)
            else:
                raise RunFolderError(f"refusing --fresh on {self.path}: it is not empty and holds no eigenprune config.yaml")
        if stored.exists():
            try:
                old = Config.model_validate(yaml.safe_load(stored.read_text()))
            except Exception as err:  # noqa: BLE001 - any unreadable config means we must not mix runs
                raise RunFolderError(f"{stored} is unreadable ({type(err).__name__}); use --fresh or another --out") from None
            if old.digest() != cfg.digest():
                raise RunFolderError(
                    f"{self.path} holds a run of a different config (digest {old.digest()} vs {cfg.digest()}); "
                    "use --fresh to start over or --out for a new folder"
                )
        elif self.path.exists() and any(p.name != "chunks" for p in self.path.iterdir()):
            raise RunFolderError(f"{self.path} is not empty and holds no eigenprune config.yaml; choose another --out")
        self.chunks_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(stored, cfg.to_yaml())

    def done(self, chunk_id: str) -> bool:
        return (self.chunks_dir / chunk_id / "results.parquet").exists()

    def commit_chunk(self, chunk_id: str, tables: dict[str, pd.DataFrame], write_extra=None) -> Path:
        """Write a chunk's tables (and whatever `write_extra(folder)` adds) and rename it into place."""
        tmp = Path(tempfile.mkdtemp(dir=self.chunks_dir, prefix=f".{chunk_id}."))
        for name, df in tables.items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        if write_extra is not None:
            write_extra(tmp)
        final = self.chunks_dir / chunk_id
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def merge(self) -> dict[str, pd.DataFrame]:
        """Concatenate every finished chunk's tables into the top-level parquet files."""
        merged = {}
        chunk_dirs = sorted(p for p in self.chunks_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        for name in TABLES:
            frames = [pd.read_parquet(d / f"{name}.parquet") for d in chunk_dirs if (d / f"{name}.parquet").exists()]
            df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
            keys = [c for c in (*STUDENT_KEYS, "layer", "kept", "node") if c in df.columns]
            if keys:
                df = df.sort_values(keys, kind="stable").reset_index(drop=True)
            write_parquet_atomic(df, self.path / f"{name}.parquet")
            merged[name] = df
        return merged

    def write_json(self, name: str, obj: dict) -> None:
        write_text_atomic(self.path / name, json.dumps(obj, indent=2, default=str) + "\n")

    def load(self) -> dict[str, pd.DataFrame]:
        """The merged tables of a finished run; `RunFolderError` naming the first missing file."""
        if not self.path.is_dir():
            raise RunFolderError(f"run folder not found: {self.path}")
        out = {}
        for name in (*TABLES,):
            p = self.path / f"{name}.parquet"
            if not p.is_file():
                raise RunFolderError(f"{self.path} is incomplete: {p.name} is missing (rerun `eigenprune run` to finish it)")
            out[name] = pd.read_parquet(p)
        return out
