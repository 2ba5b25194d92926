"""FFCV loader over a .beton written by ``data_loaders.convert``.

Train order: ``base.rank_indices``, as every backend: a fresh global permutation per epoch, sharded equally across
ranks. The one exception is a single process reading through process memory (``os_cache=False``, a dataset larger
than RAM): FFCV's page-aware QUASI_RANDOM, which FFCV refuses with several ranks. Val: each rank reads its
contiguous slice in order, so every sample is scored once; FFCV's own distributed mode would pad with duplicates.

Device placement differs on purpose. On a GPU: decode -> ToTensor -> ToDevice (non_blocking, uint8: a quarter
of float32's bytes) -> ToTorchImage (a free NCHW view of the NHWC batch), then ``DeviceNormalize`` in torch: one
kernel that converts to float32, normalises and writes the trainer's memory format. FFCV's own NormalizeImage on
the GPU generates a cupy kernel (cupy is not a dependency) and accepts channels_last input only. On the CPU the GPU
order hangs forever inside ``Loader.__init__`` (a loop in FFCV's pipeline-graph grouping without a ToDevice), so
the CPU pipeline normalises the uint8 HWC array in numpy first, then ToTensor -> ToTorchImage.

Exactness: the sample order of an epoch is a function of (seed, epoch), and ``start_batch`` skips by index
without decoding. FFCV draws its crop/flip randomness from an unseeded numba RNG, so augmentation is not
reproducible across a resume; use the torchvision or DALI loader where a bitwise-exact resume matters.
Applied DeiT extras: none beyond random-resized-crop and flip (RandAugment and random erasing are not FFCV ops).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .base import Batch, LoaderBase, num_workers, rank_indices
from .config import DataConfig
from .errors import DataError
from .splits import Split, check_classes, read_sidecar, split_path


def _resumable_loader_class():
    import ffcv.loader.loader as ffcv_loader
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator

    class RankDeviceIterator(EpochIterator):
        """FFCV's batch thread, on the rank's GPU from its first line. A new thread's current CUDA device is 0, and
        the stream context FFCV enters for every batch restores the thread's device on exit through torch's
        set_stream, whose cudaSetDevice(0) creates a CUDA context (~0.5 GB) on GPU 0 for every rank but 0."""

        def run(self):
            torch.cuda.set_device(self.loader.cuda_device)
            super().run()

    class ResumableLoader(Loader):
        """FFCV's Loader whose next epoch can start ``skip`` batches in (mid-epoch resume), and whose order can
        come from ``rank_order(epoch)`` instead of FFCV's distributed mode, which reads rank and world size from
        an initialised torch.distributed process group and pads the last shard. With ``cuda_device`` its batch
        thread runs on that GPU."""

        def __init__(self, *args, rank_order=None, cuda_device=None, **kwargs):
            self.rank_order, self.skip, self.cuda_device = rank_order, 0, cuda_device
            super().__init__(*args, **kwargs)

        def next_traversal_order(self):
            order = self.rank_order(self.next_epoch) if self.rank_order else super().next_traversal_order()
            return order[self.skip * self.batch_size:]

        def __iter__(self):
            if self.cuda_device is None:
                return super().__iter__()
            ffcv_loader.EpochIterator = RankDeviceIterator  # the name FFCV's __iter__ starts its thread by
            try:
                return super().__iter__()
            finally:
                ffcv_loader.EpochIterator = EpochIterator

    return ResumableLoader


def _check_beton(path: Path) -> dict:
    """The sidecar of a .beton that FFCV can read completely: a damaged one fails here, in one line, instead of
    deep inside FFCV (IndexError, AssertionError, negative dimensions) or, truncated, as silently missing samples."""
    from ffcv.reader import Reader

    fix = "re-create it with python -m data_loaders.convert"
    try:
        reader = Reader(str(path))
    except Exception as e:  # FFCV has no error type of its own: every failure here means a damaged header
        raise DataError(f"{path} is not a readable .beton ({type(e).__name__}: {e}): {fix}") from None
    if not {"image", "label"} <= set(reader.handlers):
        raise DataError(f"{path} has fields {sorted(reader.handlers)}: expected 'image' (RGBImageField) and 'label' "
                        "(IntField), as written by python -m data_loaders.convert")
    meta = read_sidecar(path)
    stored = np.unique(reader.alloc_table["sample_id"]).size  # one image allocation per sample, table at the end
    if not meta["num_samples"] == reader.num_samples == len(reader.metadata) == stored:
        raise DataError(f"{path} is truncated or damaged: its sidecar lists {meta['num_samples']} images, the file "
                        f"holds {stored}: {fix}")
    images = reader.metadata[reader.metadata.dtype.names[reader.field_names.index("image")]]
    return {**meta, "shorter_sides": np.minimum(images["height"], images["width"])}


def _decoder(meta: dict, cfg: DataConfig, split: Split, path: Path) -> list:
    """The decode (and crop) stage of ``split``. Val on a .beton of timm's eval crops (``convert --eval-size``)
    decodes them as stored, so it scores what timm's standard transform scores on the original images; on one of
    resized images it crops then resizes with OpenCV, close to that but not equal. Images too small for the crop
    are refused here: OpenCV would abort the process (SIGABRT) on an empty crop at the first batch."""
    from ffcv.fields.rgb_image import (
        CenterCropRGBImageDecoder,
        RandomResizedCropRGBImageDecoder,
        SimpleRGBImageDecoder,
    )
    from ffcv.transforms import RandomHorizontalFlip

    crop, size = meta.get("eval_crop"), (cfg.img_size, cfg.img_size)
    if split == "val" and crop:
        run = {"img_size": cfg.img_size, "crop_pct": cfg.crop_pct, "interpolation": cfg.eval_interpolation}
        if crop != run:
            raise DataError(f"{path} holds timm's eval crops for {crop}, but this run evaluates {run}: convert val "
                            f"again with --eval-size {cfg.img_size} --crop-pct {cfg.crop_pct} --interpolation "
                            f"{cfg.eval_interpolation}")
        return [SimpleRGBImageDecoder()]
    if crop:
        raise DataError(f"data.train={str(path)!r} holds eval crops (converted with --eval-size): training needs "
                        "the resized images of a conversion without --eval-size")
    sides = meta["shorter_sides"]
    small = sides < 1 if split == "train" else (cfg.crop_pct * sides).astype(int) < 1  # FFCV's centre crop side
    if small.any():
        raise DataError(f"{path} holds {small.sum()} image(s) too small for the {split} crop (sample "
                        f"{np.flatnonzero(small)[0]}: shorter side {sides[small][0]} px): convert it again with "
                        "python -m data_loaders.convert, which skips such images and names them in the sidecar")
    if split == "train":
        decode = [RandomResizedCropRGBImageDecoder(size, scale=cfg.scale, ratio=cfg.ratio)]
        return [*decode, RandomHorizontalFlip(cfg.hflip)] if cfg.hflip > 0 else decode
    warnings.warn(f"{path} holds resized images, not timm's eval crops: its top-1 is close to timm's standard "
                  f"evaluation, not equal to it; convert val with --eval-size {cfg.img_size} for the standard number",
                  stacklevel=4)  # the caller of data_loaders.build
    return [CenterCropRGBImageDecoder(size, ratio=cfg.crop_pct)]


class FFCVLoader(LoaderBase):
    def __init__(self, cfg: DataConfig, split: Split, rank: int, world_size: int, device: torch.device,
                 num_classes: int | None = None, classes: list[str] | None = None):
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import OrderOption
        from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage

        path = split_path(cfg, split)
        if path.suffix != ".beton":
            raise DataError(f"data.{split}={str(path)!r} is not a .beton: the ffcv loader reads files made by "
                            "python -m data_loaders.convert (or choose data.loader=dali/torchvision for folders)")
        meta = _check_beton(path)
        self.classes: list[str] = meta["classes"]
        check_classes(self.classes, path, num_classes, classes)
        self.batch_size = cfg.micro_batch_size

        decode = _decoder(meta, cfg, split, path)
        self._normalize = None
        if device.type == "cuda":
            image = [*decode, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
            label = [IntDecoder(), ToTensor(), Squeeze(), ToDevice(device, non_blocking=True)]
            self._normalize = DeviceNormalize(cfg.mean, cfg.std, bool(cfg.channels_last), device)
        else:  # normalise before ToTensor: the GPU order hangs FFCV's Loader.__init__ without ToDevice
            mean, std = np.array(cfg.mean) * 255, np.array(cfg.std) * 255
            image = [*decode, NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage(cfg.channels_last)]
            label = [IntDecoder(), ToTensor(), Squeeze()]

        n = meta["num_samples"]
        if split == "train" and world_size == 1 and not cfg.os_cache:
            kwargs = {"order": OrderOption.QUASI_RANDOM, "drop_last": True}
        elif split == "train":
            kwargs = {"order": OrderOption.RANDOM, "drop_last": True, "rank_order": lambda epoch: rank_indices(
                n, "train", rank, world_size, self.batch_size, cfg.seed, epoch)}
        else:
            kwargs = {"order": OrderOption.SEQUENTIAL, "drop_last": False,
                      "indices": rank_indices(n, "val", rank, world_size, self.batch_size, cfg.seed, 0)}
        self._loader = _resumable_loader_class()(
            str(path), batch_size=self.batch_size, num_workers=max(1, num_workers(cfg)), os_cache=cfg.os_cache,
            seed=cfg.seed, pipelines={"image": image, "label": label}, batches_ahead=2,
            cuda_device=device if device.type == "cuda" else None, **kwargs)
        self._len = len(self._loader)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        self._loader.next_epoch, self._loader.skip = epoch, start_batch
        for images, labels in self._loader:
            yield (self._normalize(images) if self._normalize else images), labels.long().reshape(-1)


class DeviceNormalize:
    """uint8 NCHW images (any strides) -> float32 ``(x - 255 mean) / (255 std)`` in one kernel: ``addcmul`` into an
    output allocated in the wanted memory format, so the dtype change, the normalisation and the layout change are
    one pass over the batch on the device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool, device: torch.device):
        mean64, std64 = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (mean, std))
        self.scale = (1 / (255 * std64)).to(device, torch.float32)
        self.shift = (-mean64 / std64).to(device, torch.float32)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=self.memory_format)
        return torch.addcmul(self.shift, images, self.scale, out=out)
