"""NVIDIA DALI loader of the train split of an ImageFolder: ``mixed`` (nvJPEG) decoding on a GPU, the CPU backend
elsewhere.

Val is not read here: ``data_loaders.build`` gives ``data.loader=dali`` the torchvision loader's val, which is
timm's eval transform itself, so the top-1 a run reports and selects its best checkpoint by is timm's standard
number. DALI's resize filters are not PIL's: a DALI eval pipeline (resize shorter side, centre crop) came close to
it but did not give the same tensors. Val is a few percent of an epoch's images, so its speed matters little.

The file list comes from ``folders.list_samples``, so labels match the .beton and the torchvision loader, and the
shard from ``base.rank_indices``, as every backend: each epoch's pipeline reads exactly this rank's files of that
epoch, in order (no shuffling, no sharding inside DALI), a whole number of batches (the remainder is dropped).

One pipeline per epoch, seeded by (seed, rank, epoch, first batch), built with ``enable_checkpointing=True``:
``state_dict()`` adds DALI's own checkpoint (reader position and RNG states) to the position, and
``load_state_dict()`` rebuilds that pipeline from it, so a resumed epoch continues with the same samples and the
same augmentation draws. ``set_epoch(epoch, start_batch)`` without a checkpoint (another world size, another
backend's state) starts a pipeline at that batch: the same samples, new augmentation draws.
Applied DeiT extras: none beyond random-resized-crop and flip (RandAugment and random erasing are not DALI ops
here); mixup/cutmix happen in the engine.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .base import Batch, LoaderBase, num_batches, num_workers, rank_indices
from .config import DataConfig
from .folders import read_split
from .splits import Split


def _build_pipeline(files: list[str], labels: list[int], cfg: DataConfig, device: torch.device, threads: int,
                    seed: int, checkpoint: str | None):
    from nvidia.dali import fn, pipeline_def, types

    on_gpu = device.type == "cuda"

    @pipeline_def(enable_checkpointing=True)
    def pipe():
        jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader")
        images = fn.decoders.image_random_crop(
            jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB, random_area=list(cfg.scale),
            random_aspect_ratio=list(cfg.ratio), num_attempts=10)
        images = fn.resize(images, resize_x=cfg.img_size, resize_y=cfg.img_size, interp_type=types.INTERP_LINEAR,
                           antialias=True)
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", crop=(cfg.img_size, cfg.img_size),
            mean=[m * 255 for m in cfg.mean], std=[s * 255 for s in cfg.std],
            mirror=fn.random.coin_flip(probability=cfg.hflip))
        return images, label.gpu() if on_gpu else label

    device_id = (torch.cuda.current_device() if device.index is None else device.index) if on_gpu else None
    return pipe(batch_size=cfg.micro_batch_size, num_threads=threads, device_id=device_id, seed=seed,
                prefetch_queue_depth=2, checkpoint=checkpoint)


class DALILoader(LoaderBase):
    def __init__(self, cfg: DataConfig, split: Split, rank: int, world_size: int, device: torch.device,
                 num_classes: int | None = None, classes: list[str] | None = None):
        if split != "train":
            raise ValueError(f"split={split!r}: DALILoader reads train only (data_loaders.build gives dali's val to "
                             "the torchvision loader)")
        self.classes, samples = read_split(cfg, split, num_classes, classes)
        self._files, self._labels = [p for p, _ in samples], [lab for _, lab in samples]
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.threads = max(1, num_workers(cfg))
        self._len = num_batches(len(self._indices(0)), cfg.micro_batch_size, split)
        self._it = None  # the DALI iterator of the current position's pipeline, once built
        self._first = 0  # the batch that pipeline started at
        self._restore: dict | None = None  # a checkpoint from load_state_dict, for the next pipeline

    def _indices(self, epoch: int) -> np.ndarray:
        return rank_indices(len(self._files), "train", self.rank, self.world_size, self.cfg.micro_batch_size,
                            self.cfg.seed, epoch)

    def _pipeline_iterator(self, epoch: int, first_batch: int, checkpoint: str | None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        shard = self._indices(epoch)[first_batch * self.cfg.micro_batch_size:]
        seed = int(np.random.SeedSequence([self.cfg.seed, self.rank, epoch, first_batch]).generate_state(1)[0] >> 1)
        pipe = _build_pipeline([self._files[i] for i in shard], [self._labels[i] for i in shard], self.cfg,
                               self.device, self.threads, seed, checkpoint)
        return DALIGenericIterator([pipe], ["images", "labels"], reader_name="Reader",
                                   last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        if self._it is None:
            restore = self._restore or {"first_batch": start_batch, "checkpoint": None}
            self._it, self._first = self._pipeline_iterator(epoch, **restore), restore["first_batch"]
            self._restore = None
        for batch in self._it:
            yield (batch[0]["images"].to(self.device, non_blocking=True),
                   batch[0]["labels"].reshape(-1).long().to(self.device))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if (epoch, start_batch) != (self.epoch, self.batch):  # the current pipeline (or checkpoint) is elsewhere
            self._it = self._restore = None
        super().set_epoch(epoch, start_batch)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self._it is not None:
            state["dali"] = {"first_batch": self._first, "checkpoint": self._it.checkpoints()[0]}
        elif self._restore is not None:
            state["dali"] = self._restore
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._it, self._restore = None, state.get("dali")
