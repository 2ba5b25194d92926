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

import json
import os
import warnings
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from pipeline.config import ConfigError, DataConfig

Split = Literal["train", "val"]
Batch = tuple[torch.Tensor, torch.Tensor]


class DataError(ValueError):
    """A problem with the data, not the code: one line that names the bad path or value and the fix."""


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


def split_path(cfg: DataConfig, split: Split) -> Path:
    path = cfg.train if split == "train" else cfg.val
    if not path:
        raise ConfigError(f"data.{split} is not set: expected the {split} split's path "
                          f"({'a .beton file' if cfg.loader == 'ffcv' else 'an ImageFolder directory'})")
    if not Path(path).exists():
        raise DataError(f"data.{split}={path!r} does not exist: check the path (loader {cfg.loader!r})")
    return Path(path)


def check_classes(classes: list[str], source: Path | str, num_classes: int | None = None,
                  expected: list[str] | None = None) -> None:
    """``classes`` must equal ``expected`` (the train split's names) and number ``num_classes``: val with other
    names, even as many, would score top-1 against the wrong labels."""
    if expected is not None and list(classes) != list(expected):
        i, (got, want) = next((i, pair) for i, pair in enumerate(zip_longest(classes, expected)) if pair[0] != pair[1])
        got, want = (f"class {name!r}" if name is not None else "no class" for name in (got, want))
        raise DataError(f"{source} has {got} at index {i} where the train split has {want} ({len(classes)} vs "
                        f"{len(expected)} classes): train and val must hold the same class names")
    if num_classes is not None and len(classes) != num_classes:
        raise DataError(f"{source} has {len(classes)} classes but model.num_classes={num_classes}: set "
                        f"model.num_classes={len(classes)} or point data at the right dataset")


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


def sidecar_path(beton: str | Path) -> Path:
    """``train.beton`` -> ``train.beton.json``: the class list and report written beside a .beton."""
    beton = Path(beton)
    return beton.with_name(beton.name + ".json")


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of a .beton (``path`` is the .beton or the sidecar itself), checked to be one."""
    path = Path(path) if Path(path).suffix == ".json" else sidecar_path(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is missing or unreadable ({type(e).__name__}): it holds the class list; "
                        "re-create it with python -m data_loaders.convert") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("num_samples"), int)
            and isinstance(meta.get("classes"), list) and all(isinstance(c, str) for c in meta["classes"])):
        raise DataError(f"{path} is not a .beton sidecar (no 'classes' list of names and 'num_samples'): use the "
                        "<name>.beton.json written by python -m data_loaders.convert")
    return meta
