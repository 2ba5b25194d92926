"""The baseline: an ImageFolder read by PIL in DataLoader workers, with timm's full DeiT train transform.

Every sample's augmentation draws from RNGs seeded by (seed, epoch, index), and the sampler hands out
``(index, epoch)`` pairs, so an epoch is reproduced exactly wherever and however often it is resumed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from torch.utils.data import DataLoader, Dataset

from .base import Batch, LoaderBase, num_batches, num_workers, rank_indices
from .config import DataConfig
from .folders import read_split
from .splits import Split


def _posterize(img: Image.Image, bits_to_keep: int, **kw) -> Image.Image:
    """timm's RandAugment 'inc1' posterize keeps 0 bits at magnitude 10 (a black image, as in TF/UDA); Pillow 13
    rejects bits=0 with a ValueError, which killed DeiT training mid-epoch. Keep the old meaning for that case."""
    return Image.new(img.mode, img.size) if bits_to_keep < 1 else auto_augment.posterize(img, bits_to_keep, **kw)


def fix_timm_posterize() -> None:
    """Route timm's posterize ops through ``_posterize``; idempotent. Called by the loader before it builds its
    transform (RandAugment binds its ops when built), so importing this module changes nothing in timm."""
    auto_augment.NAME_TO_OP.update({k: _posterize for k, op in auto_augment.NAME_TO_OP.items()
                                    if op is auto_augment.posterize})


class _SeededFolder(Dataset):
    def __init__(self, samples: list[tuple[str, int]], transform, seed: int):
        self.samples, self.transform, self.seed = samples, transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        random.seed(seed)  # timm's transforms draw from all three: random, numpy (RandAugment's op choice), torch
        np.random.seed(seed)
        torch.manual_seed(seed)
        path, label = self.samples[index]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), label


class TorchvisionLoader(LoaderBase):
    def __init__(self, cfg: DataConfig, split: Split, rank: int, world_size: int, device: torch.device,
                 num_classes: int | None = None, classes: list[str] | None = None):
        self.classes, samples = read_split(cfg, split, num_classes, classes)
        fix_timm_posterize()
        if split == "train":
            transform = create_transform(
                cfg.img_size, is_training=True, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip, vflip=0.0,
                color_jitter=cfg.color_jitter or None, auto_augment=cfg.auto_augment,
                interpolation=cfg.train_interpolation, mean=cfg.mean, std=cfg.std, re_prob=cfg.reprob,
                re_mode=cfg.remode, re_count=1)
        else:
            transform = create_transform(cfg.img_size, is_training=False, interpolation=cfg.eval_interpolation,
                                         crop_pct=cfg.crop_pct, mean=cfg.mean, std=cfg.std)
        self.dataset = _SeededFolder(samples, transform, cfg.seed)
        self.cfg, self.split, self.rank, self.world_size, self.device = cfg, split, rank, world_size, device
        self.workers = num_workers(cfg)
        n = len(rank_indices(len(samples), split, rank, world_size, cfg.micro_batch_size, cfg.seed, 0))
        self._len = num_batches(n, cfg.micro_batch_size, split)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        bs = self.cfg.micro_batch_size
        indices = rank_indices(len(self.dataset), self.split, self.rank, self.world_size, bs, self.cfg.seed, epoch)
        keys = [(int(i), epoch) for i in indices[start_batch * bs:]]
        loader = DataLoader(self.dataset, batch_size=bs, sampler=keys, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", drop_last=self.split == "train",
                            persistent_workers=False, prefetch_factor=4 if self.workers else None)
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True, memory_format=self._memory_format()),
                   labels.to(self.device, non_blocking=True))

    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.cfg.channels_last else torch.contiguous_format
