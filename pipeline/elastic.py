"""Resuming on another world size. ZeRO partitions optimizer state per rank, so a checkpoint written by N ranks
cannot be loaded by M != N directly. ``prepare_elastic`` (called before the engine exists, because DeepSpeed reads
``load_universal`` at initialize) converts the newest checkpoint with DeepSpeed's ``ds_to_universal`` into
``<tag>_universal/``, and ``checkpoint.resume`` then loads that. Weights and optimizer state carry over exactly;
per-rank RNG and loader states do not (there is no rank-to-rank mapping), so an elastic resume continues the curve
but is not bitwise exact.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from unittest import mock

from . import distributed, files
from .checkpoint import CheckpointError, check_tag_safe, ordered_tags, saved_meta, universal_tag


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
    out = run_dir / universal_tag(tag)
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
                           "elastic.universal_args for the installed DeepSpeed") from None
    expected = {"input_folder": str(src), "output_folder": str(out), "num_extract_workers": 1,
                "num_merge_workers": 1, "inject_missing_state": True, "strict": True, "keep_temp_folder": False}
    changed = {k: getattr(args, k, "<missing>") for k, v in expected.items() if getattr(args, k, "<missing>") != v}
    if changed:
        raise RuntimeError(f"DeepSpeed's ds_to_universal arguments changed meaning: {changed}; update "
                           "elastic.universal_args for the installed DeepSpeed")
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


