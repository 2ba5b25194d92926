"""``DataConfig``: what the loaders read, the ``data`` section of a run's config. It lives here, with the loaders,
so that ``pipeline.config`` composes a RunConfig from it and the loaders import nothing of ``pipeline/``; its values
are checked with the rest of the config, by ``pipeline.config`` (field by field, against timm's own transforms).
Only the standard library is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    """What the loaders need. ``train``/``val`` are .beton files for ffcv and ImageFolder dirs otherwise."""

    loader: Literal["ffcv", "dali", "torchvision"] = "ffcv"
    train: str = ""
    val: str = ""
    micro_batch_size: int = 64  # per rank, per forward pass
    workers: int = 8
    img_size: int = 224  # train crop and eval crop
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, centre crop img_size
    train_interpolation: str = "random"
    eval_interpolation: str = "bicubic"
    # DeiT extras; applied where the backend supports them (torchvision: all; ffcv/dali: documented subset)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    reprob: float = 0.25
    remode: str = "pixel"
    os_cache: bool = True  # ffcv: read the .beton through the page cache (True) or process memory (False)
    channels_last: bool | None = None  # NHWC images and conv weights; None: on with CUDA (+23-49% there), off on CPU
    seed: int = 0

