"""Weights that describe themselves: what a run's weights need to be used anywhere without its config.

``save_local_dir`` writes timm's local-dir format (``config.json`` + ``model.safetensors``), so
``timm.create_model("local-dir:DIR", pretrained=True)`` (after ``import pipeline.models``) rebuilds the model at the
run's image size, class count and head, and ``timm.data.resolve_data_config(model=model)`` gives the run's eval
transform (input size, mean/std, crop_pct, interpolation). timm reads ``model_args`` as constructor defaults and
loads the weights only with ``pretrained=True``. ``best.safetensors`` carries the same config in its header metadata
(key ``config``); ``read_exported`` reads either form back and ``hub_overrides`` turns the config into ``--set``
overrides of a RunConfig, so evaluation rebuilds exactly what training evaluated.

``consolidated_state_dict`` reads a run's weights (or its EMA's) out of a checkpoint, whatever the ZeRO stage: what
``launchers/export.py`` writes and ``launchers/evaluate.py`` scores.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from timm.models import filter_pretrained_cfg, get_pretrained_cfg

from . import checkpoint, files, models  # noqa: F401  (registers sovit_*: their default cfgs are an export's base)
from .checkpoint import CheckpointError
from .config import RunConfig
from .run_state import saved_ema

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


def consolidated_state_dict(run_dir: Path, tag: str | None = None, ema: bool = False) -> dict[str, torch.Tensor]:
    """The fp32 weights (or the EMA's) of ``tag``, else of the checkpoint ``latest`` names, whatever the ZeRO stage.

    Without ``tag``, an unreadable newest checkpoint is an error that names it and the newest one that reads: using
    an older one silently would hand out weights the user did not ask for. Newer tags that were set aside are named
    in a warning. ZeRO 1-3 checkpoints are consolidated with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
    (the fp32 master weights); stage 0 checkpoints hold the whole module already."""
    candidates = [tag] if tag else checkpoint.ordered_tags(run_dir)
    if not candidates:
        raise CheckpointError(f"{run_dir} has no complete checkpoint: expected a run directory written by the "
                              "trainer (step_*/COMPLETE)")
    failures = []
    for name in candidates:
        try:
            weights = _consolidate(run_dir, name, ema)
        except (CheckpointError, OSError, RuntimeError, KeyError, ValueError) as e:
            failures.append(f"{name} ({str(e).splitlines()[0][:200]})")
            continue
        if failures:
            raise CheckpointError(f"{run_dir}'s newest checkpoint is unreadable: {'; '.join(failures)}; {name} reads: "
                                  f"pass --tag {name} to use it, or resume the run, which saves the newer steps again")
        _warn_set_aside_newer(run_dir, name)
        return weights
    raise CheckpointError(f"no checkpoint of {run_dir} could be read: {'; '.join(failures)}")


def _warn_set_aside_newer(run_dir: Path, tag: str) -> None:
    newer = sorted(p.name for p in run_dir.glob("step_*") if checkpoint.TAG.match(p.name) and p.name > tag
                   and checkpoint.set_aside_reason(run_dir, p.name) is not None)
    if newer:
        warnings.warn(f"{run_dir}: reading {tag}; newer {', '.join(newer)} set aside "
                      f"({checkpoint.set_aside_reason(run_dir, newer[-1])})", stacklevel=3)


def _consolidate(run_dir: Path, tag: str, ema: bool) -> dict[str, torch.Tensor]:
    tag_dir = run_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir} does not exist")
    checkpoint.check_tag_safe(tag_dir)  # get_fp32_state_dict_from_zero_checkpoint opens the optimizer states too
    found = sorted(tag_dir.glob("*model_states.pt"))
    if not found:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model states")
    states = checkpoint.safe_load(found[0])
    if ema:
        sd = saved_ema(states)
        if sd is None:
            raise CheckpointError(f"{tag_dir} holds no EMA weights (ema.enabled was false)")
    elif _zero_stage(states) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weights_only.*")
            sd = get_fp32_state_dict_from_zero_checkpoint(str(run_dir), tag=tag)
        sd.update({k: v for k, v in (states.get("module") or {}).items() if k not in sd})  # buffers (BN statistics)
    else:
        sd = states["module"]
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}


def _zero_stage(states: dict) -> int:
    cfg = states.get("ds_config") or {}
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
