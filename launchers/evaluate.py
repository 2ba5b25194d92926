"""``python launchers/evaluate.py --checkpoint CKPT --data VAL``: top-1/top-5 and loss of a run or of its exports.

CKPT is one of
  * a run directory: its newest checkpoint, or ``--tag`` (``--ema`` for the EMA weights), with the run's
    config.yaml; an unreadable newest checkpoint is an error naming the newest one that reads;
  * a folder written by launchers/export.py, or a .safetensors file written by it or by training
    (``best.safetensors``): these carry the architecture, class count, image size, head and eval transform
    (mean/std, crop_pct, interpolation), so nothing else is needed.
``--config``/``--set`` override any key afterwards (e.g. ``--set data.workers=2``). The loader defaults to ffcv
for a .beton and to the run's folder loader (torchvision unless it was dali) for an ImageFolder. Runs as one
process or under torchrun (the val split is sharded and the counts summed). Exit codes: 0 evaluated, 2 one
``error:`` line (bad checkpoint, config or data).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from launchers import parser

if TYPE_CHECKING:
    import torch

    from pipeline.config import RunConfig


def load(a: argparse.Namespace) -> tuple[RunConfig, Callable[[], dict[str, torch.Tensor]]]:
    """The RunConfig of ``--checkpoint`` (any of its three forms) and how to read its weights: consolidating a run's
    ZeRO shards can take minutes, so it waits until the data has been checked."""
    from pipeline import export
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import DataConfig, config_from_args, load_config

    ckpt = a.checkpoint
    if (ckpt / "config.yaml").is_file():
        cfg = load_config([ckpt / "config.yaml", *a.config], a.overrides)
        return cfg, lambda: export.consolidated_state_dict(ckpt, a.tag, ema=a.ema)
    if not (ckpt / export.CONFIG).is_file() and not ckpt.is_file():
        raise CheckpointError(f"--checkpoint {ckpt} is neither a run directory (config.yaml), an exported folder "
                              "(config.json) nor a .safetensors file")
    if a.ema or a.tag:
        raise CheckpointError(f"--{'ema' if a.ema else 'tag'} needs a run directory; {ckpt} holds one set of "
                              "weights (export with --ema or --tag)")
    hub, state_dict = export.read_exported(ckpt)
    if hub is None and not (a.arch or a.config or a.overrides):
        raise CheckpointError(f"{ckpt} carries no config in its header: re-export it with launchers/export.py, or "
                              "pass --arch N --set model.img_size=S (the class count defaults to the data's)")
    # an export carries no worker count: take the default, within this machine's cores; the user's --set wins
    workers = f"data.workers={min(DataConfig.workers, len(os.sched_getaffinity(0)))}"
    a.overrides = [*(export.hub_overrides(hub) if hub else []), workers, *a.overrides]
    return config_from_args(a), lambda: state_dict


def evaluate(cfg: RunConfig, weights: Callable[[], dict[str, torch.Tensor]]) -> dict[str, float]:
    import timm

    import data_loaders
    from pipeline import distributed, engine
    from pipeline.checkpoint import CheckpointError

    m = cfg.model
    info = distributed.init()
    try:
        m.num_classes = m.num_classes or len(data_loaders.class_names(cfg.data, "val"))
        loader = data_loaders.build(cfg.data, "val", info.rank, info.world_size, info.device,
                                    num_classes=m.num_classes)
        model = timm.create_model(m.arch, num_classes=m.num_classes, img_size=m.img_size, head=m.head)
        state_dict = weights()
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as e:  # the first line only says "Error(s) in loading state_dict"; the second names it
            detail = textwrap.shorten((str(e).splitlines()[1:] or [str(e)])[0], 240)
            raise CheckpointError(f"the weights do not fit {m.arch} with num_classes={m.num_classes}, "
                                  f"head={m.head!r}: {detail}") from None
        return engine.evaluate(model.to(info.device), loader, "fp32", info.device)
    finally:
        distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import add_config_args  # yaml only: --help stays instant
    from pipeline.runtime import paths_as_bytes

    p = parser("launchers/evaluate.py", __doc__)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a run directory, an exported folder or a .safetensors file")
    p.add_argument("--data", required=True, help="the val split: a .beton (ffcv) or an ImageFolder directory")
    p.add_argument("--loader", choices=["ffcv", "dali", "torchvision"], help="default: see below")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a run directory")
    p.add_argument("--tag", help="a run directory's checkpoint, e.g. step_00001200 (default: the newest)")
    add_config_args(p)
    a = p.parse_args(argv)
    paths_as_bytes()

    from data_loaders.errors import SovitError

    try:
        cfg, weights = load(a)
        folder_loader = cfg.data.loader if cfg.data.loader != "ffcv" else "torchvision"
        cfg.data.val = a.data
        cfg.data.loader = a.loader or ("ffcv" if a.data.endswith(".beton") else folder_loader)
        r = evaluate(cfg, weights)
    except SovitError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if int(os.environ.get("RANK", "0")) == 0:  # every rank holds the summed result
        print(f"top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}  loss {r['loss']:.4f}  ({r['samples']} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
