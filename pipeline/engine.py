"""DeepSpeed around So-ViT: the generated DeepSpeed config, the recipe's optimizer/schedule/loss, train and eval steps.

The DeepSpeed config is derived from the RunConfig every time (never a hand-edited JSON that drifts). The lr
schedule is timm's cosine with warmup, stepped per optimizer update by us rather than by DeepSpeed, because
DeepSpeed steps a client scheduler once per ``engine.step()`` with no notion of timm's per-update API.
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import accuracy

from .config import RunConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    return ds


def build_engine(cfg: RunConfig, model: torch.nn.Module, world_size: int, updates_per_epoch: int,
                 load_universal: bool = False):
    """Wrap ``model`` in a DeepSpeed engine with AdamW (no decay on norms, biases, tokens) and the cosine schedule."""
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, cfg.optim.weight_decay, no_weight_decay_list=no_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.scaled_lr(), betas=cfg.optim.betas, eps=cfg.optim.eps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg, world_size, load_universal))
    if world_size == 1 and cfg.train.zero_stage == 0:
        engine.enable_backward_allreduce = False  # one rank has nothing to average: skip flatten + copy per step
    dtype = DTYPES[cfg.train.precision]
    for buf in engine.module.buffers():  # DeepSpeed casts parameters only: BN statistics must follow them
        if buf.is_floating_point():
            buf.data = buf.data.to(dtype)
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
    """The loss became NaN/inf: training stops; the last good checkpoint is kept."""


def train_micro_step(engine, criterion, mixup: Mixup | None, images: torch.Tensor, labels: torch.Tensor,
                     dtype: torch.dtype, step: int) -> torch.Tensor:
    """One forward/backward of a micro-batch; ``engine.step()`` applies the update at the accumulation boundary."""
    if mixup is not None:
        images, labels = mixup(images, labels)
    loss = criterion(engine(images.to(dtype)).float(), labels)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss.item()} at optimizer step {step}: stopping; the last good checkpoint is "
                            "kept (lower optim.lr, or enable optim.clip_grad)")
    engine.backward(loss)
    engine.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """Top-1/top-5 and loss over this rank's val shard, summed across ranks (shards differ in size)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1 hits, top5 hits, loss sum
    for images, labels in loader:
        logits = model(images.to(dtype)).float()
        top1, top5 = accuracy(logits, labels, topk=(1, min(5, logits.shape[1])))
        n = labels.shape[0]
        sums += torch.tensor([n, top1.item() * n / 100, top5.item() * n / 100,
                              torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()],
                             dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    n = max(sums[0].item(), 1.0)
    return {"top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n, "loss": sums[3].item() / n,
            "samples": int(sums[0].item())}
