"""``python launchers/export.py RUN_DIR --out model.safetensors``: consolidated fp32 weights of a run.

Reads the checkpoint named by ``latest`` (or ``--tag``). ZeRO 1-3 checkpoints are consolidated with DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint`` (the fp32 master weights, whatever the training precision); stage 0
checkpoints hold the whole module already. ``--ema`` exports the EMA weights instead. The file loads with

    timm.create_model("sovit_N", pretrained=True, num_classes=C,
                      pretrained_cfg_overlay=dict(file="model.safetensors", num_classes=C))
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.checkpoint import complete_tags


def consolidated_state_dict(run_dir: Path, tag: str | None = None, ema: bool = False) -> dict[str, torch.Tensor]:
    tags = complete_tags(run_dir)
    latest = run_dir / "latest"
    tag = tag or (latest.read_text().strip() if latest.exists() else (tags[0] if tags else None))
    if tag is None or not (run_dir / tag).is_dir():
        raise ValueError(f"{run_dir} has no checkpoint {tag or ''}: expected a run directory written by "
                         "launchers/train.py (with a 'latest' file)")
    # DeepSpeed's model-states file is a full pickle (config, args) that this run itself wrote
    states = torch.load(run_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    if ema:
        ema_state = states.get("ema")  # the training loop's client state sits at the top level
        if ema_state is None:
            raise ValueError(f"{run_dir / tag} holds no EMA weights (ema.enabled was false)")
        sd = {k.removeprefix("module."): v for k, v in ema_state.items()}
    elif any((run_dir / tag).glob("*optim_states.pt")) and states.get("ds_version") and _zero_stage(states) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(run_dir), tag=tag)
        sd.update({k: v for k, v in states["module"].items() if k not in sd})  # buffers (BN statistics)
    else:
        sd = states["module"]
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}


def _zero_stage(states: dict) -> int:
    cfg = states.get("ds_config") or {}
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="launchers/export.py", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output .safetensors")
    p.add_argument("--tag", help="checkpoint tag (default: the one in RUN_DIR/latest)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    a = p.parse_args(argv)
    try:
        sd = consolidated_state_dict(a.run_dir, a.tag, a.ema)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    tmp = a.out.with_name(f".{a.out.name}.tmp")
    save_file(sd, str(tmp))
    tmp.replace(a.out)
    print(f"wrote {a.out}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()) / 1e6:.2f} M values")


if __name__ == "__main__":
    main()
