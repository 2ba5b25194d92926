"""Save and auto-resume DeepSpeed checkpoints in a run directory, so a killed or requeued run continues its curve.

Layout of ``run_dir``::

    config.yaml              the resolved RunConfig of the run
    step_00001200/           one DeepSpeed checkpoint (every rank writes its shards; DeepSpeed hangs otherwise)
        rank00000.pt         per-rank state DeepSpeed does not keep: RNG states, loader state
        COMPLETE             written by rank 0 once every rank has saved: a tag without it is partial
    latest                   name of the newest complete tag, replaced atomically, written last

Resume walks the complete tags from newest to oldest and loads the first one every rank can read, so a corrupt
newest checkpoint falls back to the previous one with a warning. Our own files load with ``weights_only=True``.
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
        _atomic_write(run_dir / tag / "COMPLETE", b"")
        _atomic_write(run_dir / "latest", tag.encode())
        for old in complete_tags(run_dir)[keep_last:]:
            shutil.rmtree(run_dir / old, ignore_errors=True)
    _barrier()
    return tag


def complete_tags(run_dir: Path) -> list[str]:
    """Complete checkpoint tags, newest first."""
    if not run_dir.is_dir():
        return []
    tags = [p.name for p in run_dir.iterdir() if TAG.match(p.name) and (p / "COMPLETE").exists()]
    return sorted(tags, reverse=True)


def resume(engine, run_dir: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Load the newest readable checkpoint into ``engine``; returns (client_state, rank_state) or None (fresh)."""
    tags = complete_tags(run_dir)
    latest = run_dir / "latest"
    if latest.exists() and latest.read_text().strip() in tags:  # `latest` wins; newer complete tags are no worse
        tags.remove(name := latest.read_text().strip())
        tags.insert(0, name)
    for tag in tags:
        try:
            _, client_state = engine.load_checkpoint(str(run_dir), tag=tag, load_lr_scheduler_states=False)
            ok = client_state is not None
            rank_state = torch.load(run_dir / tag / f"rank{rank:05d}.pt", weights_only=True) if ok else None
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
