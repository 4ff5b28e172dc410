"""Writing files safely: atomically, with the user's umask, never over an input or a file eigenprune did not write.

Every file eigenprune writes goes through `atomic_write`: the bytes go to a temporary file beside the
target, named `TMP_PREFIX` + something random (the only names a cleanup may ever delete), are flushed,
and the temporary is renamed over the target, so a reader sees the old file or the whole new one.
`check_output` decides beforehand whether a target may be written at all.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from eigenprune.core.errors import EigenpruneError

TMP_PREFIX = ".eigenprune-tmp-"
"""Name prefix of every temporary file or folder eigenprune creates; nothing else is ever cleaned up."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class OutputError(EigenpruneError, ValueError):
    """An output path that cannot or must not be written, stated in one line."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_mode(path: Path, directory: bool = False) -> None:
    """Give `path` the permissions a plain `open()`/`mkdir()` would (mkstemp and mkdtemp make them private)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def temp_path(folder: Path, name: str, directory: bool = False) -> Path:
    """A new, empty temporary file (or folder) in `folder`, named with `TMP_PREFIX`."""
    if directory:
        return Path(tempfile.mkdtemp(dir=folder, prefix=f"{TMP_PREFIX}{name}."))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TMP_PREFIX}{name}.")
    os.close(fd)
    return Path(tmp)


def is_temp(path: Path) -> bool:
    """Whether `path` is named like one of eigenprune's temporaries."""
    return path.name.startswith(TMP_PREFIX)


def fsync(path: Path) -> None:
    """Flush a file's (or folder's) data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, content: bytes | str | Callable[[Path], object], durable: bool = False) -> Path:
    """Write `content` (bytes, text, or a function that writes the file at the path it is given) to `path`.

    Through a temporary file in the same folder and an atomic rename; the file gets the umask's
    permissions. If writing fails the temporary is removed, `path` is left as it was, and the error
    is raised as one-line `OutputError` (an `OSError`) or as raised (anything else). `durable`
    also flushes the file to disk before the rename.
    """
    path = Path(path)
    try:
        tmp = temp_path(path.parent, path.name)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or type(err).__name__}") from None
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        elif isinstance(content, str):
            tmp.write_text(content)
        else:
            content(tmp)
        share_mode(tmp)
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {err.strerror or type(err).__name__}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


NAME_MAX = 255
"""The longest file or folder name, in bytes, that Linux file systems (ext4, xfs, btrfs, tmpfs) hold."""
PATH_MAX = 4096
"""The longest path, in bytes with its closing NUL, that Linux system calls take."""


def _short(text: str, keep: int = 40) -> str:
    return text if len(text) <= keep else text[:keep] + f"… ({len(text):,} characters)"


def check_path(path: str | Path, what: str, error: type[Exception] = OutputError) -> Path:
    """`path`, unless the file system could not hold it: `error` (one line) for a name of more than `NAME_MAX`
    bytes or a path of `PATH_MAX` bytes or more once made absolute (as eigenprune stores and resolves paths)."""
    path = Path(path)
    long = next((part for part in path.parts if len(os.fsencode(part)) > NAME_MAX), None)
    if long is not None:
        raise error(f"{what} {_short(str(path))}: the name {_short(long, 20)!r} is {len(os.fsencode(long))} bytes long, "
                    f"more than the {NAME_MAX} a file or folder name may have")
    size = len(os.fsencode(os.path.abspath(path)))
    if size >= PATH_MAX:
        raise error(f"{what} {_short(str(path))}: the path is {size:,} bytes long as an absolute path, more than the "
                    f"{PATH_MAX - 1:,} the system allows")
    return path


def input_file(path: str | Path, missing: str, error: type[Exception], *, label: str | None = None, what: str = "file",
               hint: str = "") -> Path:
    """`path` if it is an existing regular file; else `error` saying "{missing} not found: path{hint}", that it is
    not a regular file (a folder, a FIFO, a device such as /dev/zero, a dangling symlink), or why it cannot be read.
    `label` opens the other messages (default: the first word of `missing` and "path"); `what` names the file a
    folder is not."""
    label = label or f"{missing.split()[0]} path"
    path = check_path(path, label.rstrip(":"), error)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise error(f"{label} {path} is a symlink to {os.readlink(path)}, which does not exist") from None
        raise error(f"{missing} not found: {path}{hint}") from None
    except OSError as err:
        raise error(f"{label} {path} cannot be read ({err.strerror or type(err).__name__})") from None
    if stat.S_ISDIR(mode):
        raise error(f"{label} {path} is a folder, not a {what}")
    if not stat.S_ISREG(mode):
        raise error(f"{label} {path} is not a regular file ({special_kind(path, mode)}); eigenprune reads only regular files")
    return path


def special_kind(path: Path, mode: int) -> str:
    """What a path that is neither a regular file nor a folder is, for messages: "a FIFO (named pipe)", "a symlink to
    /dev/zero, a character device", ..."""
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "a special file")
    return f"a symlink to {os.readlink(path)}, {kind}" if path.is_symlink() else kind


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(
    path: str | Path, *, inputs: Iterable[str | Path] = (), force: bool = False,
    ours: Callable[[Path], bool] | None = None, option: str = "--out", kind: str = "a file", suffix: str | None = None,
) -> Path:
    """Check that `path` may be written as a new output file, before any work is done; returns it.

    Refused with a one-line `OutputError`: a name not ending in `suffix` (when given: the file's format);
    a folder; a missing parent or a parent that is not a folder or not writable; the same file as one of
    `inputs` (an output never replaces its own input); an existing file, unless `force` and `ours(path)`
    says it is `kind` (e.g. "an ONNX file") that eigenprune wrote.
    """
    path = check_path(path, option)
    if suffix is not None and path.suffix.lower() != suffix:
        raise OutputError(f"{option} {path}: this writes {kind}; give a name ending in {suffix}")
    if any(_same_file(path, Path(i)) for i in inputs):
        raise OutputError(f"{option} {path} is the command's own input; choose another output file")
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name")
    parent = path.parent
    if not parent.exists():
        raise OutputError(f"{option} {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: folder {parent} is not writable")
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{option} {path} is a symlink to {os.readlink(path)}, which does not exist; eigenprune will not "
                          "write through a symlink: choose another name")
    if path.exists() or path.is_symlink():
        if not force:
            raise OutputError(f"{option} {path} already exists; choose another name, or pass --force to replace a file eigenprune wrote")
        if ours is None or path.is_symlink() or not ours(path):
            raise OutputError(f"{option} {path} exists and is not {kind} that eigenprune wrote; refusing to replace it "
                              "(eigenprune replaces only its own files of that kind)")
    return path
