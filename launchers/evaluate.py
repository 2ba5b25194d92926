"""``python launchers/evaluate.py --checkpoint RUN_DIR|weights.safetensors --data VAL [--loader ...]``: top-1/top-5.

A run directory is read through ``launchers/export.py`` (its ``latest`` checkpoint, ``--ema`` for the EMA
weights) with the run's own ``config.yaml``; a .safetensors file needs ``--arch``/``--num-classes``. Runs as one
process or under torchrun (the val split is sharded and the counts summed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm

import data_loaders
import pipeline.models  # noqa: F401  (registers sovit_* with timm)
from launchers.export import consolidated_state_dict
from pipeline import distributed, engine
from pipeline.config import ConfigError, RunConfig, add_config_args, config_from_args, load_config


def evaluate(cfg: RunConfig, state_dict: dict) -> dict[str, float]:
    info = distributed.init()
    loader = data_loaders.build(cfg.data, "val", info.rank, info.world_size, info.device,
                                num_classes=cfg.model.num_classes)
    model = timm.create_model(cfg.model.arch, num_classes=cfg.model.num_classes, img_size=cfg.model.img_size,
                              head=cfg.model.head)
    model.load_state_dict(state_dict)
    result = engine.evaluate(model.to(info.device), loader, engine.DTYPES["fp32"], info.device)
    distributed.shutdown()
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="launchers/evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a run directory or a .safetensors file")
    p.add_argument("--data", required=True, help="the val split: a .beton (ffcv) or an ImageFolder directory")
    p.add_argument("--loader", choices=["ffcv", "dali", "torchvision"], help="default: the run's loader")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a run directory")
    add_config_args(p)
    a = p.parse_args(argv)
    try:
        if a.checkpoint.is_dir():
            files = [a.checkpoint / "config.yaml", *a.config]
            cfg = load_config(files, a.overrides)
            sd = consolidated_state_dict(a.checkpoint, ema=a.ema)
        else:
            cfg = config_from_args(a)
            from safetensors.torch import load_file

            sd = load_file(str(a.checkpoint))
        cfg.data.val = a.data
        if a.loader:
            cfg.data.loader = a.loader
        r = evaluate(cfg, sd)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}  loss {r['loss']:.4f}  ({r['samples']} images)")


if __name__ == "__main__":
    main()
