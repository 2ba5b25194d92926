"""Exact resume: N steps straight == k steps, SIGKILL, resume to N (bitwise, CPU, fp32); corrupt-checkpoint
fallback; export of the result loads in timm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

TRAIN = Path(__file__).resolve().parent.parent / "launchers" / "train.py"


def overrides(root: Path, run_dir: Path, max_steps: int) -> list[str]:
    sets = [
        "model.arch=sovit_7", "model.img_size=32", "data.img_size=32", "model.num_classes=4",
        "model.drop_path_rate=0.1",  # torch RNG in the step
        "data.loader=torchvision", f"data.train={root / 'train'}", f"data.val={root / 'val'}",
        "data.micro_batch_size=4", "data.workers=0", "data.auto_augment=rand-m9-mstd0.5-inc1",
        "train.global_batch_size=4", "train.precision=fp32", f"train.max_steps={max_steps}",
        "train.log_every_steps=1", "schedule.epochs=3", "schedule.warmup_epochs=1", "schedule.cooldown_epochs=0",
        "mixup.mixup=0.8", "mixup.cutmix=1.0",  # numpy RNG in the step
        "ema.enabled=true", "ema.decay=0.9", f"checkpoint.run_dir={run_dir}", "checkpoint.every_steps=3",
        "checkpoint.keep_last=2", "tracking.enabled=false",
    ]
    return [arg for s in sets for arg in ("--set", s)]


def train(root: Path, run_dir: Path, max_steps: int, **popen) -> subprocess.Popen:
    """Output goes to a file next to the run, not a pipe: an unread pipe fills up and stalls the trainer."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.NamedTemporaryFile("w", dir=run_dir.parent, prefix=f"{run_dir.name}-", suffix=".log",
                                     delete=False) as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, str(TRAIN), *overrides(root, run_dir, max_steps)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True, **popen)
    proc.log = Path(log.name)
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text()


def finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, output(proc)[-3000:]
    return output(proc)


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    states = torch.load(run_dir / f"step_{step:08d}" / "mp_rank_00_model_states.pt", weights_only=False)
    return states["module"] | {f"ema.{k}": v for k, v in states["ema"].items()}


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_exact_then_corrupt_newest_falls_back(synthetic_root, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ref = train(synthetic_root, straight, 8)  # 12 steps/epoch: step 8 and the kill are both mid-epoch
    victim = train(synthetic_root, killed, 8, start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "latest").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert (killed / "latest").exists(), f"no checkpoint within 240 s:\n{output(victim)[-3000:]}"
    stopped_at = (killed / "latest").read_text()
    assert stopped_at in ("step_00000003", "step_00000006"), stopped_at
    finish(ref)
    out = finish(train(synthetic_root, killed, 8))
    assert f"resuming at step {int(stopped_at[-8:])}" in out
    a, b = weights(straight, 8), weights(killed, 8)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"

    # the newest checkpoint (step 8) is damaged: the run warns and resumes from step 6 instead
    model_file = killed / "step_00000008" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    out = finish(train(synthetic_root, killed, 9))
    assert "unreadable" in out and "resuming at step 6" in out

    from launchers.export import main as export

    export([str(straight), "--out", str(tmp_path / "m.safetensors")])
    import timm

    import pipeline.models  # noqa: F401

    m = timm.create_model("sovit_7", pretrained=True, num_classes=4, img_size=32,
                          pretrained_cfg_overlay={"file": str(tmp_path / "m.safetensors"), "num_classes": 4})
    assert torch.equal(m.head.weight, a["head.weight"])

    # evaluate.py on the run directory reproduces the training loop's own final evaluation
    out = subprocess.run([sys.executable, str(TRAIN.with_name("evaluate.py")), "--checkpoint", str(straight),
                          "--data", str(synthetic_root / "val")], capture_output=True, text=True, timeout=300)
    final = json.loads((straight / "final_metrics.json").read_text())
    assert f"top-1 {final['val_top1']:.2f}" in out.stdout, out.stderr[-2000:]
