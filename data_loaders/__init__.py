"""Data for So-ViT: one loader contract (see ``base``), three implementations, plus conversion and synthetic data.

``build(cfg, split, rank, world_size, device)`` picks the implementation named by ``cfg.loader`` (``dali`` reads
val through the torchvision loader); backends are imported lazily, so a machine without FFCV or DALI can still use
the others, and importing this package (``pipeline.config`` does, for ``DataConfig``) loads no torch. Problems with
the data raise ``DataError``, unset or invalid config keys ``ConfigError``, before any decoding starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import DataConfig
from .errors import ConfigError, DataError
from .splits import Split, read_sidecar, sidecar_path, split_path

if TYPE_CHECKING:
    import torch

    from .base import Loader


def build(cfg: DataConfig, split: Split, rank: int, world_size: int, device: torch.device,
          num_classes: int | None = None, classes: list[str] | None = None) -> Loader:
    """The ``split`` loader of this rank. ``num_classes`` is the model's; ``classes``, the train split's class
    names, makes val prove it labels the same classes (same names, same order), not just as many."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} is invalid: expected 'train' or 'val'")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is invalid for world_size={world_size}")
    if cfg.loader == "ffcv":
        from .ffcv_loader import FFCVLoader as impl
    elif cfg.loader == "dali" and split == "train":
        from .dali_loader import DALILoader as impl
    elif cfg.loader in ("dali", "torchvision"):  # dali's val too: timm's eval transform itself (see dali_loader)
        from .torchvision_loader import TorchvisionLoader as impl
    else:
        raise ConfigError(f"data.loader={cfg.loader!r} is invalid: expected ffcv, dali or torchvision")
    return impl(cfg, split, rank, world_size, device, num_classes, classes)


def class_names(cfg: DataConfig, split: Split) -> list[str]:
    """The class names ``split`` holds, read without opening an image: the .beton sidecar's list (ffcv) or the
    ImageFolder's class directories. Their count is what ``model.num_classes`` defaults to."""
    path = split_path(cfg, split)
    if cfg.loader == "ffcv":
        return read_sidecar(path)["classes"]
    from .folders import find_classes

    return find_classes(path)


__all__ = ["ConfigError", "DataConfig", "DataError", "build", "class_names", "sidecar_path"]
