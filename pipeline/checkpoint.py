"""Save and auto-resume DeepSpeed checkpoints in a run directory, so a killed or requeued run continues its curve.

Layout of ``run_dir``::

    config.yaml              the resolved RunConfig of the run
    step_00001200/           one DeepSpeed checkpoint (every rank writes its shards; DeepSpeed hangs otherwise)
        rank00000.pt         per-rank state DeepSpeed does not keep: RNG states, loader state
        meta.json            the world size and ZeRO stage that wrote it (elastic resume reads them first)
        COMPLETE             written by rank 0 once every rank has saved: a tag without it is partial
    latest                   name of the newest complete tag, replaced atomically, written last

Resume walks the complete tags from newest to oldest and loads the first one every rank can read, so a corrupt
newest checkpoint falls back to the previous one with a warning. Our own files load with ``weights_only=True``.

Elastic resume: ZeRO partitions optimizer state per rank, so a checkpoint written by N ranks cannot be loaded by
M != N directly. ``prepare_elastic`` (called before the engine exists, because DeepSpeed reads ``load_universal``
at initialize) converts the newest checkpoint with DeepSpeed's ``ds_to_universal`` into ``<tag>_universal/`` and
the engine then loads that. Weights and optimizer state carry over exactly; per-rank RNG and loader states do
not (there is no rank-to-rank mapping), so an elastic resume continues the curve but is not bitwise exact.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, run_dir: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any], rank: int,
         keep_last: int) -> str:
    """Collective: every rank must call it at the same step."""
    tag = tag_for(step)
    engine.save_checkpoint(str(run_dir), tag=tag, client_state=client_state, save_latest=False)
    buf = run_dir / tag / f"rank{rank:05d}.pt"
    tmp = buf.with_name(f".{buf.name}.tmp")
    torch.save(rank_state, tmp)
    tmp.replace(buf)
    _barrier()
    if rank == 0:
        meta = {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "zero_stage": engine.zero_optimization_stage()}
        _atomic_write(run_dir / tag / "meta.json", json.dumps(meta).encode())
        _atomic_write(run_dir / tag / "COMPLETE", b"")
        _atomic_write(run_dir / "latest", tag.encode())
        for old in complete_tags(run_dir)[keep_last:]:
            shutil.rmtree(run_dir / old, ignore_errors=True)
            shutil.rmtree(run_dir / f"{old}_universal", ignore_errors=True)
    _barrier()
    return tag


def complete_tags(run_dir: Path) -> list[str]:
    """Complete checkpoint tags, newest first."""
    if not run_dir.is_dir():
        return []
    tags = [p.name for p in run_dir.iterdir() if TAG.match(p.name) and (p / "COMPLETE").exists()]
    return sorted(tags, reverse=True)


def _ordered_tags(run_dir: Path) -> list[str]:
    tags = complete_tags(run_dir)
    latest = run_dir / "latest"
    if latest.exists() and latest.read_text().strip() in tags:  # `latest` wins; newer complete tags are no worse
        tags.remove(name := latest.read_text().strip())
        tags.insert(0, name)
    return tags


def saved_world_size(run_dir: Path, tag: str) -> int | None:
    meta = run_dir / tag / "meta.json"
    return json.loads(meta.read_text())["world_size"] if meta.exists() else None


def prepare_elastic(run_dir: Path, world_size: int, rank: int) -> bool:
    """Collective. True when the newest checkpoint was written by another world size with partitioned optimizer
    state: rank 0 has converted it to a universal checkpoint and the engine must load with ``load_universal``."""
    tags = _ordered_tags(run_dir)
    if not tags:
        return False
    tag = tags[0]
    saved = saved_world_size(run_dir, tag)
    partitioned = any((run_dir / tag).glob("*optim_states.pt"))
    if saved in (None, world_size) or not partitioned:
        return False  # same world, or a stage-0 fp32 checkpoint whose optimizer state is whole on every rank
    out = run_dir / f"{tag}_universal"
    if rank == 0 and not out.is_dir():
        print(f"{tag} was written by {saved} rank(s), resuming on {world_size}: converting it to a DeepSpeed "
              f"universal checkpoint in {out}", flush=True)
        _to_universal(run_dir / tag, out)
    _barrier()
    return True


def _to_universal(src: Path, out: Path) -> None:
    """DeepSpeed's converter into a temporary folder, renamed when done: a crash never leaves half a conversion."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds_to_universal(argparse.Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=1,
                                       num_merge_workers=1, keep_temp_folder=False, strict=True,
                                       inject_missing_state=True))
    tmp.rename(out)


def resume(engine, run_dir: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """Load the newest readable checkpoint into ``engine``; returns (client_state, rank_state) or None (fresh).

    ``rank_state`` is None after an elastic resume (another world size wrote the checkpoint)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    for tag in _ordered_tags(run_dir):
        universal = engine.load_universal_checkpoint() and (run_dir / f"{tag}_universal").is_dir()
        try:
            _, client_state = engine.load_checkpoint(str(run_dir), tag=f"{tag}_universal" if universal else tag,
                                                     load_lr_scheduler_states=False)
            ok = client_state is not None
            same_world = saved_world_size(run_dir, tag) in (None, world)
            rank_state = torch.load(run_dir / tag / f"rank{rank:05d}.pt", weights_only=True) \
                if ok and same_world else None
        except Exception as e:  # a corrupt file surfaces as any of pickle/zip/OS/runtime errors
            ok, rank_state, client_state = False, None, None
            warnings.warn(f"checkpoint {run_dir / tag} is unreadable on rank {rank} ({type(e).__name__}: {e}); "
                          "falling back to the previous one", stacklevel=2)
        flag = torch.tensor([1 if ok else 0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item():
            return client_state, rank_state
        if ok:
            warnings.warn(f"checkpoint {run_dir / tag} is unreadable on another rank; falling back", stacklevel=2)
    return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    _atomic_write(path, json.dumps(data, indent=1, default=str).encode())
