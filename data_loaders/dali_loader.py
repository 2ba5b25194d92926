"""NVIDIA DALI loader over an ImageFolder: ``mixed`` (nvJPEG) decoding on a GPU, the CPU backend elsewhere.

The file list comes from ``folders.list_samples``, so labels match the .beton and the torchvision loader. The
reader shards with ``shard_id``/``num_shards`` and reshuffles the whole list after every epoch (a true global
permutation seeded by ``cfg.seed``, not a shuffle buffer). Train: every rank yields the same number of batches
(``len``), val: ``pad_last_batch`` with LastBatchPolicy.PARTIAL, so each sample counts exactly once.

Resume: the pipeline is built with ``enable_checkpointing=True``; ``state_dict()`` holds DALI's own checkpoint
(reader position, shuffle and RNG states), and ``load_state_dict()`` rebuilds the pipeline from it, so a resumed
epoch continues with the same samples and the same augmentation draws.
Applied DeiT extras: none beyond random-resized-crop and flip (RandAugment and random erasing are not DALI ops
here); mixup/cutmix happen in the engine.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.config import DataConfig

from .base import Split, check_num_classes, eval_resize, split_path
from .folders import find_classes, list_samples


def _build_pipeline(files, labels, cfg: DataConfig, split: Split, rank: int, world_size: int,
                    device: torch.device, checkpoint: str | None):
    from nvidia.dali import fn, pipeline_def, types

    on_gpu = device.type == "cuda"

    @pipeline_def(enable_checkpointing=True)
    def pipe():
        jpegs, label = fn.readers.file(
            files=files, labels=labels, shard_id=rank, num_shards=world_size, name="Reader",
            shuffle_after_epoch=split == "train", pad_last_batch=split == "val", seed=cfg.seed)
        decoder = "mixed" if on_gpu else "cpu"
        if split == "train":
            images = fn.decoders.image_random_crop(
                jpegs, device=decoder, output_type=types.RGB, random_area=list(cfg.scale),
                random_aspect_ratio=list(cfg.ratio), num_attempts=10, seed=cfg.seed + 1)
            images = fn.resize(images, resize_x=cfg.img_size, resize_y=cfg.img_size,
                               interp_type=types.INTERP_LINEAR, antialias=True)
            mirror = fn.random.coin_flip(probability=cfg.hflip, seed=cfg.seed + 2)
        else:
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=eval_resize(cfg), interp_type=types.INTERP_CUBIC,
                               antialias=True)
            mirror = False
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", crop=(cfg.img_size, cfg.img_size),
            mean=[m * 255 for m in cfg.mean], std=[s * 255 for s in cfg.std], mirror=mirror)
        return images, label.gpu() if on_gpu else label

    return pipe(batch_size=cfg.micro_batch_size, num_threads=max(1, cfg.workers),
                device_id=device.index or 0 if on_gpu else None, seed=cfg.seed + rank,
                prefetch_queue_depth=2, checkpoint=checkpoint)


class DALILoader:
    def __init__(self, cfg: DataConfig, split: Split, rank: int, world_size: int, device: torch.device,
                 num_classes: int | None = None):
        root = split_path(cfg, split)
        if not root.is_dir():
            raise ValueError(f"data.{split}={str(root)!r} is not a directory: the dali loader reads an ImageFolder "
                             "(<split>/<class>/<image>)")
        self.classes = find_classes(root)
        check_num_classes(self.classes, num_classes, root)
        samples = list_samples(root, self.classes)
        self._files, self._labels = [p for p, _ in samples], [lab for _, lab in samples]
        self.cfg, self.split, self.rank, self.world_size, self.device = cfg, split, rank, world_size, device
        n, bs = len(samples), cfg.micro_batch_size
        if split == "train":
            self._len = (n // world_size) // bs  # the smallest shard's full batches: equal on every rank
            if self._len == 0:
                raise ValueError(f"train split has {n} images: too few for {world_size} rank(s) x micro-batch {bs}")
        else:  # DALI's shard i is [i * n // world, (i + 1) * n // world)
            self._len = -(-((rank + 1) * n // world_size - rank * n // world_size) // bs)
        self._position = (0, 0)  # (epoch, batch) of the next batch to yield
        self._build(checkpoint=None)

    def _build(self, checkpoint: str | None) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._pipe = _build_pipeline(self._files, self._labels, self.cfg, self.split, self.rank, self.world_size,
                                     self.device, checkpoint)
        policy = LastBatchPolicy.DROP if self.split == "train" else LastBatchPolicy.PARTIAL
        self._it = DALIGenericIterator([self._pipe], ["images", "labels"], reader_name="Reader",
                                       last_batch_policy=policy, auto_reset=True)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """DALI advances its own epochs; a resume restores the position through ``load_state_dict`` first."""
        if (epoch, start_batch) != self._position:
            raise ValueError(f"the dali loader is at epoch {self._position[0]}, batch {self._position[1]}, not epoch "
                             f"{epoch}, batch {start_batch}: restore it with load_state_dict() from the checkpoint")

    def state_dict(self) -> dict:
        return {"dali_checkpoint": self._it.checkpoints()[0], "position": list(self._position)}

    def load_state_dict(self, state: dict) -> None:
        self._build(checkpoint=state["dali_checkpoint"])
        self._position = tuple(state["position"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, done = self._position
        for batch in self._it:
            if done == self._len:  # a longer shard's extra batch: consumed so every rank stays in step
                continue
            images, labels = batch[0]["images"], batch[0]["labels"]
            done += 1
            self._position = (epoch, done)
            yield images.to(self.device, non_blocking=True), labels.reshape(-1).long().to(self.device)
        self._position = (epoch + 1, 0)
