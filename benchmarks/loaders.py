"""Train-loader throughput on the same data and the same work, measured in one run; prints ratios to torchvision.

    python benchmarks/loaders.py [--images 600] [--workers 2] [--batch 64] [--size 224] [--epochs 3]

Work per image for every loader: decode, random-resized-crop to --size, flip, normalise, batch (float32 NCHW).
torchvision with timm's full DeiT augmentation (RandAugment, colour jitter, random erasing) is its own row; the
decode ceiling is libjpeg-turbo (OpenCV's imdecode) decoding the same JPEG bytes and nothing else. Data: a
synthetic ImageFolder of 432x432 JPEGs (the pixel count of ImageNet's typical 500x375), made in a temp dir.
Each loader runs one warm-up epoch (FFCV's JIT compile, DALI's pipeline build, worker start), then --epochs timed
ones, each loader in a fresh process: one 600-image epoch is ~1 s, single epochs vary by +-20% on a 2-core
machine, and a loader measured after others in the same process ran up to 2x slower. The .beton rows also show
the stored bytes per image, the price of each write mode.
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


def timed_epochs(cfg: DataConfig, epochs: int) -> float:
    """Images per second of a train loader over ``epochs`` epochs after a warm-up one."""
    loader = data_loaders.build(cfg, "train", 0, 1, torch.device("cpu"))
    n = 0
    for epoch in range(1 + epochs):
        if epoch == 1:
            t0, n = time.perf_counter(), 0
        loader.set_epoch(epoch)
        for images, _ in loader:
            n += images.shape[0]
    return n / (time.perf_counter() - t0)


def _put_result(queue, fn, *args) -> None:
    queue.put(fn(*args))


def in_fresh_process(fn, *args):
    """fn(*args) in a new forked process (non-daemon, so it may start DataLoader workers). Forked, not spawned: a
    spawned child makes spawn its DataLoader's start method too, and the torchvision row would time worker start-up.
    """
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    proc = fork.Process(target=_put_result, args=(queue, fn, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


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
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args()
    threads = torch.get_num_threads()  # before the decode ceiling: OpenCV's setNumThreads(1) reaches torch's OpenMP
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "data", classes=10, per_class=a.images // 10, size=432, val_per_class=1)
        betons = {}
        for side, mode in ((256, "jpg"), (512, "jpg"), (256, "proportion"), (256, "raw")):
            opts = ConvertOptions(max_resolution=side, write_mode=mode, workers=a.workers)
            label = {"proportion": f"proportion {opts.compress_probability}"}.get(mode, mode)
            betons[f"FFCV .beton {label}, max side {side}"] = path = Path(tmp) / f"train_{side}_{mode}.beton"
            convert(root / "train", path, progress=False, options=opts)
        plain = {"micro_batch_size": a.batch, "workers": a.workers, "img_size": a.size, "auto_augment": None,
                 "reprob": 0.0, "color_jitter": 0.0}
        folder = str(root / "train")
        rows = [
            ("torchvision (RRC, flip, normalise)", DataConfig(loader="torchvision", train=folder, **plain)),
            ("torchvision + full DeiT augmentation", DataConfig(loader="torchvision", train=folder,
                                                                micro_batch_size=a.batch, workers=a.workers,
                                                                img_size=a.size)),
            *[(name, DataConfig(loader="ffcv", train=str(path), **plain)) for name, path in betons.items()],
            ("DALI (CPU decoding)", DataConfig(loader="dali", train=folder, **plain)),
        ]
        # each row in a fresh process: a previous loader's threads and memory would otherwise tax the next row
        results = [(name, in_fresh_process(timed_epochs, cfg, a.epochs)) for name, cfg in rows]
        ceiling = decode_ceiling([s for s, _ in list_samples(root / "train")], a.workers)
        kib = {name: path.stat().st_size / 1024 / a.images for name, path in betons.items()}
    base = results[0][1]
    print(f"{a.images} images 432x432, batch {a.batch}, {a.workers} workers, crop {a.size}, "
          f"{threads} torch threads, {a.epochs} timed epochs")
    print(f"{'loader':<44} {'img/s':>8} {'vs torchvision':>15} {'KiB/image':>10}")
    for name, ips in [*results, ("decode ceiling (libjpeg-turbo via OpenCV)", ceiling)]:
        size = f"{kib[name]:>10.0f}" if name in kib else ""
        print(f"{name:<44} {ips:>8.0f} {ips / base:>14.2f}x {size}")


if __name__ == "__main__":
    main()
