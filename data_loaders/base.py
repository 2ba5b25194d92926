"""The loader contract and what its three implementations share: sharding, position, eval geometry, input checks.

What the trainer may rely on, for every backend (``ffcv``, ``dali``, ``torchvision``):

- Iterating yields ``(images, labels)``: images float32 NCHW normalised with ``cfg.mean``/``cfg.std`` on
  ``device``, labels int64. One iteration yields the rest of the current epoch, from the current position, and
  then moves the position to the start of the next epoch.
- ``len()`` is the number of batches this rank yields per epoch; in train it is equal on every rank.
- ``set_epoch(epoch, start_batch=0)`` moves the position. The epoch's samples and their order are a function of
  ``(cfg.seed, epoch, rank, world_size)`` only, identical across backends (FFCV on one process with
  ``os_cache=False`` keeps its page-aware order); ``start_batch`` skips the batches a resumed run already consumed,
  without decoding them. Setting the position the loader already has is a no-op.
- ``state_dict()`` is a small picklable dict, at least ``{"epoch", "batch"}``: the position after the last batch
  yielded. ``load_state_dict(state)`` continues exactly there: the same samples in the same order, and, for
  torchvision (RNGs seeded per sample) and DALI (its own pipeline checkpoint), the same augmentation draws. FFCV
  draws crops and flips from an unseeded numba RNG, so only its samples are exact. A state saved by another
  backend restores its position; keys a backend does not know are ignored.
- A batch may live in buffers the loader reuses (FFCV cycles through a few): use or copy it before holding on to it.
- Val yields what timm's standard eval transform (``resolve_data_config`` + ``create_transform``) makes of the
  original images, so a run's top-1 is timm's number: torchvision applies it, ``dali`` reads val through the
  torchvision loader, ``ffcv`` reads a .beton of its crops (``convert --eval-size``; a .beton of resized images
  comes close, with a warning).

Sharding: train ranks each take an equal slice of the epoch's permutation and drop the remainder, so every rank
runs the same number of steps (DeepSpeed's collectives deadlock otherwise); val ranks take contiguous disjoint
slices and keep the partial last batch, so every sample is scored exactly once across ranks.

Errors: every problem with the data (a missing path, a damaged file, classes that disagree with the model or
with the train split, too few images) is a ``DataError``; an unset or invalid config key is a ``ConfigError``.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from .config import DataConfig
from .errors import DataError
from .splits import Split

Batch = tuple[torch.Tensor, torch.Tensor]


class Loader(Protocol):
    classes: list[str]

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LoaderBase:
    """The position bookkeeping of the contract; a backend implements ``_batches(epoch, start_batch)``."""

    classes: list[str]
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already yielded
    _len: int

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Batch]:
        if self.batch < self._len:
            for batch in self._batches(self.epoch, self.batch):
                self.batch += 1  # before the yield: a state_dict() taken while the trainer holds it counts it
                yield batch
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.batch = epoch, start_batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"], state["batch"])


def num_workers(cfg: DataConfig) -> int:
    """``data.workers``, capped at the cores this process may use. More only oversubscribes the cores (and FFCV's
    numba refuses it with a long thread error), while the batches do not depend on the worker count: a warning
    keeps a job that waited in a queue running at full speed instead of failing it over a speed setting."""
    cores = len(os.sched_getaffinity(0))
    if cfg.workers <= cores:
        return cfg.workers
    warnings.warn(f"data.workers={cfg.workers} exceeds the {cores} cores this process may use: using {cores}; set "
                  f"data.workers<={cores} or give each rank more cores (--cpus-per-task)", stacklevel=2)
    return cores


def rank_indices(n: int, split: Split, rank: int, world_size: int, batch_size: int, seed: int,
                 epoch: int) -> np.ndarray:
    """The dataset indices this rank visits in ``epoch``, in order (see the module docstring)."""
    if split == "val":
        return np.arange(rank * n // world_size, (rank + 1) * n // world_size)
    per_rank = (n // world_size) // batch_size * batch_size
    if per_rank == 0:
        raise DataError(f"train split has {n} images: too few for {world_size} rank(s) x micro-batch {batch_size}; "
                        "lower data.micro_batch_size or use more data")
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[rank * per_rank:(rank + 1) * per_rank]


def num_batches(n_indices: int, batch_size: int, split: Split) -> int:
    return n_indices // batch_size if split == "train" else -(-n_indices // batch_size)
