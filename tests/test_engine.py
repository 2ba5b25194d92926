"""DeepSpeed engine on 2 CPU ranks (gloo): ZeRO stages agree, gradient accumulation equals a larger batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import torchrun

from pipeline.config import load_config
from pipeline.engine import deepspeed_config

WORKER = Path(__file__).with_name("zero_worker.py")


@pytest.mark.multiproc
def test_zero_stages_give_matching_losses():
    """Stages 0-3 partition state differently but compute the same update.

    fp32: all stages agree to reduction order (rel 1e-5). bf16 is autocast with fp32 master weights at every stage,
    so stages agree with each other to 5e-3 (measured 1.3e-3 after 4 steps) and with fp32 to 1e-2 (measured 3.5e-3).
    The logged gradient norm, ZeRO-0's own, ZeRO-1/2's computed from each rank's partition and all-reduced, ZeRO-3's
    from DeepSpeed, agrees as the losses do.
    """
    fp32, bf16 = torchrun(WORKER, "zero", "fp32"), torchrun(WORKER, "zero", "bf16")
    ref = fp32["0"]["losses"]
    assert len(set(ref)) == len(ref)  # the weights really moved between steps
    for stage in ("0", "1", "2", "3"):
        assert fp32[stage]["losses"] == pytest.approx(ref, rel=1e-5)
        assert fp32[stage]["norm"] == pytest.approx(fp32["0"]["norm"], rel=1e-5)
        assert bf16[stage]["losses"] == pytest.approx(bf16["0"]["losses"], rel=5e-3)
        assert bf16[stage]["losses"] == pytest.approx(ref, rel=1e-2)
        assert len(fp32[stage]["grad_norms"]) == 4
        assert fp32[stage]["grad_norms"] == pytest.approx(fp32["0"]["grad_norms"], rel=1e-5)
        assert bf16[stage]["grad_norms"] == pytest.approx(bf16["0"]["grad_norms"], rel=5e-3)


@pytest.mark.multiproc
def test_gradient_accumulation_equals_a_larger_batch():
    res = torchrun(WORKER, "accum")
    assert res["max_weight_diff"] < 1e-5 * max(1.0, res["weight_norm"])


def test_deepspeed_config_is_generated_from_the_run_config():
    cfg = load_config(["arch/sovit_19"], ["train.global_batch_size=1024", "data.micro_batch_size=32",
                                          "train.zero_stage=2", "optim.clip_grad=1.0"], world_size=16)
    ds = deepspeed_config(cfg, 16)
    assert ds["train_batch_size"] == 1024 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False}  # clipping needs DeepSpeed's norm
    # bf16 is autocast over fp32 weights, never DeepSpeed's weight-casting bf16 mode; gradients reduce in fp32
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in ds and "fp16" not in ds
    assert ds["gradient_clipping"] == 1.0
    assert ds["timers"] == {"throughput": {"enabled": False}}  # a device synchronize per forward and step
    assert cfg.scaled_lr() == pytest.approx(2e-3)  # 1e-3 at 512, linear scaling to 1024
    # no clip_grad means no clipping: DeepSpeed's own default would silently clip at 1.0
    plain = load_config(["arch/sovit_7"], world_size=1)
    assert deepspeed_config(plain, 1)["gradient_clipping"] == 0.0
    # nothing clips, so nothing needs ZeRO-1/2's per-step norm (a host read per step); the CPU's own settings
    for stage in (1, 2):
        plain.train.zero_stage = stage
        assert deepspeed_config(plain, 1)["zero_optimization"] == {"stage": stage, "overlap_comm": False,
                                                                   "compute_grad_norm": False}
        assert deepspeed_config(plain, 1, device_type="cpu")["zero_optimization"]["contiguous_gradients"] is False
    # ZeRO-0 clips in train_micro_step: DeepSpeed would clip a second time
    cfg.train.zero_stage = 0
    assert deepspeed_config(cfg, 16)["gradient_clipping"] == 0.0


@pytest.mark.slow
@pytest.mark.multiproc
def test_batchnorm_statistics_stay_fp32_under_bf16():
    """200 bf16 steps: BN buffers stay fp32 and hold, to fp32 rounding, what an fp32 BatchNorm fed the same
    inputs holds (measured 3.4e-7 relative; a bf16 buffer at momentum 0.01 rounds most updates away). Against a
    whole fp32 run, whose BN inputs differ by bf16 compute upstream, the mean relative difference is 4.8e-4."""
    res = torchrun(WORKER, "bn", "200", nproc=1)
    assert res["dtypes"] == ["torch.float32"]
    assert res["moved"] > 1.0  # the statistics really left their 0/1 start
    assert res["vs_fp32_bn_same_inputs_max_rel"] < 1e-5
    assert res["vs_fp32_run_mean_rel"] < 1e-3


@pytest.mark.multiproc
def test_two_ranks_hold_identical_batchnorm_statistics_after_eval(synthetic_root, tmp_path):
    """Each rank sees other images, so BN statistics drift apart; the trainer averages them (model and EMA) before
    every eval and save. The run also watches every torch.distributed call: none of this project's modules may
    call one directly or hand it a tensor off the rank's device."""
    res = torchrun(Path(__file__).with_name("trainer_worker.py"), "train", str(synthetic_root), str(tmp_path / "run"))
    assert res["status"] == "FINISHED"
    assert res["bn_buffers"] == 56 and res["bn_identical"]
    assert res["violations"] == []
