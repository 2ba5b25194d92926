"""``python -m pipeline.models summary``: parameters and measured GFLOPs of every So-ViT variant at 224 px."""

from __future__ import annotations

import argparse

import timm

from . import forward_flops

# What the authors report per variant: ImageNet-1K top-1 (paper, upgraded recipe) from their repository's README;
# params (M) and GFLOPs are None until checked against the paper's table (printed as "—", never guessed).
PAPER = {  # name: (params M, GFLOPs, top-1, upgraded top-1)
    "sovit_7": (None, None, 76.2, 76.8),
    "sovit_10": (None, None, 77.9, 78.7),
    "sovit_14": (None, None, 81.8, 82.3),
    "sovit_19": (None, None, 82.4, 82.8),
}


def _fmt(value: float | None, width: int) -> str:
    return f"{'—' if value is None else f'{value:.1f}':>{width}}"


def summary(img_size: int = 224) -> None:
    print(f"{'model':<10} {'params (M)':>11} {'paper':>6} {'GFLOPs':>8} {'paper':>6} {'tokens':>7} "
          f"{'paper top-1':>12} {'upgraded':>9}")
    for name, (paper_params, paper_gflops, top1, upgraded) in PAPER.items():
        model = timm.create_model(name, img_size=img_size)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gflops = forward_flops(model, img_size) / 1e9
        print(f"{name:<10} {params:>11.2f} {_fmt(paper_params, 6)} {gflops:>8.2f} {_fmt(paper_gflops, 6)} "
              f"{model.patch_embed.num_patches:>7} {top1:>12.1f} {upgraded:>9.1f}")
    print("GFLOPs: forward, one image, counted by torch.utils.flop_counter (multiply-add = 2 FLOPs).")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.models")
    parser.add_argument("command", choices=["summary"])
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()
    summary(args.img_size)


if __name__ == "__main__":
    main()
