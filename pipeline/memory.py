"""Per-GPU memory estimate for ``launchers/submit.py --dry-run``: will this run fit before it waits in a queue?

Model states (weights, gradients, AdamW moments) come from DeepSpeed's own ZeRO estimators, the figures
``estimate_zero{2,3}_model_states_mem_needs_all_live`` print for no offload. They count 16-bit weights beside fp32
master copies; this pipeline keeps fp32 weights in every precision (bf16/fp16 are autocast compute), so each weight
a GPU holds costs 2 bytes more than DeepSpeed counts. Activations are measured: what autograd saves for backward
in a forward under the run's autocast, for one and two samples, so the per-sample part scales to the micro-batch
and the fixed part (autocast's 16-bit weight copies) does not.
"""

from __future__ import annotations

import os

import timm
import torch

import pipeline.models  # noqa: F401  (registers sovit_* with timm)
from pipeline.config import RunConfig
from pipeline.engine import autocast

GIB = 2**30


def model_state_bytes(model: torch.nn.Module, zero_stage: int, nodes: int, ranks_per_node: int) -> int:
    """Weights, gradients and optimizer state on one GPU for this ZeRO stage."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")  # no detection warning
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    world = nodes * ranks_per_node
    if zero_stage == 3:
        total, largest = stage3.model_to_params(model)
        _, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
            total, largest, num_gpus_per_node=ranks_per_node, num_nodes=nodes, cpu_offload=False,
            cpu_offload_params=False)
        return gpu + 2 * total // world
    total = stage_1_and_2.model_to_params(model)
    if zero_stage == 2:
        _, gpu = stage_1_and_2.estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=ranks_per_node, num_nodes=nodes, cpu_offload=False)
        return gpu + 2 * total
    # stages 0 and 1, which DeepSpeed has no estimator for: whole fp32 weights and gradients; the AdamW moments
    # whole (stage 0, torch's optimizer) or partitioned with DeepSpeed's fp32 master copy (stage 1)
    return 8 * total + (8 * total if zero_stage == 0 else 12 * total // world)


def activation_bytes(model: torch.nn.Module, img_size: int, precision: str, batch: int) -> int:
    """Bytes autograd saves for backward for a ``batch`` under the run's autocast, each storage counted once."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with (autocast(precision, "cpu"),
          torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)):
        model(torch.randn(batch, 3, img_size, img_size))
    return sum(seen.values())


def estimate(cfg: RunConfig, nodes: int, ranks_per_node: int) -> str:
    """The dry run's memory lines (comments, so the printed script stays a script)."""
    m = cfg.model
    model = timm.create_model(m.arch, num_classes=m.num_classes, img_size=m.img_size, head=m.head)
    n = sum(p.numel() for p in model.parameters())
    states = model_state_bytes(model, cfg.train.zero_stage, nodes, ranks_per_node) + (4 * n if cfg.ema.enabled else 0)
    one, two = (activation_bytes(model, m.img_size, cfg.train.precision, b) for b in (1, 2))
    act = one + (two - one) * (cfg.data.micro_batch_size - 1)
    return "\n".join([
        f"# per-GPU memory ESTIMATE: {m.arch}, {n / 1e6:.1f}M params, {cfg.train.precision}, ZeRO stage "
        f"{cfg.train.zero_stage}, world {nodes * ranks_per_node}, micro-batch {cfg.data.micro_batch_size}",
        f"#   model states {states / GIB:7.2f} GiB  (fp32 weights, gradients, AdamW moments: DeepSpeed's ZeRO "
        f"estimate{'; EMA weights' if cfg.ema.enabled else ''})",
        f"#   activations  {act / GIB:7.2f} GiB  (saved for backward: measured on 1 and 2 samples, scaled)",
        f"#   total        {(states + act) / GIB:7.2f} GiB  + CUDA context, DeepSpeed buffers and fragmentation "
        "(typically 1-3 GiB more)",
    ])
