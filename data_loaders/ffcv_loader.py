"""FFCV loader over a .beton written by ``data_loaders.convert``.

Train order: FFCV's QUASI_RANDOM on one process (page-aware, cheap on RAM); with several ranks a RANDOM order:
a fresh global permutation per epoch, sharded equally across ranks (``base.rank_indices``) - FFCV raises
NotImplementedError for QUASI_RANDOM when distributed. Val: each rank reads its contiguous slice in order, so
every sample is scored once; FFCV's own distributed mode would pad with duplicates.

Device placement differs on purpose. On a GPU the pipeline is ffcv-imagenet's: decode -> ToTensor -> ToDevice
(non_blocking) -> ToTorchImage(channels_last) -> NormalizeImage on the device. On the CPU that order hangs
forever inside ``Loader.__init__`` (a loop in FFCV's pipeline-graph grouping without a ToDevice), so the CPU
pipeline normalises the uint8 HWC array in numpy first, then ToTensor -> ToTorchImage.

Exactness: the sample order of an epoch is a function of (seed, epoch), and ``start_batch`` skips by index
without decoding. FFCV draws its crop/flip randomness from an unseeded numba RNG, so augmentation is not
reproducible across a resume; use the torchvision or DALI loader where a bitwise-exact resume matters.
Applied DeiT extras: none beyond random-resized-crop and flip (RandAugment and random erasing are not FFCV ops).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.config import DataConfig

from .base import Split, check_num_classes, rank_indices, read_sidecar, split_path


def _resumable_loader_class():
    from ffcv.loader import Loader

    class ResumableLoader(Loader):
        """FFCV's Loader whose next epoch can start ``skip`` batches in (mid-epoch resume), and whose order can
        come from ``rank_order(epoch)`` instead of FFCV's distributed mode, which reads rank and world size from
        an initialised torch.distributed process group and pads the last shard."""

        def __init__(self, *args, rank_order=None, **kwargs):
            self.rank_order, self.skip = rank_order, 0
            super().__init__(*args, **kwargs)

        def next_traversal_order(self):
            order = self.rank_order(self.next_epoch) if self.rank_order else super().next_traversal_order()
            return order[self.skip * self.batch_size:]

    return ResumableLoader


class FFCVLoader:
    def __init__(self, cfg: DataConfig, split: Split, rank: int, world_size: int, device: torch.device,
                 num_classes: int | None = None):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import OrderOption
        from ffcv.reader import Reader
        from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        path = split_path(cfg, split)
        if path.suffix != ".beton":
            raise ValueError(f"data.{split}={str(path)!r} is not a .beton: the ffcv loader reads files made by "
                             "python -m data_loaders.convert (or choose data.loader=dali/torchvision for folders)")
        fields = set(Reader(str(path)).handlers)
        if not {"image", "label"} <= fields:
            raise ValueError(f"{path} has fields {sorted(fields)}: expected 'image' (RGBImageField) and 'label' "
                             "(IntField), as written by python -m data_loaders.convert")
        meta = read_sidecar(path)
        self.classes: list[str] = meta["classes"]
        check_num_classes(self.classes, num_classes, path)
        self.device, self.split, self.batch_size = device, split, cfg.micro_batch_size

        size = (cfg.img_size, cfg.img_size)
        if split == "train":
            decode = [RandomResizedCropRGBImageDecoder(size, scale=cfg.scale, ratio=cfg.ratio)]
            if cfg.hflip > 0:
                decode.append(RandomHorizontalFlip(cfg.hflip))
        else:
            decode = [CenterCropRGBImageDecoder(size, ratio=cfg.crop_pct)]
        mean, std = np.array(cfg.mean) * 255, np.array(cfg.std) * 255
        if device.type == "cuda":
            image = [*decode, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(cfg.channels_last),
                     NormalizeImage(mean, std, np.float32)]
            label = [IntDecoder(), ToTensor(), Squeeze(), ToDevice(device, non_blocking=True)]
        else:  # normalise before ToTensor: the GPU order hangs FFCV's Loader.__init__ without ToDevice
            image = [*decode, NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage(cfg.channels_last)]
            label = [IntDecoder(), ToTensor(), Squeeze()]

        n = meta["num_samples"]
        if split == "train" and world_size == 1:
            kwargs = {"order": OrderOption.QUASI_RANDOM, "drop_last": True}
        elif split == "train":
            kwargs = {"order": OrderOption.RANDOM, "drop_last": True, "rank_order": lambda epoch: rank_indices(
                n, "train", rank, world_size, self.batch_size, cfg.seed, epoch)}
        else:
            kwargs = {"order": OrderOption.SEQUENTIAL, "drop_last": False,
                      "indices": rank_indices(n, "val", rank, world_size, self.batch_size, cfg.seed, 0)}
        self._loader = _resumable_loader_class()(
            str(path), batch_size=self.batch_size, num_workers=max(1, cfg.workers), os_cache=cfg.os_cache,
            seed=cfg.seed, pipelines={"image": image, "label": label}, batches_ahead=2, **kwargs)
        self._len = len(self._loader)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self._loader.next_epoch = epoch
        self._loader.skip = start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self._loader:
            yield images, labels.long().reshape(-1)
        self._loader.skip = 0
