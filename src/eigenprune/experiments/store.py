"""The run folder: atomic writes, finished chunks, and a guard against mixing configs.

Layout of runs/<name>/:
  config.yaml        the resolved config (its digest decides whether a rerun may resume)
  chunks/<id>/       one finished chunk: results/curves/importance parquet + student checkpoints
  results.parquet, curves.parquet, importance.parquet   all chunks merged
  summary.json, manifest.json, figures/*.png, report.html
Each chunk is written to a temporary folder (`chunks/.<id>.*`), its files flushed to disk, and renamed
into place, so a killed run (SIGKILL included) leaves either a whole chunk or none; rerunning the same
command removes leftover temporary entries and skips the chunks already there. A run holds an
advisory lock on `.lock` while it writes, so two runs cannot share a folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from eigenprune.experiments.config import Config

try:
    import fcntl
except ImportError:  # Windows: no advisory lock
    fcntl = None

TABLES = ("results", "curves", "importance", "layers")
GROUP_KEYS = ["teacher_index", "method", "width", "strength"]  # one cell of the grid (trials vary inside)
STUDENT_KEYS = [*GROUP_KEYS, "trial"]  # one student: the key columns shared by every table


def _finite(obj):
    """`obj` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked, stated in one line."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ChunkResult:
    """What training one chunk produced, ready to commit: tables, other files (relative path -> bytes), timing.

    Built where the chunk trains (a worker process or a Ray task, possibly on another machine) and
    committed by the driver, so only the driver ever writes the run folder.
    """

    chunk_id: str
    tables: dict[str, pd.DataFrame]
    files: dict[str, bytes] = field(default_factory=dict)
    seconds: float = 0.0


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
        """Create the folder, or check that an existing one was made by the same config, then lock it.

        Nothing is written before every check has passed. `fresh` empties a folder of ours (any config).
        Leftover temporary entries of a killed run are removed.
        """
        stored = self.path / "config.yaml"
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"output path {self.path} exists and is not a folder")
        ours = {"chunks", ".lock"}
        if self.path.exists() and not stored.exists() and any(p.name not in ours for p in self.path.iterdir()):
            raise RunFolderError(f"{self.path} is not empty and holds no eigenprune config.yaml; choose another --out")
        if stored.exists() and not fresh:
            try:
                old = Config.model_validate(yaml.safe_load(stored.read_text()))
            except Exception as err:  # noqa: BLE001 - any unreadable config means we must not mix runs
                raise RunFolderError(f"{stored} is unreadable ({type(err).__name__}); use --fresh or another --out") from None
            if old.digest() != cfg.digest():
                raise RunFolderError(
                    f"{self.path} holds a run of a different config (digest {old.digest()} vs {cfg.digest()}); "
                    "use --fresh to start over or --out for a new folder"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        if fresh:
            for p in self.path.iterdir():
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.chunks_dir.mkdir(exist_ok=True)
        self._remove_leftovers()
        if not stored.is_file() or stored.read_text() != cfg.to_yaml():  # a resume leaves it untouched
            write_text_atomic(stored, cfg.to_yaml())

    def _lock(self) -> None:
        """Hold an exclusive advisory lock on `.lock` until this process exits (the OS drops it on a kill)."""
        if fcntl is None:
            return
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(f"{self.path} is in use by another eigenprune run; wait for it to finish or use another --out") from None
        self._lock_fd = fd

    def release(self) -> None:
        """Drop the lock taken by `prepare` (also dropped when the process ends)."""
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)
            self._lock_fd = None

    def _remove_leftovers(self) -> None:
        """Delete temporary entries (names starting with '.') a killed run may have left."""
        for folder in (self.path, self.chunks_dir, self.path / "figures"):
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.name.startswith(".") and p.name != ".lock":
                        shutil.rmtree(p) if p.is_dir() else p.unlink()

    def done(self, chunk_id: str) -> bool:
        return (self.chunks_dir / chunk_id / "results.parquet").exists()

    def commit_chunk(self, result: ChunkResult) -> Path:
        """Write a chunk's tables, files and timing to a temporary folder, flush, and rename it into place."""
        tmp = Path(tempfile.mkdtemp(dir=self.chunks_dir, prefix=f".{result.chunk_id}."))
        for name, df in result.tables.items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        for rel, data in result.files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        (tmp / "timing.json").write_text(json.dumps({"train_seconds": round(result.seconds, 3)}) + "\n")
        for p in sorted(tmp.rglob("*"), reverse=True):  # files first, then their folders
            _fsync(p)
        _fsync(tmp)
        final = self.chunks_dir / result.chunk_id
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.chunks_dir)
        return final

    def chunk_seconds(self, chunk_ids: list[str]) -> dict[str, float]:
        """Training seconds of each finished chunk, as recorded when it was committed."""
        out = {}
        for cid in chunk_ids:
            p = self.chunks_dir / cid / "timing.json"
            if p.is_file():
                out[cid] = json.loads(p.read_text())["train_seconds"]
        return out

    def merge(self, chunk_ids: list[str]) -> dict[str, pd.DataFrame]:
        """Concatenate the tables of the given finished chunks into the top-level parquet files.

        Only the planned chunks are read, so a stray folder cannot add rows; a repeated
        (method, width, trial) is refused rather than written.
        """
        merged = {}
        for name in TABLES:  # read everything first: a damaged chunk stops the merge before any file is replaced
            frames = []
            for cid in chunk_ids:
                p = self.chunks_dir / cid / f"{name}.parquet"
                try:
                    frames.append(pd.read_parquet(p))
                except Exception as err:  # noqa: BLE001 - any unreadable chunk table is reported the same way
                    raise RunFolderError(f"{p} is unreadable ({type(err).__name__}); delete {p.parent} and rerun to redo it") from None
            df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
            keys = [c for c in (*STUDENT_KEYS, "layer", "kept", "node") if c in df.columns]
            if keys:
                df = df.sort_values(keys, kind="stable").reset_index(drop=True)
                if df.duplicated(keys).any():
                    raise RunFolderError(f"{self.path}: {name} has repeated rows for {keys}; not writing a merged table")
            merged[name] = df
        for name, df in merged.items():
            write_parquet_atomic(df, self.path / f"{name}.parquet")
        return merged

    def write_json(self, name: str, obj: dict) -> None:
        """Write strict JSON (NaN and infinities become null)."""
        write_text_atomic(self.path / name, json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n")

    def _need(self, name: str) -> Path:
        if not self.path.is_dir():
            raise RunFolderError(f"run folder not found: {self.path}")
        p = self.path / name
        if not p.is_file():
            raise RunFolderError(f"{self.path} is incomplete: {name} is missing (rerun `eigenprune run` to finish it)")
        return p

    def load(self) -> dict[str, pd.DataFrame]:
        """The merged tables of a finished run; `RunFolderError` naming the first missing or unreadable file."""
        out = {}
        for name in TABLES:
            p = self._need(f"{name}.parquet")
            try:
                out[name] = pd.read_parquet(p)
            except Exception as err:  # noqa: BLE001 - a truncated or foreign file, whatever pyarrow calls it
                raise RunFolderError(f"{p} is unreadable ({type(err).__name__}); rerun `eigenprune run` to rebuild it") from None
        return out

    def read_config(self) -> Config:
        """The run's stored config; `RunFolderError` if it is missing or invalid."""
        p = self._need("config.yaml")
        try:
            return Config.model_validate(yaml.safe_load(p.read_text()))
        except Exception as err:  # noqa: BLE001 - YAML, encoding or validation problems alike
            raise RunFolderError(f"{p} is unreadable ({type(err).__name__}); it was not written by this eigenprune") from None

    def read_json(self, name: str) -> dict:
        """A JSON file of the run; `RunFolderError` if it is missing or not a JSON object."""
        p = self._need(name)
        try:
            obj = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise RunFolderError(f"{p} is not valid JSON ({err}); rerun `eigenprune run` to rebuild it") from None
        if not isinstance(obj, dict):
            raise RunFolderError(f"{p} should hold a JSON object, got {type(obj).__name__}")
        return obj
