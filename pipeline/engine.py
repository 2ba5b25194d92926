"""DeepSpeed around So-ViT: the generated DeepSpeed config, the recipe's optimizer/schedule/loss, train and eval steps.

The DeepSpeed config is derived from the RunConfig every time (never a hand-edited JSON that drifts). The lr
schedule is timm's cosine with warmup, stepped per optimizer update by us rather than by DeepSpeed, because
DeepSpeed steps a client scheduler once per ``engine.step()`` with no notion of timm's per-update API.

Precision: every mode keeps fp32 parameters, optimizer state and BatchNorm statistics; bf16 and fp16 are
autocast compute (DeepSpeed's ``torch_autocast``, with a gradient scaler for fp16). DeepSpeed's own bf16/fp16
modes, which cast the weights, were measured 1.4-2.6x slower than a plain autocast step on an H200 and round
BatchNorm's small running-statistic updates away (docs/training.md), so they are not offered.

Nothing here waits for the device or reads a value back to the host per step, at ZeRO 0, 1 and 2: the loss
stays on the device, and the NaN check happens where the trainer syncs anyway (the log interval and before every
save). DeepSpeed's defaults would sync: its throughput timer synchronizes the device in every forward and step, and
ZeRO-1/2 compute and read back the gradient norm every step. Both are switched off below; the norm is computed on
log steps only, and ZeRO-0 clips itself (``grad_norm_``, on the device) instead of DeepSpeed's clipping, which
copies two host scalars to the device per step. Only clipping at ZeRO 1-2 still reads the norm back per step
(DeepSpeed checks it on the host); ZeRO-3 syncs in its parameter gathering in any case. ``pipeline.syncs`` counts.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import accuracy

from data_loaders.errors import SovitError

from . import distributed
from .config import RunConfig

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> compute dtype; fp32: none


def autocast(precision: str, device_type: str) -> torch.autocast:
    """The compute of ``train.precision`` on ``device_type``: autocast to its dtype, or off for fp32."""
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES.get(precision, torch.float32),
                          enabled=precision in AUTOCAST_DTYPES)


def deepspeed_config(cfg: RunConfig, world_size: int, load_universal: bool = False,
                     device_type: str = "cuda") -> dict[str, Any]:
    t = cfg.train
    clip = cfg.optim.clip_grad or 0.0
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "zero_optimization": zero_config(t.zero_stage, clip, device_type),
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        # on by default: a device-wide synchronize in every forward and step, which torch.compile cannot even trace
        # (the forward pre-hook's synchronize(None) crashes dynamo in torch 2.14 from the third step). We time steps.
        "timers": {"throughput": {"enabled": False}},
        # DeepSpeed clips at 1.0 unless told otherwise; the DeiT recipe does not clip (optim.clip_grad: null).
        # ZeRO-0 clips in train_micro_step instead, without DeepSpeed's per-step host-to-device copies.
        "gradient_clipping": clip if t.zero_stage > 0 else 0.0,
    }
    if load_universal:  # resuming on another world size (see elastic.prepare_elastic)
        ds["checkpoint"] = {"load_universal": True}
    if t.precision in AUTOCAST_DTYPES:
        # no module's gradients are reduced in the compute dtype: DeepSpeed's default list (Linear, Conv) would
        # round those gradients to bf16/fp16 at ZeRO 1-3, even on one rank, where ZeRO-0 reduces in fp32
        ds["torch_autocast"] = {"enabled": True, "dtype": str(AUTOCAST_DTYPES[t.precision]).removeprefix("torch."),
                                "lower_precision_safe_modules": []}
    return ds


def zero_config(stage: int, clip: float, device_type: str) -> dict[str, Any]:
    """ZeRO's section; ZeRO-0 and ZeRO-3 keep DeepSpeed's defaults. At ZeRO-1/2:

    - ``compute_grad_norm`` off without clipping: the norm would be computed and read back to the host every step;
      the trainer computes it on log steps only.
    - ``overlap_comm`` off (DeepSpeed's default below ZeRO-3, written down): on CUDA it synchronizes the device
      before every bucket it reduces.
    - on the CPU, ``contiguous_gradients`` off: its buffers cost 9-16k fresh pages (page faults) per step there, and
      dropping them took the sovit_7 step from 0.72x to 0.86x (ZeRO-1) and 0.82x (ZeRO-2) of the plain step
      (docs/training.md). On CUDA DeepSpeed's defaults stay until a GPU measures otherwise."""
    zero: dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        zero["overlap_comm"] = False
        if not clip:
            zero["compute_grad_norm"] = False
        if device_type == "cpu":
            zero["contiguous_gradients"] = False
    return zero


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW without decay on norms, biases and tokens; torch's fused kernel on every device: one launch per step
    instead of one per tensor group on a GPU (67 -> 49 ms per sovit_19 step on an H200), 1.15x (sovit_7) and 1.27x
    (sovit_19) faster plain steps on a CPU. With fp16 it also takes the gradient scaler's inf check itself, so a
    skipped step costs no host read."""
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, cfg.optim.weight_decay, no_weight_decay_list=no_decay)
    return torch.optim.AdamW(groups, lr=cfg.scaled_lr(), betas=cfg.optim.betas, eps=cfg.optim.eps, fused=True)


def build_engine(cfg: RunConfig, model: torch.nn.Module, world_size: int, updates_per_epoch: int,
                 load_universal: bool = False):
    """Wrap ``model`` (already on its device) in a DeepSpeed engine with AdamW and the cosine schedule."""
    import deepspeed  # here, not at import: distributed.init() picks DeepSpeed's accelerator first

    device = next(model.parameters()).device
    optimizer = build_optimizer(cfg, model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg, world_size, load_universal, device.type))
    to_param_layout(cfg, engine.module)
    if world_size == 1 and cfg.train.zero_stage == 0:
        engine.enable_backward_allreduce = False  # one rank has nothing to average: skip flatten + copy per step
    if cfg.train.compile:  # in place: engine.module's state-dict keys (checkpoints, export) are unchanged
        engine.compile()  # compilation itself happens in the first steps; the trainer times them
    s = cfg.schedule
    scheduler = CosineLRScheduler(
        engine.optimizer, t_initial=s.epochs * updates_per_epoch, lr_min=s.min_lr,
        warmup_t=s.warmup_epochs * updates_per_epoch, warmup_lr_init=s.warmup_lr, t_in_epochs=False)
    return engine, scheduler


def to_param_layout(cfg: RunConfig, module: torch.nn.Module) -> None:
    """Conv weights channels_last, in place, where the engine keeps them so: at ZeRO-0 with data.channels_last, and
    only once DeepSpeed is initialized, whose first broadcast views each parameter as bytes (which a channels_last
    weight cannot be). ZeRO 1-3 hold every parameter in flat contiguous buffers; there only the input is
    channels_last. The EMA goes through here too: with strides unequal to the model's, timm's foreach lerp falls
    back to one kernel per tensor (hundreds of launches per step)."""
    if cfg.data.channels_last and cfg.train.zero_stage == 0:
        module.to(memory_format=torch.channels_last)


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


class NonFiniteLoss(SovitError):
    """The loss became NaN/inf: training stops with status FAILED (the trainer names the last good checkpoint)."""

    exit_code = 1  # the run failed; its config and data were fine


def train_micro_step(engine, criterion, mixup: Mixup | None, images: torch.Tensor, labels: torch.Tensor,
                     channels_last: bool = False, grad_norm: bool = False, clip_grad: float | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward/backward of a micro-batch; ``engine.step()`` applies the update at the accumulation boundary.

    Returns the loss, detached and still on the device (reading it would stall the GPU queue every step), and with
    ``grad_norm`` the global norm of the unscaled gradients before clipping, also on the device. ``clip_grad`` must
    be the run's ``optim.clip_grad``: ZeRO-0 clips here (its DeepSpeed config says 0), ZeRO 1-3 inside DeepSpeed."""
    if mixup is not None:
        images, labels = mixup(images, labels)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    loss = criterion(engine(images).float(), labels)
    engine.backward(loss)  # at the accumulation boundary this also averages ZeRO-0 gradients over ranks
    boundary = engine.is_gradient_accumulation_boundary()
    norm = _norm_before_step(engine, grad_norm, clip_grad) if boundary else None
    engine.step()
    if boundary and grad_norm and norm is None:
        norm = engine.get_global_grad_norm()
    return loss.detach(), norm


def _norm_before_step(engine, wanted: bool, clip_grad: float | None) -> torch.Tensor | None:
    """The global gradient norm, where DeepSpeed does not compute it: at ZeRO-0 (clipping too, if asked) and, on
    log steps, at ZeRO-1/2 without clipping. ``None`` where DeepSpeed has it after the step (``clip_grad`` at
    ZeRO 1-2, ZeRO-3) or where nothing asks for it."""
    stage = engine.zero_optimization_stage()
    if stage == 0 and (wanted or clip_grad):
        if engine.torch_autocast_z0_gradscaler is not None:  # fp16: the norm and the clip are of true gradients
            engine.torch_autocast_z0_gradscaler.unscale_(engine.optimizer)
        return grad_norm_(list(engine.module.parameters()), clip_grad)
    if stage in (1, 2) and wanted and not clip_grad:
        return engine.optimizer.scaled_global_norm()  # this rank's partition, all-reduced (no fp16 above ZeRO-0)
    return None


def grad_norm_(params: list[torch.Tensor], clip_grad: float | None) -> torch.Tensor:
    """The gradients' global norm, and with ``clip_grad`` the gradients scaled down to it, all on the device: as
    DeepSpeed clips (max / (norm + 1e-6), never above 1), without its two host-to-device copies per step."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    if clip_grad:
        torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm, foreach=True)
    return norm


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

    The sums stay on the device and the image count on the host: one host sync per evaluation, none per batch."""
    was_training = model.training
    model.eval()
    sums, n = torch.zeros(3, dtype=torch.float64, device=device), 0  # top-1 hits, top-5 hits, loss sum; images
    amp = autocast(precision, device.type)
    for images, labels in loader:
        sums += eval_step(model, images, labels, amp)
        n += labels.shape[0]
        if progress is not None:
            progress.update(1)
    n, top1, top5, loss = distributed.all_reduce(torch.cat([sums.new_tensor([n]), sums])).tolist()
    model.train(was_training)
    per = 1 / max(n, 1.0)
    return {"top1": 100 * top1 * per, "top5": 100 * top5 * per, "loss": loss * per, "samples": int(n)}


def eval_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, autocast) -> torch.Tensor:
    """One val batch's top-1 hits, top-5 hits and summed loss, as a float64 tensor on the batch's device."""
    with autocast:
        logits = model(images).float()
    top1, top5 = accuracy(logits, labels, topk=(1, min(5, logits.shape[1])))
    n = labels.shape[0]
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    return torch.stack([top1 * n / 100, top5 * n / 100, loss]).double()
