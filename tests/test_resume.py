"""Exact resume: N steps straight == k steps, SIGKILL, resume to N (bitwise, CPU, fp32); a corrupt newest checkpoint
falls back to the previous one; the finished run exports and evaluates to the training loop's own numbers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, finish, output, start_training, tiny_run, train


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    states = torch.load(run_dir / f"step_{step:08d}" / "mp_rank_00_model_states.pt", weights_only=False)
    return states["module"] | {f"ema.{k}": v for k, v in states["ema"].items()}


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory) -> SimpleNamespace:
    """An 8-step run straight through, and the same run SIGKILLed right after its first checkpoint, then resumed.
    12 steps make an epoch, so step 8 and the kill are both mid-epoch."""
    tmp = tmp_path_factory.mktemp("resume")
    straight, killed = tmp / "straight", tmp / "killed"
    ref = start_training(tiny_run(synthetic_root, straight, 8), tmp)
    victim = start_training(tiny_run(synthetic_root, killed, 8), tmp, start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "latest").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert (killed / "latest").exists(), f"no checkpoint within 240 s:\n{output(victim)[-3000:]}"
    stopped_at = (killed / "latest").read_text()
    finish(ref)
    resumed = train(tiny_run(synthetic_root, killed, 8), tmp)
    return SimpleNamespace(straight=straight, killed=killed, stopped_at=stopped_at, resumed=resumed, tmp=tmp)


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_exact(runs):
    assert runs.stopped_at in ("step_00000003", "step_00000006"), runs.stopped_at
    assert f"resuming at step {int(runs.stopped_at[-8:])}" in runs.resumed
    a, b = weights(runs.straight, 8), weights(runs.killed, 8)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(runs, synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs.killed, run_dir)
    model_file = run_dir / "step_00000008" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    out = train(tiny_run(synthetic_root, run_dir, 9), tmp_path)
    assert "unreadable" in out and "resuming at step 6" in out
    assert (run_dir / "latest").read_text() == "step_00000009"


@pytest.mark.slow
def test_the_export_loads_in_timm_with_the_trained_weights(runs, tmp_path):
    import timm

    import pipeline.models  # noqa: F401

    out = tmp_path / "export"
    subprocess.run([sys.executable, str(ROOT / "launchers" / "export.py"), str(runs.straight), "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.head.out_features == 4 and model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert torch.equal(model.head.weight, weights(runs.straight, 8)["head.weight"])


@pytest.mark.slow
def test_evaluate_reproduces_the_final_evaluation(runs, synthetic_root):
    out = subprocess.run([sys.executable, str(ROOT / "launchers" / "evaluate.py"), "--checkpoint",
                          str(runs.straight), "--data", str(synthetic_root / "val")], capture_output=True, text=True,
                         timeout=300)
    final = json.loads((runs.straight / "final_metrics.json").read_text())
    assert f"top-1 {final['val_top1']:.2f}" in out.stdout, out.stderr[-2000:]
