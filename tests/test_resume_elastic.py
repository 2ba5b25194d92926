"""Elastic resume: a ZeRO-1 run checkpointed on 2 ranks continues on 1, and one from 1 rank on 2, through an
automatic conversion to a DeepSpeed universal checkpoint; right after the resume the weights are the saved ones."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TRAIN, torchrun

from pipeline import elastic
from pipeline.distributed import free_port

WORKER = Path(__file__).with_name("trainer_worker.py")


def overrides(root: Path, run_dir: Path, max_steps: int) -> list[str]:
    return [
        "model.arch=sovit_7", "model.img_size=32", "data.img_size=32", "model.num_classes=4",
        "data.loader=torchvision", f"data.train={root / 'train'}", f"data.val={root / 'val'}",
        "data.micro_batch_size=2", "data.workers=0", "train.global_batch_size=4", "train.precision=fp32",
        "train.zero_stage=1", f"train.max_steps={max_steps}", "schedule.epochs=3", "schedule.warmup_epochs=0",
        "schedule.cooldown_epochs=0", "mixup.mixup=0", "mixup.cutmix=0", "ema.enabled=false",
        f"checkpoint.run_dir={run_dir}", "checkpoint.every_steps=2", "tracking.enabled=false",
    ]


def train(root: Path, run_dir: Path, ranks: int, max_steps: int) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(TRAIN),
           *[a for s in overrides(root, run_dir, max_steps) for a in ("--set", s)]]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    return out


def test_universal_conversion_arguments_are_parsed_by_deepspeeds_own_parser(tmp_path, monkeypatch):
    """A DeepSpeed release that drops a flag we pass, or changes a default we rely on, fails loudly."""
    args = elastic.universal_args(tmp_path / "in", tmp_path / "out")
    assert args.input_folder == str(tmp_path / "in") and args.inject_missing_state and args.strict
    from deepspeed.checkpoint import ds_to_universal

    real = ds_to_universal.parse_arguments

    def without_merge_workers():
        sys.argv = [a.replace("--num_merge_workers", "--num_merge_threads") for a in sys.argv]
        return real()

    monkeypatch.setattr(ds_to_universal, "parse_arguments", without_merge_workers)
    with pytest.raises(RuntimeError, match="no longer accepts"):
        elastic.universal_args(tmp_path / "in", tmp_path / "out")
    monkeypatch.setattr(ds_to_universal, "parse_arguments", lambda: argparse.Namespace(**{**vars(args),
                                                                                            "strict": False}))
    with pytest.raises(RuntimeError, match=re.escape("changed meaning: {'strict': False}")):
        elastic.universal_args(tmp_path / "in", tmp_path / "out")


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_elastic_resume_through_universal_checkpoint(synthetic_root, tmp_path, before, after):
    run_dir = tmp_path / "run"
    train(synthetic_root, run_dir, before, 2)
    res = torchrun(WORKER, "resumed", str(run_dir), json.dumps(overrides(synthetic_root, run_dir, 4)), nproc=after)
    assert res == {"tag": "step_00000002", "step": 2, "keys_equal": True, "max_abs_diff": 0.0}
    assert (run_dir / "step_00000002_universal").is_dir()
    out = train(synthetic_root, run_dir, after, 4)
    assert "resuming at step 2" in out
    assert json.loads((run_dir / "step_00000004" / "meta.json").read_text())["world_size"] == after
