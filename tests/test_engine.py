"""DeepSpeed engine on 2 CPU ranks (gloo): ZeRO stages agree, gradient accumulation equals a larger batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.engine import deepspeed_config

WORKER = Path(__file__).with_name("zero_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, timeout: int = 400) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(WORKER), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=WORKER.parent)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.multiproc
def test_zero_stages_give_matching_losses():
    """Stages 0-3 partition state differently but compute the same update.

    fp32: all stages agree to reduction order (rel 1e-5). bf16: stages 1-3 share DeepSpeed's ZeRO bf16 optimizer
    (fp32 master weights) and agree with each other to 1e-2 and with fp32 to 2e-2; stage 0 in bf16 goes through
    DeepSpeed's unfused optimizer wrapper and drifts further (measured ~6% after 4 steps at lr 1e-3), bounded
    here at 10% - prefer ZeRO >= 1 for bf16 runs (docs/training.md).
    """
    fp32, bf16 = torchrun("zero", "fp32"), torchrun("zero", "bf16")
    ref = fp32["0"]["losses"]
    assert len(set(ref)) == len(ref)  # the weights really moved between steps
    for stage in ("1", "2", "3"):
        assert fp32[stage]["losses"] == pytest.approx(ref, rel=1e-5)
        assert fp32[stage]["norm"] == pytest.approx(fp32["0"]["norm"], rel=1e-5)
        assert bf16[stage]["losses"] == pytest.approx(bf16["1"]["losses"], rel=1e-2)
        assert bf16[stage]["losses"] == pytest.approx(ref, rel=2e-2)
    assert bf16["0"]["losses"] == pytest.approx(ref, rel=1e-1)


@pytest.mark.multiproc
def test_gradient_accumulation_equals_a_larger_batch():
    res = torchrun("accum")
    assert res["max_weight_diff"] < 1e-5 * max(1.0, res["weight_norm"])


def test_deepspeed_config_is_generated_from_the_run_config():
    cfg = load_config(["arch/sovit_19"], ["train.global_batch_size=1024", "data.micro_batch_size=32",
                                          "train.zero_stage=2", "optim.clip_grad=1.0"], world_size=16)
    ds = deepspeed_config(cfg, 16)
    assert ds["train_batch_size"] == 1024 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds and ds["gradient_clipping"] == 1.0
    assert cfg.scaled_lr() == pytest.approx(2e-3)  # 1e-3 at 512, linear scaling to 1024
    # no clip_grad means no clipping: DeepSpeed's own default would silently clip at 1.0
    assert deepspeed_config(load_config(["arch/sovit_7"], world_size=1), 1)["gradient_clipping"] == 0.0
