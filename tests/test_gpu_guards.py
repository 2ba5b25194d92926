"""What a first GPU run needs from code a CPU runs too: a missing GPU is an error, not a slow CPU run; only this
rank's device RNG travels in a checkpoint; no torch.compile where ZeRO-3's hooks would break every graph."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline import distributed, run_state
from pipeline.config import ConfigError, load_config, resolve_device_defaults

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")


@no_gpu
@pytest.mark.parametrize("env", [{"CUDA_VISIBLE_DEVICES": "0"}, {"SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_GPUS": "0,1"}])
def test_a_gpu_asked_for_but_unusable_stops_the_run_in_one_line(monkeypatch, env):
    for key in ("CUDA_VISIBLE_DEVICES", *distributed.SLURM_GPU_VARS):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as e:
        distributed.init()
    message = str(e.value)
    assert message.startswith(f"a GPU was expected ({next(iter(env))}={next(iter(env.values()))}")
    assert f"torch {torch.__version__} cannot use one: " in message and "NVIDIA driver" in message
    assert message.endswith("(not training on the CPU)") and "\n" not in message
    if torch.version.cuda and torch.version.cuda.startswith("13."):
        assert "CUDA 13.0 needs 580 or newer" in message
    assert "RANK" not in os.environ  # stopped before anything was set up


@no_gpu
@pytest.mark.parametrize("visible", ["", "-1", "NoDevFiles"])
def test_no_gpu_asked_for_trains_on_the_cpu(monkeypatch, visible):
    for key in distributed.SLURM_GPU_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert distributed.gpu_requests() == {}
    distributed.check_gpu_expected()


def test_only_this_ranks_cuda_rng_state_is_saved_and_restored(monkeypatch):
    """A node that shows fewer GPUs at the same world size has no state for the others; every rank restores its
    own device's (the current one, which distributed.init() set). torch.cuda is stood in for: no GPU here."""
    own = torch.arange(16, dtype=torch.uint8)
    restored = []

    def every_device(*args):
        raise AssertionError("the RNG state of every visible GPU was touched")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": own)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_device)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_device)
    state = run_state.rng_state()
    assert state["cuda"] is own
    run_state.set_rng_state(state)
    assert restored == [(own, "cuda")]


def test_a_cpu_checkpoint_resumes_on_a_gpu_node_and_back(monkeypatch):
    """CPU checkpoints hold no CUDA state (``[]`` before this format, ``None`` now): nothing to restore."""
    state = run_state.rng_state()
    assert state["cuda"] is None or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a, **k: pytest.fail("restored a CUDA state from none"))
    for old_or_new in ([], None):
        run_state.set_rng_state({**state, "cuda": old_or_new})


@pytest.mark.parametrize("stage,compiled", [(0, True), (2, True), (3, False)])
def test_compile_is_on_by_default_on_a_gpu_except_under_zero3(stage, compiled):
    """ZeRO-3's parameter hooks on every submodule are torch.compiler.disable'd: a graph break per submodule."""
    cfg = load_config(overrides=[f"train.zero_stage={stage}", "ema.enabled=false"])
    resolve_device_defaults(cfg, torch.device("cuda", 0))
    assert cfg.train.compile is compiled and cfg.data.channels_last is True
    explicit = load_config(overrides=["train.zero_stage=3", "ema.enabled=false", "train.compile=true"])
    resolve_device_defaults(explicit, torch.device("cuda", 0))
    assert explicit.train.compile is True  # a user's explicit choice stands
