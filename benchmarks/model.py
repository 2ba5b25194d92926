"""Training throughput (forward + backward images/s) of every So-ViT variant beside DeiT-Tiny/Small, one process.

    python benchmarks/model.py [--batch 8] [--size 224] [--iters 3] [--models sovit_7,deit_tiny_patch16_224]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import pipeline.models  # noqa: F401  (registers sovit_* with timm)

MODELS = "sovit_7,sovit_10,sovit_14,sovit_19,deit_tiny_patch16_224,deit_small_patch16_224"


def images_per_second(name: str, batch: int, size: int, iters: int) -> float:
    model = timm.create_model(name, num_classes=1000, img_size=size)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    times = []
    for i in range(iters + 1):  # the first iteration warms up allocators and kernels
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if i:
            times.append(time.perf_counter() - t0)
    return batch / (sum(times) / len(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--models", default=MODELS)
    a = p.parse_args()
    names = a.models.split(",")
    results = {n: images_per_second(n, a.batch, a.size, a.iters) for n in names}
    ref = results.get("deit_tiny_patch16_224")
    print(f"fwd+bwd, batch {a.batch}, {a.size}px, fp32, {torch.get_num_threads()} threads, mean of {a.iters}")
    print(f"{'model':<24} {'img/s':>8} {'vs DeiT-Tiny':>13}")
    for n, ips in results.items():
        print(f"{n:<24} {ips:>8.1f} {ips / ref if ref else float('nan'):>12.2f}x")


if __name__ == "__main__":
    main()
