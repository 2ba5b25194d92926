"""Save and auto-resume DeepSpeed checkpoints in a run directory, so a killed or requeued run continues its curve.

Layout of ``run_dir``::

    config.yaml              the resolved RunConfig of the run
    .lock                    held (flock) by the rank-0 process training in this directory: a second start is refused
    step_00001200/           one DeepSpeed checkpoint (every rank writes its shards; DeepSpeed hangs otherwise)
        rank00000.pt         per-rank state DeepSpeed does not keep: RNG states, loader state
        meta.json            the world size and ZeRO stage that wrote it (elastic resume reads them first)
        COMPLETE             written by rank 0 once every rank has saved: a tag without it is partial
    SET_ASIDE            instead of COMPLETE in a tag that must not be used, saying why (see below)
    latest                   name of the newest complete tag, replaced atomically, written last

A complete tag is never written again: a crash during a save can only damage the tag being written, which is
not yet COMPLETE and is removed. Resume walks the complete tags from newest to oldest and loads the first one
every rank can read, so a corrupt newest checkpoint falls back to the previous one with a warning; when tags
exist but none loads, it is an error that names each tag and why, never a silent restart at step 0.

A tag that must not be used is *set aside*: one that did not load when a resume fell back past it, or one saved
after the last finite loss of a run whose loss became NaN. Its COMPLETE marker goes and a ``SET_ASIDE`` file says
why, after ``latest`` has moved to the newest tag still complete (or gone): resume, export and ``latest`` pass it
over, and when training reaches that step again the save replaces it and says so. So a relaunch never re-trains
the same steps twice, and ``latest`` only ever names a tag that loaded or was just written.

Foreign code: a checkpoint is a pickle, and DeepSpeed loads its files with ``weights_only=False``. Before any
file is opened for real, ``check_safe`` lists the globals its pickle would import (without running them) and
refuses anything beyond tensors, containers and a few DeepSpeed value classes.

Elastic resume: ZeRO partitions optimizer state per rank, so a checkpoint written by N ranks cannot be loaded by
M != N directly. ``prepare_elastic`` (called before the engine exists, because DeepSpeed reads ``load_universal``
at initialize) converts the newest checkpoint with DeepSpeed's ``ds_to_universal`` into ``<tag>_universal/`` and
the engine then loads that. Weights and optimizer state carry over exactly; per-rank RNG and loader states do
not (there is no rank-to-rank mapping), so an elastic resume continues the curve but is not bitwise exact.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from data_loaders.errors import SovitError

from . import distributed, files
from .runtime import slurm_job_id

TAG = re.compile(r"^step_(\d{8})$")
SET_ASIDE = "SET_ASIDE"
# The only non-tensor classes DeepSpeed's checkpoint files hold (measured at ZeRO 0-3, bf16/fp16/fp32, universal)
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "torch.amp.grad_scaler.GradScaler",
})


class CheckpointError(SovitError):
    """A checkpoint problem the user must act on; the message is one line naming the path and the fix."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------- safe loading


def check_safe(path: Path) -> None:
    """Refuse a pickle that would import anything but tensors, containers and DeepSpeed's value classes."""
    try:
        found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as e:  # not a zip checkpoint, truncated, or not a file at all
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    foreign = sorted(found - DEEPSPEED_GLOBALS)
    if foreign:
        raise CheckpointError(f"{path} holds foreign objects ({', '.join(foreign)}); refusing to load it: a "
                              "checkpoint this pipeline wrote holds only tensors and DeepSpeed's own state")


def check_tag_safe(tag_dir: Path) -> None:
    for f in sorted(tag_dir.rglob("*.pt")):
        check_safe(f)


def safe_load(path: Path) -> Any:
    """``torch.load`` of a file ``check_safe`` accepts, with DeepSpeed's few value classes allowed."""
    check_safe(path)
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        # this rank's own device only (distributed.init made it current): a resume where a node shows fewer GPUs, at
        # the same world size, has no state for the others to restore
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if torch.is_tensor(state["cuda"]) and torch.cuda.is_available():  # CPU checkpoints hold none ([] before)
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- the run lock


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


# ---------------------------------------------------------------------------------------------- saving


def _disk_error(run_dir: Path, tag: str, error: BaseException, needed: int) -> CheckpointError:
    """Measured once the partial tag is gone: the space a rerun will have."""
    free = files.free_mib(run_dir, error)
    return CheckpointError(f"could not save checkpoint {tag} in {run_dir}: {needed / 2**20:.1f} MiB needed, "
                           f"{free:.1f} MiB free ({files.describe(error)}); free space or move checkpoint.run_dir, "
                           "then rerun the same command to resume")


def _expected_bytes(engine, client_state: dict[str, Any]) -> int:
    """What a first checkpoint takes: fp32 weights and two Adam moments (12 bytes a parameter, whatever the ZeRO
    stage: the stages split it across ranks), plus the client state's tensors (the EMA copy)."""
    params = sum(p.numel() for p in engine.module.parameters())
    tensors = [v for v in _leaves(client_state) if isinstance(v, torch.Tensor)]
    return 12 * params + sum(t.numel() * t.element_size() for t in tensors)


def _leaves(x: Any):
    if isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    else:
        yield x


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def save(engine, run_dir: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any], rank: int,
         keep_last: int) -> str:
    """Collective: every rank must call it at the same step. A tag that is already complete is left alone."""
    tag = tag_for(step)
    tag_dir = run_dir / tag
    if (tag_dir / "COMPLETE").exists():  # same step saved before (e.g. a resumed run that stops at once)
        return tag
    replaced = set_aside_reason(run_dir, tag) if rank == 0 else None
    if rank == 0 and tag_dir.exists():  # partial (a crash mid-save) or set aside: never mix old and new shards
        shutil.rmtree(tag_dir)
    distributed.barrier()
    failure: BaseException | None = None
    try:
        engine.save_checkpoint(str(run_dir), tag=tag, client_state=client_state, save_latest=False)
        files.replace(tag_dir / f"rank{rank:05d}.pt", lambda tmp: torch.save(rank_state, tmp))
    except (OSError, RuntimeError, files.WriteError) as e:  # ENOSPC: a RuntimeError from torch's zip writer
        failure = e
    if distributed.any_rank(failure is not None):
        previous = complete_tags(run_dir)
        needed = _tree_bytes(run_dir / previous[0]) if previous else _expected_bytes(engine, client_state)
        distributed.barrier()
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        distributed.barrier()  # every rank measures the free space once the partial tag is gone
        raise _disk_error(run_dir, tag, failure or OSError("another rank failed to save"), needed)
    if rank == 0:
        _complete(engine, run_dir, tag, keep_last)
        if replaced:
            _say(f"{tag} saved again, replacing the copy that was set aside ({replaced})")
    distributed.barrier()
    return tag


def _complete(engine, run_dir: Path, tag: str, keep_last: int) -> None:
    """Rank 0, once every rank has saved: the tag's meta and COMPLETE, then ``latest``, then pruning."""
    meta = {"world_size": distributed.world_size(), "zero_stage": engine.zero_optimization_stage()}
    files.write_json(run_dir / tag / "meta.json", meta)
    files.write_bytes(run_dir / tag / "COMPLETE", b"")
    files.write_text(run_dir / "latest", tag)
    for old in complete_tags(run_dir)[keep_last:]:
        shutil.rmtree(run_dir / old, ignore_errors=True)
        shutil.rmtree(run_dir / f"{old}_universal", ignore_errors=True)


def set_aside(run_dir: Path, reasons: dict[str, str]) -> None:
    """Rank 0: the tags of ``reasons`` stop being checkpoints (see the module docstring). ``latest`` moves first, so
    at no moment does it name a tag without COMPLETE; a crash in between leaves a tag that is merely still complete."""
    tags = list(reasons)
    for tag, reason in reasons.items():
        files.write_text(run_dir / tag / SET_ASIDE, reason)
    remaining = [t for t in complete_tags(run_dir) if t not in tags]
    if remaining:
        files.write_text(run_dir / "latest", remaining[0])
    else:
        (run_dir / "latest").unlink(missing_ok=True)
    for tag in tags:
        (run_dir / tag / "COMPLETE").unlink(missing_ok=True)


def _say(line: str) -> None:
    """A line on stdout that does not break the trainer's progress bar (on stderr)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def set_aside_reason(run_dir: Path, tag: str) -> str | None:
    """Why ``tag`` was set aside, or None when it was not."""
    try:
        return (run_dir / tag / SET_ASIDE).read_text().strip() or "no reason given"
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- finding tags


def complete_tags(run_dir: Path) -> list[str]:
    """Complete checkpoint tags, newest first."""
    if not run_dir.is_dir():
        return []
    tags = [p.name for p in run_dir.iterdir() if TAG.match(p.name) and (p / "COMPLETE").exists()]
    return sorted(tags, reverse=True)


def ordered_tags(run_dir: Path) -> list[str]:
    """Complete tags to try, best first: the one ``latest`` names, then the others newest first."""
    tags = complete_tags(run_dir)
    latest = run_dir / "latest"
    name = latest.read_text().strip() if latest.is_file() else ""
    if name in tags:  # `latest` wins; newer complete tags are no worse
        tags.remove(name)
        tags.insert(0, name)
    return tags


def saved_meta(run_dir: Path, tag: str) -> dict[str, Any]:
    """The tag's meta.json, or {} when it is missing or unreadable (treated like any other corruption)."""
    try:
        meta = json.loads((run_dir / tag / "meta.json").read_text())
        return meta if isinstance(meta, dict) and isinstance(meta.get("world_size"), int) else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------- elastic resume


def prepare_elastic(run_dir: Path, world_size: int, rank: int) -> bool:
    """Collective. True when the newest checkpoint was written by another world size with partitioned optimizer
    state: rank 0 has converted it to a universal checkpoint and the engine must load with ``load_universal``."""
    tags = ordered_tags(run_dir)
    if not tags:
        return False
    tag = tags[0]
    saved = saved_meta(run_dir, tag).get("world_size")
    partitioned = any((run_dir / tag).glob("*optim_states.pt"))
    if saved in (None, world_size) or not partitioned:
        return False  # same world, or a stage-0 checkpoint whose optimizer state is whole on every rank
    out = run_dir / f"{tag}_universal"
    failure = None
    if rank == 0 and not out.is_dir():
        print(f"{tag} was written by {saved} rank(s), resuming on {world_size}: converting it to a DeepSpeed "
              f"universal checkpoint in {out}", flush=True)
        try:
            check_tag_safe(run_dir / tag)
            to_universal(run_dir / tag, out)
        except (CheckpointError, files.WriteError) as e:  # a full disk, too, is one line on every rank
            failure = e
    if distributed.any_rank(failure is not None):
        raise failure or CheckpointError(f"rank 0 could not convert {run_dir / tag} to a universal checkpoint")
    return True


def universal_args(src: Path, out: Path):
    """DeepSpeed's converter arguments, parsed by its own command-line parser: when a DeepSpeed release renames or
    drops a flag we rely on, this fails loudly here instead of converting with a silently different meaning."""
    from deepspeed.checkpoint import ds_to_universal

    argv = ["ds_to_universal", "--input_folder", str(src), "--output_folder", str(out), "--num_extract_workers",
            "1", "--num_merge_workers", "1", "--inject_missing_state"]
    try:
        with mock.patch.object(sys, "argv", argv), contextlib.redirect_stderr(sys.stdout):
            args = ds_to_universal.parse_arguments()
    except SystemExit:
        raise RuntimeError(f"DeepSpeed's ds_to_universal no longer accepts {argv[1:]}: update "
                           "checkpoint.universal_args for the installed DeepSpeed") from None
    expected = {"input_folder": str(src), "output_folder": str(out), "num_extract_workers": 1,
                "num_merge_workers": 1, "inject_missing_state": True, "strict": True, "keep_temp_folder": False}
    changed = {k: getattr(args, k, "<missing>") for k, v in expected.items() if getattr(args, k, "<missing>") != v}
    if changed:
        raise RuntimeError(f"DeepSpeed's ds_to_universal arguments changed meaning: {changed}; update "
                           "checkpoint.universal_args for the installed DeepSpeed")
    return args


def to_universal(src: Path, out: Path) -> None:
    """DeepSpeed's converter into a temporary folder, renamed when done: a crash never leaves half a conversion."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = universal_args(src, files.temporary(out))  # checked before anything is written
    files.replace(out, lambda tmp: ds_to_universal(args))


def elastic_batch(batch: int, saved_accum: int, accum: int) -> int:
    """The micro-batch position of an elastic resume: the same optimizer steps of the epoch are done, counted in the
    new world's micro-batches (``saved_accum`` micro-batches made one step before, ``accum`` make one now)."""
    return batch // saved_accum * accum


# ---------------------------------------------------------------------------------------------- resuming


def resume(engine, run_dir: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """Load the newest readable checkpoint into ``engine``; returns (client_state, rank_state), or None when the run
    directory holds no checkpoint at all. ``rank_state`` is None after an elastic resume (another world size).

    Raises CheckpointError when checkpoints exist but none loads: restarting at step 0 in that directory would
    prune the old tags while ``latest`` still names them."""
    world = distributed.world_size()
    failures: dict[str, str] = {}
    for tag in ordered_tags(run_dir):
        universal = engine.load_universal_checkpoint() and (run_dir / f"{tag}_universal").is_dir()
        load_tag = f"{tag}_universal" if universal else tag
        client_state = rank_state = None
        try:
            meta = saved_meta(run_dir, tag)
            if not meta:
                raise CheckpointError(f"{run_dir / tag / 'meta.json'} is missing or corrupt")
            check_tag_safe(run_dir / tag)
            if universal:
                check_tag_safe(run_dir / load_tag)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*weights_only.*")
                _, client_state = engine.load_checkpoint(str(run_dir), tag=load_tag, load_lr_scheduler_states=False)
            if client_state is None:
                raise CheckpointError("DeepSpeed found no model state in it")
            if universal:
                _load_buffers(engine.module, run_dir / tag)
            if meta["world_size"] == world:
                rank_state = torch.load(run_dir / tag / f"rank{rank:05d}.pt", weights_only=True)
            ok = True
        except Exception as e:  # a corrupt file surfaces as any of pickle/zip/OS/runtime errors
            ok, reason = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if distributed.all_agree(ok):
            _set_aside_unreadable(run_dir, failures, tag, rank)
            return client_state, rank_state
        if ok:
            reason = "unreadable on another rank"
        failures[tag] = reason
        warnings.warn(f"checkpoint {run_dir / tag} is unreadable on rank {rank} ({reason}); falling back to the "
                      "previous one", stacklevel=2)
    if failures:
        raise CheckpointError(f"{run_dir} holds checkpoints but none loads: "
                              f"{'; '.join(f'{t} ({r})' for t, r in failures.items())}. Nothing was changed; to "
                              "start over, pick a new checkpoint.run_dir")
    return None


def _set_aside_unreadable(run_dir: Path, failures: dict[str, str], loaded: str, rank: int) -> None:
    """Collective, after a fallback: the tags that did not load are set aside, so the steps re-trained from
    ``loaded`` are saved again and ``latest`` names ``loaded`` meanwhile."""
    if failures and rank == 0:
        set_aside(run_dir, {tag: f"unreadable when resuming: {why}" for tag, why in failures.items()})
        _say(f"{', '.join(failures)} set aside (unreadable); resuming from {loaded}, and saving each again when "
             "training reaches its step")
    if failures:
        distributed.barrier()


def _load_buffers(module: torch.nn.Module, tag_dir: Path) -> None:
    """A universal checkpoint carries parameters and optimizer state only: BatchNorm statistics (and any other
    buffer) come from the original tag's model states, or an elastic resume would restart them from scratch."""
    saved = safe_load(sorted(tag_dir.glob("*model_states.pt"))[0]).get("module") or {}
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in saved:
                buf.copy_(saved[name])


# ---------------------------------------------------------------------------------------------- export


def consolidated_state_dict(run_dir: Path, tag: str | None = None, ema: bool = False) -> dict[str, torch.Tensor]:
    """The fp32 weights (or the EMA's) of ``tag``, else of the checkpoint ``latest`` names, whatever the ZeRO stage.

    Without ``tag``, an unreadable newest checkpoint is an error that names it and the newest one that reads: using
    an older one silently would hand out weights the user did not ask for. Newer tags that were set aside are named
    in a warning. ZeRO 1-3 checkpoints are consolidated with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
    (the fp32 master weights); stage 0 checkpoints hold the whole module already."""
    candidates = [tag] if tag else ordered_tags(run_dir)
    if not candidates:
        raise CheckpointError(f"{run_dir} has no complete checkpoint: expected a run directory written by the "
                              "trainer (step_*/COMPLETE)")
    failures = []
    for name in candidates:
        try:
            weights = _consolidate(run_dir, name, ema)
        except (CheckpointError, OSError, RuntimeError, KeyError, ValueError) as e:
            failures.append(f"{name} ({str(e).splitlines()[0][:200]})")
            continue
        if failures:
            raise CheckpointError(f"{run_dir}'s newest checkpoint is unreadable: {'; '.join(failures)}; {name} reads: "
                                  f"pass --tag {name} to use it, or resume the run, which saves the newer steps again")
        _warn_set_aside_newer(run_dir, name)
        return weights
    raise CheckpointError(f"no checkpoint of {run_dir} could be read: {'; '.join(failures)}")


def _warn_set_aside_newer(run_dir: Path, tag: str) -> None:
    newer = sorted(p.name for p in run_dir.glob("step_*") if TAG.match(p.name) and p.name > tag
                   and set_aside_reason(run_dir, p.name) is not None)
    if newer:
        warnings.warn(f"{run_dir}: reading {tag}; newer {', '.join(newer)} set aside "
                      f"({set_aside_reason(run_dir, newer[-1])})", stacklevel=3)


def _consolidate(run_dir: Path, tag: str, ema: bool) -> dict[str, torch.Tensor]:
    tag_dir = run_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir} does not exist")
    check_tag_safe(tag_dir)  # get_fp32_state_dict_from_zero_checkpoint opens the optimizer states too
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model states")
    states = safe_load(files[0])
    if ema:
        ema_state = states.get("ema")  # the training loop's client state sits at the top level
        if ema_state is None:
            raise CheckpointError(f"{tag_dir} holds no EMA weights (ema.enabled was false)")
        sd = {k.removeprefix("module."): v for k, v in ema_state.items()}
    elif _zero_stage(states) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weights_only.*")
            sd = get_fp32_state_dict_from_zero_checkpoint(str(run_dir), tag=tag)
        sd.update({k: v for k, v in (states.get("module") or {}).items() if k not in sd})  # buffers (BN statistics)
    else:
        sd = states["module"]
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}


def _zero_stage(states: dict) -> int:
    cfg = states.get("ds_config") or {}
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
