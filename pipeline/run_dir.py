"""The run directory a rank trains in: its default name, the lock that keeps a second training process out, and
the settings a resume in it may not change. ``checkpoint`` describes what the directory holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from . import distributed
from .checkpoint import CheckpointError, complete_tags
from .config import ConfigError, RunConfig, read_yaml
from .runtime import slurm_job_id

# what resuming may not change silently (the weights or the schedule would no longer mean the same)
FIXED_ON_RESUME = ("model.arch", "model.num_classes", "model.img_size", "train.global_batch_size")


def default_run_dir(arch: str, job_id: str | None = None) -> Path:
    """``runs/<arch>-<SLURM job id>``: stable across requeues of one job; elsewhere the start time."""
    job = job_id or slurm_job_id()
    return Path("runs") / f"{arch}-{job or time.strftime('%Y%m%d-%H%M%S')}"


def resolve_run_dir(cfg: RunConfig) -> Path:
    """Collective: ``checkpoint.run_dir``, or the default that rank 0 picks, so every rank agrees even when their
    clocks straddle a second."""
    if not cfg.checkpoint.run_dir:
        cfg.checkpoint.run_dir = str(distributed.broadcast_object(default_run_dir(cfg.model.arch)))
    return Path(cfg.checkpoint.run_dir)


def lock_run_dir(run_dir: Path, is_main: bool) -> RunLock:
    """Collective: rank 0 takes the run directory's lock; every rank learns the outcome, so all stop together."""
    run_lock, error = RunLock(run_dir), None
    if is_main:
        try:
            run_lock.acquire()
        except (CheckpointError, OSError) as e:
            error = e
    if distributed.any_rank(error is not None):
        if isinstance(error, OSError):
            raise ConfigError(f"checkpoint.run_dir={str(run_dir)!r} is not usable: {error}") from None
        raise error or CheckpointError(f"{run_dir} is in use by another training process")
    return run_lock


def check_fixed_keys(cfg: RunConfig, run_dir: Path) -> None:
    """Resuming a run under another arch, class count, image size or batch would load weights or a schedule that
    mean something else: refuse, naming the differences, unless checkpoint.allow_config_change is set."""
    saved_file = run_dir / "config.yaml"
    if cfg.checkpoint.allow_config_change or not saved_file.is_file() or not complete_tags(run_dir):
        return
    try:
        saved = read_yaml(saved_file)
    except (OSError, ConfigError):
        return  # the checkpoints' own loading decides whether this directory is usable
    now = cfg.to_dict()
    diffs = []
    for key in FIXED_ON_RESUME:
        section, name = key.split(".")
        old, new = saved.get(section, {}).get(name), now[section][name]
        if old is not None and old != new:
            diffs.append(f"{key} {old!r} -> {new!r}")
    if diffs:
        raise ConfigError(f"{run_dir} holds a run with other settings ({', '.join(diffs)}): use a new "
                          "checkpoint.run_dir, or --set checkpoint.allow_config_change=true to resume anyway")


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.lock``, held by rank 0 while it trains. The kernel drops it when the
    process dies, however it dies, so a requeue after a crash or SIGKILL is never blocked by a stale lock.

    ``acquire`` creates the run directory (and missing parents) when needed; ``release(undo=True)`` after a start
    that failed removes what ``acquire`` created, so a mistake leaves the directory as it was found. The lock file is
    unlinked while still locked, and ``acquire`` checks that the file it locked is still the one at ``.lock``: a
    process that opened the old file just before the unlink retries rather than share the lock."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fd: int | None = None
        self._created: list[Path] = []  # what acquire made, outermost first

    def acquire(self) -> None:
        self._created = _make_dirs(self.path.parent)
        while True:
            fd, created = _open_lock(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(f"{self.path.parent} is in use by another training process ({holder}): wait "
                                      "for it, stop it, or pick another checkpoint.run_dir") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed it after a failed start: lock the current file instead
        self._created += [self.path] if created else []
        job = slurm_job_id()
        holder = f"host {socket.gethostname()}, pid {os.getpid()}" + (f", SLURM job {job}" if job else "")
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd

    def release(self, undo: bool = False) -> None:
        if self._fd is None:
            return
        for path in reversed(self._created if undo else []):
            with contextlib.suppress(OSError):  # a directory something else wrote into stays
                path.rmdir() if path.is_dir() else path.unlink()
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories it created, outermost first."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    path.mkdir(parents=True, exist_ok=True)
    return missing


def _open_lock(path: Path) -> tuple[int, bool]:
    """The lock file's descriptor, and whether this call created the file."""
    while True:
        with contextlib.suppress(FileExistsError):
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        with contextlib.suppress(FileNotFoundError):  # removed between the two calls: create it then
            return os.open(path, os.O_RDWR), False


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
