"""Save and auto-resume DeepSpeed checkpoints in a run directory, so a killed or requeued run continues its curve.

Layout of ``run_dir``::

    config.yaml              the resolved RunConfig of the run
    .lock                    held (flock) by the rank-0 process training in this directory: a second start is refused
    step_00001200/           one DeepSpeed checkpoint (every rank writes its shards; DeepSpeed hangs otherwise)
        rank00000.pt         per-rank state DeepSpeed does not keep: RNG states, loader position (RunState)
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

What a checkpoint holds beside DeepSpeed's model, optimizer and scheduler state is defined once, by
``pipeline.run_state.RunState``: each part is ``Stateful`` (``state_dict`` / ``load_state_dict``, as torchtitan's
checkpointer takes them), saved under its field's name. A resume on another world size (``pipeline.elastic``) loads
a converted ``<tag>_universal/`` and the parts every rank shares, not the per-rank ones.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from data_loaders.errors import SovitError

from . import distributed, files, progress
from .run_state import RunState

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


def universal_tag(tag: str) -> str:
    """Where ``pipeline.elastic`` puts ``tag`` converted for another world size."""
    return f"{tag}_universal"


def _rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rank{rank:05d}.pt"


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


def save(engine, run_dir: Path, step: int, parts: RunState, rank: int, keep_last: int) -> str:
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
    client_state, rank_state = parts.shared(), parts.per_rank()
    try:
        engine.save_checkpoint(str(run_dir), tag=tag, client_state=client_state, save_latest=False)
        files.replace(_rank_file(run_dir / tag, rank), lambda tmp: torch.save(rank_state, tmp))
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
            progress.write(f"{tag} saved again, replacing the copy that was set aside ({replaced})")
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
        shutil.rmtree(run_dir / universal_tag(old), ignore_errors=True)


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


def set_aside_since(run_dir: Path, step: int, reason: str, rank: int) -> tuple[list[str], list[str]]:
    """Collective: the complete tags of ``step`` and later are set aside for ``reason``. Returns the tags still
    complete and those set aside, newest first."""
    tags = complete_tags(run_dir)
    suspect = [t for t in tags if int(t.removeprefix("step_")) >= step]
    if suspect and rank == 0:
        set_aside(run_dir, dict.fromkeys(suspect, reason))
    distributed.barrier()
    return [t for t in tags if t not in suspect], suspect


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


# ---------------------------------------------------------------------------------------------- resuming


def resume(engine, run_dir: Path, rank: int, parts: RunState) -> bool | None:
    """Load the newest checkpoint every rank can read into ``engine`` and ``parts``. None when the run directory
    holds no checkpoint at all; else whether the resume is exact: False on another world size than the one that
    saved, where only the shared parts are restored (a rank's RNG and loader states have no rank to go to).

    Raises CheckpointError when checkpoints exist but none loads: restarting at step 0 in that directory would
    prune the old tags while ``latest`` still names them."""
    failures: dict[str, str] = {}
    for tag in ordered_tags(run_dir):
        try:
            shared, per_rank = _load(engine, run_dir, tag, rank)
            ok = True
        except Exception as e:  # a corrupt file surfaces as any of pickle/zip/OS/runtime errors
            ok, reason = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if distributed.all_agree(ok):
            _set_aside_unreadable(run_dir, failures, tag, rank)
            parts.load(shared, per_rank)
            return per_rank is not None
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


def _load(engine, run_dir: Path, tag: str, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``tag`` into ``engine`` (its universal conversion, when the engine loads those); the shared states, and this
    rank's own when the tag was saved by this world size."""
    universal = engine.load_universal_checkpoint() and (run_dir / universal_tag(tag)).is_dir()
    load_tag = universal_tag(tag) if universal else tag
    meta = saved_meta(run_dir, tag)
    if not meta:
        raise CheckpointError(f"{run_dir / tag / 'meta.json'} is missing or corrupt")
    check_tag_safe(run_dir / tag)
    if universal:
        check_tag_safe(run_dir / load_tag)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weights_only.*")
        _, shared = engine.load_checkpoint(str(run_dir), tag=load_tag, load_lr_scheduler_states=False)
    if shared is None:
        raise CheckpointError("DeepSpeed found no model state in it")
    if universal:
        _load_buffers(engine.module, run_dir / tag)
    same_world = meta["world_size"] == distributed.world_size()
    return shared, torch.load(_rank_file(run_dir / tag, rank), weights_only=True) if same_world else None


def _set_aside_unreadable(run_dir: Path, failures: dict[str, str], loaded: str, rank: int) -> None:
    """Collective, after a fallback: the tags that did not load are set aside, so the steps re-trained from
    ``loaded`` are saved again and ``latest`` names ``loaded`` meanwhile."""
    if failures and rank == 0:
        set_aside(run_dir, {tag: f"unreadable when resuming: {why}" for tag, why in failures.items()})
        progress.write(f"{', '.join(failures)} set aside (unreadable); resuming from {loaded}, and saving each again "
                       "when training reaches its step")
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
