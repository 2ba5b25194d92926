"""The loader contract and what its three implementations share: sharding, eval geometry, input checks.

A ``Loader`` yields ``(images, labels)``: images float32 NCHW normalised with ``cfg.mean``/``cfg.std`` on
``device``, labels int64. ``len()`` is the number of batches this rank yields per epoch. ``set_epoch(epoch,
start_batch)`` picks the epoch (its order is a function of ``cfg.seed`` and ``epoch`` only) and skips the
``start_batch`` batches a resumed run already consumed.

Sharding: train ranks each take an equal slice of the epoch's permutation and drop the remainder, so every rank
runs the same number of steps (DeepSpeed's collectives deadlock otherwise); val ranks take contiguous disjoint
slices and keep the partial last batch, so every sample is scored exactly once across ranks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from pipeline.config import DataConfig

Split = Literal["train", "val"]


class Loader(Protocol):
    classes: list[str]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...


def split_path(cfg: DataConfig, split: Split) -> Path:
    path = cfg.train if split == "train" else cfg.val
    if not path:
        raise ValueError(f"data.{split} is not set: expected the {split} split's path "
                         f"({'a .beton file' if cfg.loader == 'ffcv' else 'an ImageFolder directory'})")
    if not Path(path).exists():
        raise ValueError(f"data.{split}={path!r} does not exist: check the path (loader {cfg.loader!r})")
    return Path(path)


def check_num_classes(classes: list[str], expected: int | None, source: Path | str) -> None:
    if expected is not None and len(classes) != expected:
        raise ValueError(f"{source} has {len(classes)} classes but model.num_classes={expected}: set "
                         f"model.num_classes={len(classes)} or point data at the right dataset")


def eval_resize(cfg: DataConfig) -> int:
    """Shorter side before the centre crop: 224 / 0.875 = 256, as DeiT and timm evaluate."""
    return int(cfg.img_size / cfg.crop_pct)


def rank_indices(n: int, split: Split, rank: int, world_size: int, batch_size: int, seed: int,
                 epoch: int) -> np.ndarray:
    """The dataset indices this rank visits in ``epoch``, in order (see the module docstring)."""
    if split == "val":
        return np.arange(rank * n // world_size, (rank + 1) * n // world_size)
    per_rank = (n // world_size) // batch_size * batch_size
    if per_rank == 0:
        raise ValueError(f"train split has {n} images: too few for {world_size} rank(s) x micro-batch {batch_size}; "
                         "lower data.micro_batch_size or use more data")
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[rank * per_rank:(rank + 1) * per_rank]


def num_batches(n_indices: int, batch_size: int, split: Split) -> int:
    return n_indices // batch_size if split == "train" else -(-n_indices // batch_size)


def read_sidecar(beton: Path) -> dict:
    sidecar = beton.with_name(beton.name + ".json")
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{sidecar} is missing or unreadable ({type(e).__name__}): it holds the class list; "
                         f"re-create it with python -m data_loaders.convert") from None
