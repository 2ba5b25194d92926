"""Elastic resume: a ZeRO-1 run checkpointed on 2 ranks continues on 1, and one from 1 rank on 2, through an
automatic conversion to a DeepSpeed universal checkpoint; the loaded weights are the saved ones."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TRAIN = Path(__file__).resolve().parent.parent / "launchers" / "train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(root: Path, run_dir: Path, ranks: int, max_steps: int) -> str:
    sets = [
        "model.arch=sovit_7", "model.img_size=32", "data.img_size=32", "model.num_classes=4",
        "data.loader=torchvision", f"data.train={root / 'train'}", f"data.val={root / 'val'}",
        "data.micro_batch_size=2", "data.workers=0", "train.global_batch_size=4", "train.precision=fp32",
        "train.zero_stage=1", f"train.max_steps={max_steps}", "schedule.epochs=3", "schedule.warmup_epochs=0",
        "schedule.cooldown_epochs=0", "mixup.mixup=0", "mixup.cutmix=0", "ema.enabled=false",
        f"checkpoint.run_dir={run_dir}", "checkpoint.every_steps=2", "tracking.enabled=false",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()),
           str(TRAIN), *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    return out


def fp32_weights(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from launchers.export import consolidated_state_dict

    return consolidated_state_dict(run_dir, tag=tag)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_elastic_resume_through_universal_checkpoint(synthetic_root, tmp_path, before, after):
    run_dir = tmp_path / "run"
    train(synthetic_root, run_dir, before, 2)
    saved = fp32_weights(run_dir, "step_00000002")
    out = train(synthetic_root, run_dir, after, 4)
    assert f"written by {before} rank(s), resuming on {after}" in out, out[-3000:]
    assert "resuming at step 2" in out
    assert (run_dir / "step_00000002_universal").is_dir()
    assert (run_dir / "step_00000004" / "meta.json").read_text().count(f'"world_size": {after}') == 1
    resumed = fp32_weights(run_dir, "step_00000004")
    assert saved.keys() == resumed.keys()
    moved = sum((saved[k] - resumed[k]).abs().sum().item() for k in saved if saved[k].is_floating_point())
    assert moved > 0  # two more optimizer steps ran on the new world size
