"""Folders eigenprune owns: the run folder (and compare's and collapse's), atomic writes, finished chunks.

A folder is eigenprune's only if it holds the marker `.eigenprune.json`, written when eigenprune made
the folder (or found it empty). The marker records every entry eigenprune wrote there; `--fresh`
removes exactly those, cleanups remove only entries named like eigenprune's temporaries
(`core.io.TMP_PREFIX`), and a non-empty folder without the marker is never written into. So a run
folder may also hold the user's own files (`.git`, notes, plots): they are never touched.

Layout of runs/<name>/:
  .eigenprune.json   the marker: kind of folder, entries written, digest of the user data (CSV bytes)
  config.yaml        the resolved config (its digest decides whether a rerun may resume)
  chunks/<id>/       one finished chunk: results/curves/importance parquet + student checkpoints
  results.parquet, curves.parquet, importance.parquet   all chunks merged
  summary.json, manifest.json, figures/*.png, report.html
Each chunk is written to a temporary folder in chunks/, its files flushed to disk, and renamed into
place, so a killed run (SIGKILL included) leaves either a whole chunk or none; rerunning the same
command removes leftover temporaries and skips the chunks already there. A run holds an advisory
lock on `.lock` while it writes, so two runs cannot share a folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from eigenprune.core.errors import EigenpruneError
from eigenprune.core.io import atomic_write, fsync, is_temp, share_mode, temp_path
from eigenprune.experiments.config import Config, safe_load

try:
    import fcntl
except ImportError:  # Windows: no advisory lock
    fcntl = None

TABLES = ("results", "curves", "importance", "layers")
GROUP_KEYS = ["teacher_index", "method", "width", "strength"]  # one cell of the grid (trials vary inside)
STUDENT_KEYS = [*GROUP_KEYS, "trial"]  # one student: the key columns shared by every table
MARKER = ".eigenprune.json"
RUN_OUTPUTS = ("config.yaml", *(f"{t}.parquet" for t in TABLES), "summary.json", "manifest.json", "report.html")
"""The files a run writes at the top of its folder."""
MARKER_FORMAT = "eigenprune-folder/1"


def json_safe(obj):
    """`obj` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _inside(rel: object) -> bool:
    """Whether a marker entry names a path inside the folder (relative, no '..')."""
    return isinstance(rel, str) and bool(rel) and not Path(rel).is_absolute() and ".." not in Path(rel).parts


class RunFolderError(EigenpruneError, ValueError):
    """A run folder that cannot be used as asked, stated in one line."""


_LOCK_FDS: set[int] = set()
"""Descriptors of the `.lock` files this process holds. A forked child closes its copies at once (`os.register_at_fork`),
so that only the process that took a lock holds it, and the OS drops it when that process ends, even if a child lives on."""


def _close_inherited_locks() -> None:
    for fd in _LOCK_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


@dataclass
class ChunkResult:
    """What training one chunk produced, ready to commit: tables, other files (relative path -> bytes), timing
    (`seconds`: the whole chunk, from stacking its students to their checkpoints; `train_seconds`: its training loop).

    Built where the chunk trains (a worker process or a Ray task, possibly on another machine) and
    committed by the driver, so only the driver ever writes the run folder.
    """

    chunk_id: str
    tables: dict[str, pd.DataFrame]
    files: dict[str, bytes] = field(default_factory=dict)
    seconds: float = 0.0
    train_seconds: float = 0.0


def parquet_writer(df: pd.DataFrame) -> Callable[[Path], object]:
    """A writer for `atomic_write` that stores `df` as parquet (no index)."""
    return lambda tmp: df.to_parquet(tmp, index=False)


def _make_dir(path: Path, parents: bool = False) -> None:
    """mkdir with the umask's permissions; an OSError becomes one line."""
    try:
        path.mkdir(parents=parents)
    except OSError as err:
        raise RunFolderError(f"cannot create folder {path}: {err.strerror or type(err).__name__}") from None
    share_mode(path, directory=True)


class OwnedFolder:
    """A folder eigenprune made (see the module docstring), of one `kind`: run, compare or collapse.

    Entries are recorded by relative path as "file", "tree" (a folder wholly written by eigenprune,
    e.g. a chunk) or "dir" (a folder eigenprune made, which may also hold the user's files).
    """

    def __init__(self, path: str | Path, kind: str = "run") -> None:
        self.path = Path(path)
        self.kind = kind
        self._marker: dict | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the folder `open` locked

    def entry(self, rel: str | Path) -> Path:
        """The path of `rel` inside this folder, refused (one line) if it leaves the folder or if it, or a folder on the way
        to it, is a symbolic link: eigenprune never reads, writes or deletes through a link it finds inside its folders."""
        if not _inside(str(rel)):
            raise RunFolderError(f"{rel!r} is not a path inside {self.path}; eigenprune will not use it")
        self._check_same_folder()
        p = self.path
        for part in Path(rel).parts:
            p = p / part
            if p.is_symlink():
                raise RunFolderError(f"{p} is a symbolic link; eigenprune never reads, writes or deletes through a link inside "
                                     f"its folder {self.path}: remove the link (its target is untouched) or use another folder")
        return p

    def _check_same_folder(self) -> None:
        """Once opened, refuse (one line) to go on in another folder put at this path (the one eigenprune opened moved away
        or removed, and a folder made in its place): eigenprune would write into, and record in its marker, a folder it
        did not make. A folder that is simply gone is left to the OSError of whatever uses it next."""
        if self._identity is None:
            return
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) != self._identity:
            raise RunFolderError(f"{self.path} was replaced by another folder while eigenprune was working in it (the one it "
                                 "opened was moved or removed); eigenprune will not write into a folder it did not make")

    def marker(self) -> dict | None:
        """The folder's marker, or None if it has none; `RunFolderError` if it is damaged."""
        p = self.entry(MARKER)
        if not p.is_file():
            return None
        try:
            marker = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError, OSError) as err:
            raise RunFolderError(f"{p} is unreadable ({type(err).__name__}); eigenprune will not write into {self.path}") from None
        if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT or not isinstance(marker.get("entries"), dict):
            raise RunFolderError(f"{p} is not an eigenprune marker (format {MARKER_FORMAT}); eigenprune will not write into {self.path}")
        outside = [rel for rel in marker["entries"] if not _inside(rel)]
        if outside:
            raise RunFolderError(f"{p} lists {outside[0]!r}, which is not a path inside the folder; eigenprune will not use this marker")
        return marker

    def check_ours(self) -> dict | None:
        """Refuse (one line, nothing written) a path eigenprune may not write into; the marker if it has one.

        A missing path or an empty folder may become ours; a non-empty folder must carry a marker of this kind.
        """
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunFolderError(f"output path {p} exists and is not a folder")
        if not p.exists():
            return None
        marker = self.marker()
        if marker is None:
            if any(e.name != ".lock" and not is_temp(e) for e in p.iterdir()):  # what a killed first run may leave
                legacy = (p / "config.yaml").is_file() and (p / "chunks").is_dir()
                hint = (" (it looks like a run of an earlier eigenprune, which did not record what it wrote)" if legacy else "")
                raise RunFolderError(f"{p} is not empty and was not made by eigenprune{hint}; choose another --out")
            return None
        if marker.get("kind") != self.kind:
            raise RunFolderError(f"{p} was made by `eigenprune {marker.get('kind')}`, not `eigenprune {self.kind}`; choose another --out")
        return marker

    def open(self, create: bool = False) -> None:
        """Lock the folder and load its marker, so that eigenprune may write into it (`release` drops the lock).

        Without `create` the folder must be a run folder eigenprune made; with it, a missing or empty
        folder is made ours (parents too). Refused in one line, with nothing written, otherwise.
        """
        marker = self.check_ours()
        if marker is None and not create:
            raise RunFolderError(f"{self.path} is not a {self.kind} folder made by eigenprune (it has no {MARKER})")
        if not self.path.exists():
            _make_dir(self.path, parents=True)
        self._lock()
        here = os.stat(self.path)
        self._identity = (here.st_dev, here.st_ino)
        self._marker = self.marker() or {"format": MARKER_FORMAT, "kind": self.kind, "entries": {}}  # re-read under the lock
        self.record(".lock")

    def _lock(self) -> None:
        """Hold an exclusive advisory lock on `.lock` until this process exits (the OS drops it on a kill)."""
        if fcntl is None:
            return
        try:
            fd = os.open(self.entry(".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as err:
            raise RunFolderError(f"cannot write into {self.path}: {err.strerror or type(err).__name__}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(f"{self.path} is in use by another eigenprune process; wait for it or use another --out") from None
        self._lock_fd = fd
        _LOCK_FDS.add(fd)

    def release(self) -> None:
        """Drop the lock taken by `open` (also dropped when the process ends)."""
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            _LOCK_FDS.discard(fd)
            os.close(fd)
            self._lock_fd = None

    def _save_marker(self) -> None:
        text = json.dumps(self._marker, indent=1, sort_keys=True) + "\n"
        p = self.entry(MARKER)
        if not p.is_file() or p.read_text() != text:  # an unchanged marker is not rewritten
            atomic_write(p, text)

    def record(self, rel: str, kind: str = "file") -> Path:
        """Note that eigenprune writes entry `rel` (before writing it); returns its path."""
        if self._marker is None:
            raise RuntimeError(f"{self.path} was not claimed before writing {rel}")
        if self._marker["entries"].get(rel) != kind:
            self._marker["entries"][rel] = kind
            self._save_marker()
        return self.entry(rel)

    def refuse_foreign(self, names: tuple[str, ...]) -> None:
        """Refuse now (one line), not after the work, a folder where a file of the user's holds a name that
        will be written (`names`): eigenprune would not replace it."""
        theirs = [rel for rel in names if self.entry(rel).exists() and not self.owns(rel)]  # a link is refused by `entry`
        if theirs:
            raise RunFolderError(f"{self.path / theirs[0]} was not written by eigenprune, and eigenprune would write that name; "
                                 "move it away or use another --out")

    def owns(self, rel: str) -> bool:
        marker = self._marker if self._marker is not None else self.marker()
        return marker is not None and rel in marker["entries"]

    def write(self, rel: str, content: bytes | str | Callable[[Path], object], durable: bool = False) -> Path:
        """Atomically write a file of ours (recorded first); folders on the way are made and recorded.

        An existing entry of that name that eigenprune did not record (the user's own file) is refused, not replaced.
        """
        parts = Path(rel).parts
        for i in range(1, len(parts)):
            self.mkdir("/".join(parts[:i]))
        target = self.entry(rel)
        if (target.exists() or target.is_symlink()) and not self.owns(rel):
            raise RunFolderError(f"{target} exists and was not written by eigenprune; move it away (eigenprune will not replace it)")
        return atomic_write(self.record(rel), content, durable)

    def write_json(self, rel: str, obj: dict) -> Path:
        """Write strict JSON (NaN and infinities become null)."""
        return self.write(rel, json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False) + "\n")

    def mkdir(self, rel: str) -> Path:
        """A sub-folder eigenprune uses (it may also hold the user's files, which stay)."""
        p = self.entry(rel)
        if p.exists() and not p.is_dir():
            raise RunFolderError(f"{p} exists and is not a folder; eigenprune will not replace it")
        if not self.owns(rel) and not p.exists():
            self.record(rel, "dir")
        if not p.exists():
            _make_dir(p)
        return p

    def remove_own(self, keep: tuple[str, ...] = ()) -> None:
        """Delete every entry eigenprune recorded here (but `keep`), deepest first; folders only once empty."""
        entries = self._marker["entries"]
        paths = {rel: self.entry(rel) for rel in entries if rel not in keep}  # every link refused before anything goes
        for rel, p in paths.items():
            if entries[rel] == "tree" and p.is_dir():
                self._refuse_links_under(p)
        for rel in sorted(paths, key=lambda r: (-len(Path(r).parts), r)):
            p, kind = paths[rel], entries[rel]
            if kind == "tree" and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif kind == "dir" and p.is_dir() and not p.is_symlink():
                if any(p.iterdir()):
                    continue  # the user's files are in it: it stays, and stays recorded
                p.rmdir()
            elif kind == "file" and (p.is_file() or p.is_symlink()):
                p.unlink()
            elif p.exists():
                continue  # replaced by something else since: not ours any more
            del entries[rel]
        self._save_marker()

    def _refuse_links_under(self, folder: Path) -> None:
        """Refuse (one line) a folder wholly ours in which something has been replaced by a symbolic link."""
        for parent, dirs, files in os.walk(folder):
            for name in dirs + files:
                if os.path.islink(os.path.join(parent, name)):
                    self.entry(Path(parent, name).relative_to(self.path))  # raises, naming the link

    def remove_temporaries(self) -> None:
        """Delete leftover temporaries of a killed run: only entries named with `core.io.TMP_PREFIX`, in our folders."""
        folders = [self.path] + [self.entry(rel) for rel, kind in self._marker["entries"].items() if kind == "dir"]
        for folder in folders:
            if folder.is_dir():
                for p in folder.iterdir():
                    if is_temp(p):
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


    def in_use(self) -> bool:
        """Whether another process holds the folder's lock now (a run still writing it); nothing is created."""
        if fcntl is None or getattr(self, "_lock_fd", None) is not None:
            return False
        try:
            fd = os.open(self.path / ".lock", os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


class RunFolder(OwnedFolder):
    """A run folder for one config."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, "run")

    def is_run_folder(self) -> bool:
        """Whether this folder carries a run marker (without raising on anything else)."""
        try:
            marker = self.marker()
            return marker is not None and marker.get("kind") == "run" and self.entry("config.yaml").is_file()
        except RunFolderError:
            return False

    @property
    def chunks_dir(self) -> Path:
        return self.entry("chunks")

    def prepare(self, cfg: Config, fresh: bool = False, data_digest: str | None = None) -> None:
        """Create the folder, or check that an existing one is ours and was made by the same config on the same
        data, then lock it.

        Nothing is written before every check has passed. `fresh` removes what an earlier run of ours wrote
        (any config) and nothing else. Leftover temporaries of a killed run are removed.
        """
        marker = self.check_ours()
        self.refuse_foreign(RUN_OUTPUTS)
        stored = self.entry("config.yaml")
        if marker is not None and stored.exists() and not fresh:
            try:
                old = Config.model_validate(safe_load(stored.read_text()))
            except Exception as err:  # noqa: BLE001 - any unreadable config means we must not mix runs
                raise RunFolderError(f"{stored} is unreadable ({type(err).__name__}); use --fresh to start over or another --out") from None
            if old.digest() != cfg.digest():
                raise RunFolderError(
                    f"{self.path} holds a run of a different config (digest {old.digest()} vs {cfg.digest()}); "
                    "use --fresh to start over or --out for a new folder"
                )
            if marker.get("data_sha256") != data_digest:
                raise RunFolderError(
                    f"the data changed since {self.path} was started (sha256 {str(marker.get('data_sha256'))[:12]} then, "
                    f"{str(data_digest)[:12]} now); refusing to mix results; use --fresh to start over or another --out"
                )
        self.open(create=True)
        if fresh:
            self.remove_own(keep=(".lock",))
        self._marker["data_sha256"] = data_digest
        self.mkdir("chunks")
        self.remove_temporaries()
        if not stored.is_file() or stored.read_text() != cfg.to_yaml():  # a resume leaves it untouched
            self.write("config.yaml", cfg.to_yaml())
        self._save_marker()

    def done(self, chunk_id: str) -> bool:
        """Whether chunk `chunk_id` was committed here by eigenprune."""
        return self.owns(f"chunks/{chunk_id}") and self.entry(f"chunks/{chunk_id}/results.parquet").exists()

    def commit_chunk(self, result: ChunkResult) -> Path:
        """Write a chunk's tables, files and timing to a temporary folder, flush, and rename it into place."""
        tmp = temp_path(self.chunks_dir, result.chunk_id, directory=True)
        try:
            for name, df in result.tables.items():
                df.to_parquet(tmp / f"{name}.parquet", index=False)
            for rel, data in result.files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            timing = {"seconds": round(result.seconds, 3), "train_seconds": round(result.train_seconds, 3)}
            (tmp / "timing.json").write_text(json.dumps(timing) + "\n")
            for p in sorted(tmp.rglob("*"), reverse=True):  # files first, then their folders
                share_mode(p, directory=p.is_dir())
                fsync(p)
            share_mode(tmp, directory=True)
            fsync(tmp)
            rel = f"chunks/{result.chunk_id}"
            final = self.entry(rel)
            if final.exists():
                if not self.owns(rel):
                    raise RunFolderError(f"{final} exists and was not written by eigenprune; refusing to replace it")
                shutil.rmtree(final)  # an unfinished chunk of ours
            self.record(rel, "tree")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync(self.chunks_dir)
        return final

    def chunk_seconds(self, chunk_ids: list[str]) -> dict[str, dict[str, float]]:
        """{"chunk_seconds": the whole of each finished chunk (training and measuring), "chunk_train_seconds": its
        training loop}, as recorded when it was committed. A chunk committed before the two were kept apart
        recorded only the whole, under "train_seconds": it is reported as the whole, with no training time."""
        out: dict[str, dict[str, float]] = {"chunk_seconds": {}, "chunk_train_seconds": {}}
        for cid in chunk_ids:
            p = self.entry(f"chunks/{cid}/timing.json")
            if p.is_file():
                timing = json.loads(p.read_text())
                if "seconds" in timing:
                    out["chunk_seconds"][cid], out["chunk_train_seconds"][cid] = timing["seconds"], timing["train_seconds"]
                else:
                    out["chunk_seconds"][cid] = timing["train_seconds"]
        return out

    def merge(self, chunk_ids: list[str]) -> dict[str, pd.DataFrame]:
        """Concatenate the tables of the given finished chunks into the top-level parquet files.

        Only the planned chunks are read, so a stray folder cannot add rows; a repeated
        student (`STUDENT_KEYS`, and layer/kept/node where a table has them) is refused rather than written.
        """
        merged = {}
        for name in TABLES:  # read everything first: a damaged chunk stops the merge before any file is replaced
            frames = []
            for cid in chunk_ids:
                p = self.entry(f"chunks/{cid}/{name}.parquet")
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
            self.write(f"{name}.parquet", parquet_writer(df))
        return merged

    def _need(self, name: str) -> Path:
        if not self.path.is_dir():
            raise RunFolderError(f"run folder not found: {self.path}")
        p = self.entry(name)
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
            return Config.model_validate(safe_load(p.read_text()))
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
