"""pipeline/memory.py: model states are DeepSpeed's own ZeRO estimates (with fp32 weights), activations are
measured under the run's autocast."""

from __future__ import annotations

import timm
import torch
from deepspeed.runtime.zero import stage3, stage_1_and_2

from pipeline.memory import activation_bytes, model_state_bytes


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("sovit_7", num_classes=10, img_size=32)


def test_model_states_are_deepspeeds_zero_estimates_for_fp32_weights():
    model = small_model()
    n = sum(p.numel() for p in model.parameters())
    _, zero2 = stage_1_and_2.estimate_zero2_model_states_mem_needs(n, 8, 2, cpu_offload=False)
    largest = stage3.model_to_params(model)[1]
    _, zero3, _ = stage3.estimate_zero3_model_states_mem_needs(n, largest, 8, 2, cpu_offload=False,
                                                               cpu_offload_params=False)
    assert model_state_bytes(model, 2, nodes=2, ranks_per_node=8) == zero2 + 2 * n  # fp32, not 16-bit, weights
    assert model_state_bytes(model, 3, nodes=2, ranks_per_node=8) == zero3 + 2 * n // 16
    assert model_state_bytes(model, 0, nodes=2, ranks_per_node=8) == 16 * n  # fp32 weight, gradient, 2 moments
    sizes = [model_state_bytes(model, stage, nodes=2, ranks_per_node=8) for stage in (0, 1, 2, 3)]
    assert sizes == sorted(sizes, reverse=True) and sizes[3] < sizes[0] / 8


def test_autocast_activations_are_measured_per_sample():
    model = small_model()
    fp32 = [activation_bytes(model, 32, "fp32", batch) for batch in (1, 2)]
    bf16 = [activation_bytes(model, 32, "bf16", batch) for batch in (1, 2)]
    assert fp32[1] > fp32[0] > 0
    assert bf16[1] - bf16[0] < 0.75 * (fp32[1] - fp32[0])  # saved activations are mostly 16-bit under autocast
