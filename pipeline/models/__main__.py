"""``python -m pipeline.models summary``: parameters and measured GFLOPs of every So-ViT variant at 224 px."""

from __future__ import annotations

import argparse

import timm

from . import forward_flops

# ImageNet-1K top-1 the authors report (paper, upgraded recipe) from their repository's README. Their parameter
# and FLOP figures are not restated here: compare with the measured columns instead.
PAPER_TOP1 = {"sovit_7": (76.2, 76.8), "sovit_10": (77.9, 78.7), "sovit_14": (81.8, 82.3), "sovit_19": (82.4, 82.8)}


def summary(img_size: int = 224) -> None:
    print(f"{'model':<10} {'params (M)':>11} {'GFLOPs':>8} {'tokens':>7} {'paper top-1':>12} {'upgraded':>9}")
    for name, (top1, upgraded) in PAPER_TOP1.items():
        model = timm.create_model(name, img_size=img_size)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gflops = forward_flops(model, img_size) / 1e9
        print(f"{name:<10} {params:>11.2f} {gflops:>8.2f} {model.patch_embed.num_patches:>7} "
              f"{top1:>12.1f} {upgraded:>9.1f}")
    print("GFLOPs: forward, one image, counted by torch.utils.flop_counter (multiply-add = 2 FLOPs).")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.models")
    parser.add_argument("command", choices=["summary"])
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()
    summary(args.img_size)


if __name__ == "__main__":
    main()
