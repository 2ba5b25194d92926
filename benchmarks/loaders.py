"""Train-loader throughput on the same data and the same work, measured in one run; prints ratios to torchvision.

    python benchmarks/loaders.py [--images 600] [--workers 2] [--batch 64] [--size 224]

Work per image for every loader: decode, random-resized-crop to --size, flip, normalise, batch (float32 NCHW).
torchvision with timm's full DeiT augmentation (RandAugment, colour jitter, random erasing) is its own row; the
decode ceiling is libjpeg-turbo (OpenCV's imdecode) decoding the same JPEG bytes and nothing else. Data: a
synthetic ImageFolder of 432x432 JPEGs (the pixel count of ImageNet's typical 500x375), made in a temp dir.
Each loader runs one warm-up epoch (FFCV's JIT compile, DALI's pipeline build, worker start) before the timed one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

import data_loaders
from data_loaders.convert import ConvertOptions, convert
from data_loaders.folders import list_samples
from data_loaders.synthetic import generate
from pipeline.config import DataConfig


def timed_epoch(cfg: DataConfig) -> float:
    """Images per second of the second epoch of a train loader."""
    loader = data_loaders.build(cfg, "train", 0, 1, torch.device("cpu"))
    for epoch in range(2):
        loader.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for images, _ in loader:
            n += images.shape[0]
    return n / (time.perf_counter() - t0)


def _decode(path: str) -> int:
    with open(path, "rb") as f:
        buf = f.read()
    return cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR).shape[0]


def decode_ceiling(paths: list[str], workers: int) -> float:
    cv2.setNumThreads(1)
    with multiprocessing.Pool(workers) as pool:
        pool.map(_decode, paths[:workers * 4])
        t0 = time.perf_counter()
        pool.map(_decode, paths, chunksize=16)
    return len(paths) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "data", classes=10, per_class=a.images // 10, size=432, val_per_class=1)
        betons = {}
        for side, mode in ((256, "jpg"), (512, "jpg"), (256, "proportion"), (256, "raw")):
            betons[side, mode] = Path(tmp) / f"train_{side}_{mode}.beton"
            convert(root / "train", betons[side, mode], progress=False,
                    options=ConvertOptions(max_resolution=side, write_mode=mode, workers=a.workers))
        plain = {"micro_batch_size": a.batch, "workers": a.workers, "img_size": a.size, "auto_augment": None,
                 "reprob": 0.0, "color_jitter": 0.0}
        folder = str(root / "train")
        rows = [
            ("torchvision (RRC, flip, normalise)", DataConfig(loader="torchvision", train=folder, **plain)),
            ("torchvision + full DeiT augmentation", DataConfig(loader="torchvision", train=folder,
                                                                micro_batch_size=a.batch, workers=a.workers,
                                                                img_size=a.size)),
            ("FFCV .beton jpg, max side 256", DataConfig(loader="ffcv", train=str(betons[256, "jpg"]), **plain)),
            ("FFCV .beton jpg, max side 512", DataConfig(loader="ffcv", train=str(betons[512, "jpg"]), **plain)),
            ("FFCV .beton proportion 0.5, max side 256",
             DataConfig(loader="ffcv", train=str(betons[256, "proportion"]), **plain)),
            ("FFCV .beton raw, max side 256", DataConfig(loader="ffcv", train=str(betons[256, "raw"]), **plain)),
            ("DALI (CPU decoding)", DataConfig(loader="dali", train=folder, **plain)),
        ]
        results = [(name, timed_epoch(cfg)) for name, cfg in rows]
        ceiling = decode_ceiling([s for s, _ in list_samples(root / "train")], a.workers)
    base = results[0][1]
    print(f"{a.images} images 432x432, batch {a.batch}, "
          f"{a.workers} workers, crop {a.size}, {torch.get_num_threads()} torch threads")
    print(f"{'loader':<44} {'img/s':>8} {'vs torchvision':>15}")
    for name, ips in [*results, ("decode ceiling (libjpeg-turbo via OpenCV)", ceiling)]:
        print(f"{name:<44} {ips:>8.0f} {ips / base:>14.2f}x")


if __name__ == "__main__":
    main()
