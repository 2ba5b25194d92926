"""Weights that describe themselves: what a run's weights need to be used anywhere without its config.

``save_local_dir`` writes timm's local-dir format (``config.json`` + ``model.safetensors``), so
``timm.create_model("local-dir:DIR")`` rebuilds the model at the run's image size and class count, and
``timm.data.resolve_data_config`` gives the run's eval transform (input size, mean/std, crop_pct, interpolation).
``best.safetensors`` carries the same config in its header metadata (key ``config``).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig


def hub_config(cfg: RunConfig) -> dict[str, Any]:
    """timm's ``config.json``: architecture, class count, constructor arguments and the eval data config."""
    m, d = cfg.model, cfg.data
    return {
        "architecture": m.arch,
        "num_classes": m.num_classes,
        "model_args": {"img_size": m.img_size, "head": m.head},
        "pretrained_cfg": {
            "input_size": [3, m.img_size, m.img_size], "fixed_input_size": True, "num_classes": m.num_classes,
            "mean": list(d.mean), "std": list(d.std), "crop_pct": d.crop_pct,
            "interpolation": d.eval_interpolation, "crop_mode": "center",
        },
    }


def _plain(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in state_dict.items()}


def save_safetensors(state_dict: dict[str, torch.Tensor], cfg: RunConfig, path: Path) -> None:
    """fp32 weights with the hub config in the header, written atomically."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file(_plain(state_dict), str(tmp), metadata={"config": json.dumps(hub_config(cfg))})
    tmp.replace(path)


def save_local_dir(state_dict: dict[str, torch.Tensor], cfg: RunConfig, out: Path) -> None:
    """``out/config.json`` + ``out/model.safetensors``, built in a sibling folder and renamed into place."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(hub_config(cfg), indent=1))
    save_safetensors(state_dict, cfg, tmp / "model.safetensors")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def append_summary(path: Path, epoch: int, step: int, results: dict[str, float]) -> None:
    """One row per evaluation in ``summary.csv`` (as timm's train.py writes), readable without MLflow."""
    row = {"epoch": epoch, "step": step, **{f"val_{k}": v for k, v in results.items()}}
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
