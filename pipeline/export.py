"""Weights that describe themselves: what a run's weights need to be used anywhere without its config.

``save_local_dir`` writes timm's local-dir format (``config.json`` + ``model.safetensors``), so
``timm.create_model("local-dir:DIR", pretrained=True)`` (after ``import pipeline.models``) rebuilds the model at the
run's image size, class count and head, and ``timm.data.resolve_data_config(model=model)`` gives the run's eval
transform (input size, mean/std, crop_pct, interpolation). timm reads ``model_args`` as constructor defaults and
loads the weights only with ``pretrained=True``. ``best.safetensors`` carries the same config in its header metadata
(key ``config``); ``read_exported`` reads either form back and ``hub_overrides`` turns the config into ``--set``
overrides of a RunConfig, so evaluation rebuilds exactly what training evaluated.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from timm.models import filter_pretrained_cfg, get_pretrained_cfg

from . import files, models  # noqa: F401  (registers sovit_* with timm: their default cfgs are the base of the export's)
from .checkpoint import CheckpointError
from .config import RunConfig

WEIGHTS, CONFIG = "model.safetensors", "config.json"  # the names timm's local-dir loader looks for first


def hub_config(cfg: RunConfig) -> dict[str, Any]:
    """timm's ``config.json``: architecture, class count, constructor arguments and the eval data config.

    ``pretrained_cfg`` starts from the architecture's registered default cfg, so it names the classifiers
    (``head``, ``so_head``) and the first conv: with them, ``create_model("local-dir:DIR", pretrained=True,
    num_classes=N)`` drops both classifiers for fine-tuning instead of failing on their shapes."""
    m, d = cfg.model, cfg.data
    pretrained = filter_pretrained_cfg(get_pretrained_cfg(m.arch).to_dict(), remove_source=True)
    pretrained.pop("architecture", None)  # timm keeps it at the root
    pretrained.update({
        "input_size": [3, m.img_size, m.img_size], "fixed_input_size": True, "num_classes": m.num_classes,
        "mean": list(d.mean), "std": list(d.std), "crop_pct": d.crop_pct, "interpolation": d.eval_interpolation,
        "crop_mode": "center",
    })
    return {
        "architecture": m.arch,
        "num_classes": m.num_classes,
        "model_args": {"img_size": m.img_size, "head": m.head},
        "pretrained_cfg": json.loads(json.dumps(pretrained)),  # tuples as lists: what the file will hold
    }


def hub_overrides(hub: dict[str, Any]) -> list[str]:
    """``section.key=value`` overrides that give a RunConfig the model and eval transform ``hub`` describes."""
    try:
        pre, args = hub["pretrained_cfg"], hub.get("model_args", {})
        size = args.get("img_size", pre["input_size"][-1])
        values = {
            "model.arch": hub["architecture"], "model.num_classes": hub["num_classes"], "model.img_size": size,
            "data.img_size": size, "model.head": args.get("head", "so"), "data.mean": pre["mean"],
            "data.std": pre["std"], "data.crop_pct": pre["crop_pct"], "data.eval_interpolation": pre["interpolation"],
        }
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"the export's config lacks {e} (keys: {', '.join(hub)}): re-export the run with "
                              "launchers/export.py") from None
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]  # JSON values are YAML values


def _plain(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in state_dict.items()}


def save_safetensors(state_dict: dict[str, torch.Tensor], cfg: RunConfig, path: Path) -> None:
    """fp32 weights with the hub config in the header, written atomically. Serialised here and written by Python,
    not by safetensors' ``save_file``, which creates its file 0600 whatever the umask: colleagues on a shared
    filesystem could read config.json but not the weights beside it."""
    from safetensors.torch import save

    files.write_bytes(path, save(_plain(state_dict), metadata={"config": json.dumps(hub_config(cfg))}))


def save_local_dir(state_dict: dict[str, torch.Tensor], cfg: RunConfig, out: Path) -> None:
    """``out/config.json`` + ``out/model.safetensors``, built in a sibling folder and renamed into place.

    An existing ``out`` is replaced only when it is an earlier export (nothing but those two files): a mistyped
    ``--out`` must never delete a folder of other files."""
    if out.exists() and (not out.is_dir() or {p.name for p in out.iterdir()} - {CONFIG, WEIGHTS}):
        raise FileExistsError(f"{out} exists and is not an earlier export (config.json + model.safetensors); "
                              "pick a new --out")

    def build(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / CONFIG).write_text(json.dumps(hub_config(cfg), indent=1))
        save_safetensors(state_dict, cfg, tmp / WEIGHTS)
        if out.exists():
            shutil.rmtree(out)

    files.replace(out, build)


def read_exported(path: Path) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    """(hub config, state dict) of a folder ``save_local_dir`` wrote or of a .safetensors file. The config is None
    for a file whose header has none (written before exports described themselves)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    file = path / WEIGHTS if path.is_dir() else path
    try:
        hub = json.loads((path / CONFIG).read_text()) if path.is_dir() else None
        if hub is None:
            with safe_open(str(file), framework="pt") as f:
                hub = json.loads((f.metadata() or {}).get("config", "null"))
        return hub, load_file(str(file))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"{path} is not a readable export ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                              "; expected a folder written by launchers/export.py or a .safetensors file") from None


def append_summary(path: Path, epoch: int, step: int, results: dict[str, float]) -> None:
    """One row per evaluation in ``summary.csv`` (as timm's train.py writes), readable without MLflow. A step that
    has its row already (a resumed run replaying the steps after its checkpoint) keeps the first one."""
    row = {"epoch": epoch, "step": step, **{f"val_{k}": v for k, v in results.items()}}
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            if any(r.get("step") == str(step) for r in csv.DictReader(f)):
                return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(row))
    if new:
        writer.writeheader()
    writer.writerow(row)
    files.append(path, text.getvalue())
