"""The one way a run writes a file (config, checkpoint pieces, best weights, exports, summary, record), so that a
crash or a full disk never leaves half a file, a stray temporary one, or a message that misreports the disk.

``replace`` writes beside the target (``.NAME.tmp``) and renames over it: a reader sees the old file or the new one.
``append`` adds to a record and, when the write fails, cuts the record back to where it was: no torn last line.
A failed write removes what it wrote *before* measuring the free space it reports; measured earlier, the half-written
file makes a disk with room to spare read "0.0 MiB free".

Only the standard library and the error root are imported here: config, checkpoint, export and tracking all build on
it.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_loaders.errors import SovitError


class WriteError(SovitError):
    """A file could not be written (disk full, quota, read-only, permissions): one line naming it and the space."""


def free_mib(path: Path, error: BaseException | None = None) -> float:
    """Free space (MiB) of the file system holding ``path``, or of its nearest existing parent.

    A write that failed may still hold its file open through the failed call's frames, which ``error``'s traceback
    keeps alive; a deleted file's space only comes back when it is closed, so those frames are released first."""
    while error is not None:
        error.__traceback__ = None
        error = error.__cause__ or error.__context__
    gc.collect()
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 2**20


def describe(error: BaseException) -> str:
    """``Type: first line`` of an error, at most 160 characters of it."""
    text = str(error).splitlines()[0][:160] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def write_error(path: Path, error: BaseException) -> WriteError:
    """The one-line error of a failed write; call it once the partial output is gone."""
    return WriteError(f"could not write {path} ({describe(error)}); {free_mib(path, error):.1f} MiB free on its file "
                      "system: free space (or fix the permissions) and rerun the same command")


def is_write_failure(error: BaseException) -> bool:
    """What a write raises when the disk refuses it: OSError, and the RuntimeError of torch's zip writer or
    safetensors' error, which carry no errno, or the WriteError of a file written inside a folder being replaced.
    Anything else is a bug and must keep its traceback."""
    return isinstance(error, (OSError, RuntimeError, WriteError)) or type(error).__name__ == "SafetensorError"


def temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def remove(path: Path) -> None:
    """A file or a folder, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` creates the new content at a temporary path (a file, or a folder), which then takes ``path``'s
    place in one rename. On failure the temporary path is removed and a WriteError names ``path``."""
    path = Path(path)
    tmp = temporary(path)
    remove(tmp)  # left by a process killed mid-write
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        remove(tmp)
        if is_write_failure(e):  # a WriteError from inside (a file of a folder) is named again as this path
            cause = e.__cause__ if isinstance(e, WriteError) and e.__cause__ is not None else e
            raise write_error(path, cause) from cause
        raise


def write_bytes(path: Path, data: bytes) -> None:
    replace(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, data: dict[str, Any], indent: int | None = 1) -> None:
    write_text(path, json.dumps(data, indent=indent, default=str))


def append(path: Path, text: str) -> None:
    """Adds ``text`` at the end of ``path`` (created if missing); a failed write is cut back off, then raised."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            os.ftruncate(fd, start)
            raise write_error(Path(path), e) from e
    finally:
        os.close(fd)
