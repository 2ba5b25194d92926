"""Save and auto-resume DeepSpeed checkpoints in a run directory, so a killed or requeued run continues its curve.

Layout of ``run_dir``::

    config.yaml              the resolved RunConfig of the run
    .lock                    held (flock) by the rank-0 process training in this directory: a second start is refused
    step_00001200/           one DeepSpeed checkpoint (every rank writes its shards; DeepSpeed hangs otherwise)
        rank00000.pt         per-rank state DeepSpeed does not keep: RNG states, loader state
        meta.json            the world size and ZeRO stage that wrote it (elastic resume reads them first)
        COMPLETE             written by rank 0 once every rank has saved: a tag without it is partial
    latest                   name of the newest complete tag, replaced atomically, written last

A complete tag is never written again: a crash during a save can only damage the tag being written, which is
not yet COMPLETE and is removed. Resume walks the complete tags from newest to oldest and loads the first one
every rank can read, so a corrupt newest checkpoint falls back to the previous one with a warning; when tags
exist but none loads, it is an error that names each tag and why, never a silent restart at step 0.

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

from . import distributed

TAG = re.compile(r"^step_(\d{8})$")
# The only non-tensor classes DeepSpeed's checkpoint files hold (measured at ZeRO 0-3, bf16/fp16/fp32, universal)
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "torch.amp.grad_scaler.GradScaler",
})


class CheckpointError(RuntimeError):
    """A checkpoint problem the user must act on; the message is one line naming the path and the fix."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=1, default=str).encode())


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
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- the run lock


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.lock``, held by rank 0 while it trains. The kernel drops it when the
    process dies, however it dies, so a requeue after a crash or SIGKILL is never blocked by a stale lock."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(f"{self.path.parent} is in use by another training process ({holder}): wait for "
                                  "it, stop it, or pick another checkpoint.run_dir") from None
        job = os.environ.get("SLURM_JOB_ID")
        holder = f"host {socket.gethostname()}, pid {os.getpid()}" + (f", SLURM job {job}" if job else "")
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


# ---------------------------------------------------------------------------------------------- saving


def _disk_error(run_dir: Path, tag: str, error: BaseException, needed: int) -> CheckpointError:
    free = shutil.disk_usage(run_dir).free
    return CheckpointError(f"could not save checkpoint {tag} in {run_dir}: {needed / 2**20:.1f} MiB needed, "
                           f"{free / 2**20:.1f} MiB free ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
                           "; free space or move checkpoint.run_dir, then rerun the same command to resume")


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
    if rank == 0 and tag_dir.exists():  # a partial tag from a crash mid-save: never mix old and new shards
        shutil.rmtree(tag_dir)
    distributed.barrier()
    failure: BaseException | None = None
    try:
        engine.save_checkpoint(str(run_dir), tag=tag, client_state=client_state, save_latest=False)
        buf = tag_dir / f"rank{rank:05d}.pt"
        tmp = buf.with_name(f".{buf.name}.tmp")
        torch.save(rank_state, tmp)
        tmp.replace(buf)
    except (OSError, RuntimeError) as e:  # ENOSPC surfaces as RuntimeError from torch's zip writer
        failure = e
    if distributed.any_rank(failure is not None):
        previous = complete_tags(run_dir)
        needed = _tree_bytes(run_dir / previous[0]) if previous else _expected_bytes(engine, client_state)
        distributed.barrier()
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        raise _disk_error(run_dir, tag, failure or OSError("another rank failed to save"), needed)
    if rank == 0:
        meta = {"world_size": distributed.world_size(), "zero_stage": engine.zero_optimization_stage()}
        write_json(tag_dir / "meta.json", meta)
        atomic_write(tag_dir / "COMPLETE", b"")
        atomic_write(run_dir / "latest", tag.encode())
        for old in complete_tags(run_dir)[keep_last:]:
            shutil.rmtree(run_dir / old, ignore_errors=True)
            shutil.rmtree(run_dir / f"{old}_universal", ignore_errors=True)
    distributed.barrier()
    return tag


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
        except CheckpointError as e:
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

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds_to_universal(universal_args(src, tmp))
    tmp.rename(out)


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
    failures: list[str] = []
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
            return client_state, rank_state
        if ok:
            reason = "unreadable on another rank"
        failures.append(f"{tag} ({reason})")
        warnings.warn(f"checkpoint {run_dir / tag} is unreadable on rank {rank} ({reason}); falling back to the "
                      "previous one", stacklevel=2)
    if failures:
        raise CheckpointError(f"{run_dir} holds checkpoints but none loads: {'; '.join(failures)}. Nothing was "
                              "changed; to start over, pick a new checkpoint.run_dir")
    return None


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
    """The fp32 weights (or the EMA's) of ``tag``, else of the newest checkpoint that loads, whatever the ZeRO stage.

    ZeRO 1-3 checkpoints are consolidated with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (the fp32
    master weights); stage 0 checkpoints hold the whole module already."""
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
            warnings.warn(f"{run_dir}: {'; '.join(failures)} unreadable, read {name} instead", stacklevel=2)
        return weights
    raise CheckpointError(f"no checkpoint of {run_dir} could be read: {'; '.join(failures)}")


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
