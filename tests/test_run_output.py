"""What a user sees from a finished run: the starting line, eval lines on their own lines, the end-of-run summary
with the best result, its weights and the next commands, summary.csv, and a gradient norm on every logged step."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import TRAIN, tiny_run

from pipeline import metrics, progress

# a clean environment for train.py; PYTHONPATH passes through (a checkout's code over the installed one)
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin", **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}


def test_a_finished_run_says_what_it_achieved_and_what_to_do_next(synthetic_root, tmp_path):
    """Also what a SLURM log or CI gets (stderr not a terminal): one plain progress line per log interval, no
    ``\\r`` and no escape codes."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(TRAIN), *tiny_run(synthetic_root, run_dir, 18, "train.log_every_steps=3",
                                                                 "train.eval_every_epochs=1")],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    progress = [line for line in proc.stderr.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == [f"{s}/18" for s in range(3, 19, 3)], proc.stderr[-3000:]
    assert all(re.fullmatch(r"step \d+/18 \(\d+%\) loss [\d.]+ lr [\d.e+-]+ img_s \d+ \[[\d:]+<[\d:?]+\]", line)
               for line in progress), progress
    out = proc.stdout.splitlines()
    assert out[0].startswith("starting: sovit_7, 1 rank(s) on cpu") and "18 steps (train.max_steps;" in out[0]
    evals = [line for line in out if line.startswith("epoch ")]
    assert [e.split(":")[0] for e in evals] == ["epoch 1 step 12", "epoch 1 step 18"]
    best = next(line for line in out if line.strip().startswith("best "))
    assert "top-1" in best and "EMA top-1" in best and "at epoch 1" in best
    assert f"weights  {run_dir / 'best.safetensors'}" in proc.stdout
    assert f"launchers/export.py {run_dir} --out {run_dir / 'export'}" in proc.stdout
    assert f"launchers/evaluate.py --checkpoint {run_dir / 'export'} --data {synthetic_root / 'val'}" in proc.stdout
    with open(run_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "12"), ("1", "18")]
    assert {"val_top1", "val_top5", "val_loss", "val_ema_top1"} <= rows[0].keys()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "train/loss" in r]
    assert len(logged) == 6 and all(r["train/grad_norm"] > 0 for r in logged)  # ZeRO-0 without clipping too


def test_images_per_second_leave_out_eval_and_checkpoint_time(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    meter = metrics.StepMeter(64, 1, 10**9, None, torch.device("cpu"))
    meter.step()
    now[0] = 1.0
    meter.pause(30.0)  # a 30 s eval and save happened inside the interval...
    now[0] = 32.0
    meter.step()
    assert meter.report()["images_per_s"] == 64.0  # ...and 2 steps of 64 images took 2 s, not 32


@pytest.mark.slow
def test_a_compiled_run_times_its_compilation_and_keeps_its_state_dict_keys(synthetic_root, tmp_path):
    """train.compile (the CUDA default) on the CPU: the first step's compile time is printed and logged, and the
    checkpoint holds the plain module keys, so export and resume do not care whether the model was compiled."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(TRAIN), *tiny_run(synthetic_root, run_dir, 3, "train.compile=true",
                                                                 "mixup.mixup=0", "mixup.cutmix=0")],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.compile: the first step took" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("perf/compile_s" in r for r in records)
    keys = torch.load(run_dir / "step_00000003" / "mp_rank_00_model_states.pt", weights_only=False)["module"].keys()
    assert "head.weight" in keys and not any("_orig_mod" in k for k in keys)


def test_a_terminal_keeps_its_progress_bar(monkeypatch):
    """Only a log file gets plain lines: on a terminal the trainer's progress is tqdm's bar, as before."""
    from tqdm import tqdm

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress.bar(10, 0, True)
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(progress.bar(10, 0, True), progress.LineProgress)


def test_the_terminal_stays_quiet(synthetic_root, tmp_path):
    """What DeepSpeed and torch print on every CPU start, once per rank, is not shown."""
    proc = subprocess.run([sys.executable, str(TRAIN), *tiny_run(synthetic_root, tmp_path / "run", 1)],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("Setting accelerator to CPU", "No CUDA runtime is found", "built successfully"):
        assert noise not in proc.stdout + proc.stderr
