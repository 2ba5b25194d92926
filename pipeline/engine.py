"""DeepSpeed around So-ViT: the generated DeepSpeed config, the recipe's optimizer/schedule/loss, train and eval steps.

The DeepSpeed config is derived from the RunConfig every time (never a hand-edited JSON that drifts). The lr
schedule is timm's cosine with warmup, stepped per optimizer update by us rather than by DeepSpeed, because
DeepSpeed steps a client scheduler once per ``engine.step()`` with no notion of timm's per-update API.

Precision: every mode keeps fp32 parameters, optimizer state and BatchNorm statistics; bf16 and fp16 are
autocast compute (DeepSpeed's ``torch_autocast``, with a gradient scaler for fp16). DeepSpeed's own bf16/fp16
modes, which cast the weights, were measured 1.4-2.6x slower than a plain autocast step on an H200 and round
BatchNorm's small running-statistic updates away (docs/training.md), so they are not offered.

Nothing here reads a value back to the host per step: the loss stays on the device, and the NaN check happens
where the trainer syncs anyway (the log interval and before every save).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import accuracy

from . import distributed
from .config import RunConfig

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def deepspeed_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    t = cfg.train
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        # DeepSpeed clips at 1.0 unless told otherwise; the DeiT recipe does not clip (optim.clip_grad: null)
        "gradient_clipping": cfg.optim.clip_grad or 0.0,
    }
    if load_universal:  # resuming on another world size (see checkpoint.prepare_elastic)
        ds["checkpoint"] = {"load_universal": True}
    if t.precision in AUTOCAST_DTYPES:
        ds["torch_autocast"] = {"enabled": True, "dtype": AUTOCAST_DTYPES[t.precision]}
    return ds


def build_optimizer(cfg: RunConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW without decay on norms, biases and tokens; the fused CUDA kernel on a GPU (one launch per step instead
    of one per tensor group: 67 -> 49 ms per sovit_19 step on an H200)."""
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, cfg.optim.weight_decay, no_weight_decay_list=no_decay)
    return torch.optim.AdamW(groups, lr=cfg.scaled_lr(), betas=cfg.optim.betas, eps=cfg.optim.eps,
                             fused=device.type == "cuda")


def build_engine(cfg: RunConfig, model: torch.nn.Module, world_size: int, updates_per_epoch: int,
                 load_universal: bool = False):
    """Wrap ``model`` (already on its device) in a DeepSpeed engine with AdamW and the cosine schedule."""
    import deepspeed  # here, not at import: distributed.init() picks DeepSpeed's accelerator first

    device = next(model.parameters()).device
    if cfg.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model, device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg, world_size, load_universal))
    if world_size == 1 and cfg.train.zero_stage == 0:
        engine.enable_backward_allreduce = False  # one rank has nothing to average: skip flatten + copy per step
    if cfg.train.compile:  # in place: engine.module's state-dict keys (checkpoints, export) are unchanged
        engine.compile()  # compilation itself happens in the first steps; the trainer times them
    s = cfg.schedule
    scheduler = CosineLRScheduler(
        engine.optimizer, t_initial=s.epochs * updates_per_epoch, lr_min=s.min_lr,
        warmup_t=s.warmup_epochs * updates_per_epoch, warmup_lr_init=s.warmup_lr, t_in_epochs=False)
    return engine, scheduler


def total_epochs(cfg: RunConfig) -> int:
    """The schedule's epochs plus the cooldown at min_lr (timm's scheduler holds lr_min past t_initial)."""
    return cfg.schedule.epochs + cfg.schedule.cooldown_epochs


def build_mixup(cfg: RunConfig) -> Mixup | None:
    m = cfg.mixup
    if (m.mixup <= 0 and m.cutmix <= 0) or m.prob <= 0:
        return None
    return Mixup(mixup_alpha=m.mixup, cutmix_alpha=m.cutmix, prob=m.prob, switch_prob=m.switch_prob, mode=m.mode,
                 label_smoothing=m.label_smoothing, num_classes=cfg.model.num_classes)


def build_criterion(cfg: RunConfig, mixup: Mixup | None) -> torch.nn.Module:
    if mixup is not None:
        return SoftTargetCrossEntropy()  # mixup already smoothed the targets
    if cfg.mixup.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.mixup.label_smoothing)
    return torch.nn.CrossEntropyLoss()


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf: training stops with status FAILED (the trainer names the last good checkpoint)."""


def train_micro_step(engine, criterion, mixup: Mixup | None, images: torch.Tensor, labels: torch.Tensor,
                     channels_last: bool = False, grad_norm: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward/backward of a micro-batch; ``engine.step()`` applies the update at the accumulation boundary.

    Returns the loss, detached and still on the device (reading it would stall the GPU queue every step), and with
    ``grad_norm`` the gradients' global norm where DeepSpeed does not compute one itself: ZeRO-0 without clipping
    (ZeRO 1-3 and clipping report theirs through ``engine.get_global_grad_norm()``)."""
    if mixup is not None:
        images, labels = mixup(images, labels)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    loss = criterion(engine(images).float(), labels)
    engine.backward(loss)  # at the accumulation boundary this also averages ZeRO-0 gradients over ranks
    norm = None
    if grad_norm and engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
        norm = torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters() if p.grad is not None])
    engine.step()
    return loss.detach(), norm


def check_finite(loss: torch.Tensor, step: int) -> float:
    """The host's look at the loss (one sync): raise NonFiniteLoss on NaN/inf, else return it as a float."""
    value = loss.item()
    if value != value or abs(value) == float("inf"):
        raise NonFiniteLoss(f"loss is {value} at optimizer step {step} (lower optim.lr, or set optim.clip_grad)")
    return value


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, precision: str, device: torch.device,
             progress=None) -> dict[str, float]:
    """Top-1/top-5 and loss over this rank's val shard, summed across ranks (shards differ in size).

    Sums stay on the device until the end: one host sync per evaluation, not three per batch."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1 hits, top5 hits, loss sum
    autocast = torch.autocast(device.type, dtype=getattr(torch, AUTOCAST_DTYPES.get(precision, "float32")),
                              enabled=precision in AUTOCAST_DTYPES)
    for images, labels in loader:
        with autocast:
            logits = model(images).float()
        top1, top5 = accuracy(logits, labels, topk=(1, min(5, logits.shape[1])))
        n = labels.shape[0]
        sums += torch.stack([torch.tensor(n, device=device, dtype=torch.float64), top1 * n / 100, top5 * n / 100,
                             torch.nn.functional.cross_entropy(logits, labels, reduction="sum")]).double()
        if progress is not None:
            progress.update(1)
    sums = distributed.all_reduce(sums).tolist()
    model.train(was_training)
    n = max(sums[0], 1.0)
    return {"top1": 100 * sums[1] / n, "top5": 100 * sums[2] / n, "loss": sums[3] / n, "samples": int(sums[0])}
