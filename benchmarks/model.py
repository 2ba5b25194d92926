"""Training-step throughput of each So-ViT variant vs timm's DeiT-Tiny/Small, measured in one process.

    python benchmarks/model.py [--batch 8] [--iters 3] [--img-size 224] [--models sovit_7 sovit_14 ...]
Prints images/s of forward + backward (cross-entropy, train mode) and each model's ratio to DeiT-Tiny and
DeiT-Small at the same batch (the baselines are always measured), so the ratios hold on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import pipeline.models  # noqa: F401  (registers sovit_* with timm)

BASELINES = ("deit_tiny_patch16_224", "deit_small_patch16_224")
VARIANTS = ("sovit_7", "sovit_10", "sovit_14", "sovit_19")


def images_per_second(name: str, batch: int, iters: int, img_size: int) -> float:
    """Median images/s of forward + backward over ``iters`` steps after one warm-up step."""
    model = timm.create_model(name, num_classes=1000, img_size=img_size).train()
    x, y = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 1000, (batch,))
    times = []
    for i in range(iters + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if i:
            times.append(time.perf_counter() - t0)
    return batch / sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--models", nargs="+", default=list(VARIANTS))
    args = p.parse_args()
    names = list(dict.fromkeys([*args.models, *BASELINES]))
    speed = {name: images_per_second(name, args.batch, args.iters, args.img_size) for name in names}
    print(f"fwd+bwd, batch {args.batch}, {args.img_size} px, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.iters}")
    print(f"{'model':<24} {'images/s':>9} {'vs deit_tiny':>13} {'vs deit_small':>14}")
    for name in names:
        tiny, small = (speed[name] / speed[b] for b in BASELINES)
        print(f"{name:<24} {speed[name]:>9.1f} {tiny:>12.2f}x {small:>13.2f}x")


if __name__ == "__main__":
    main()
