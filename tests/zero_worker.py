"""Run under torchrun by tests/test_engine.py: the same tiny training under each ZeRO stage, gradient accumulation
against one large batch, and BatchNorm running statistics under bf16 against fp32. Prints one JSON line of results
on rank 0."""

from __future__ import annotations

import copy
import functools
import json
import sys

import timm
import torch

import pipeline.models  # noqa: F401
from pipeline import distributed, engine
from pipeline.config import load_config


def tiny_cfg(stage: int, precision: str, micro: int, global_batch: int, *extra: str):
    return load_config(overrides=[
        "model.arch=sovit_7", "model.img_size=32", "data.img_size=32", "model.num_classes=4",
        "model.drop_path_rate=0.0", f"data.micro_batch_size={micro}", f"train.global_batch_size={global_batch}",
        f"train.zero_stage={stage}", f"train.precision={precision}", "ema.enabled=false", "mixup.mixup=0",
        "mixup.cutmix=0", "mixup.label_smoothing=0", "schedule.warmup_epochs=0", "schedule.epochs=10",
        "optim.base_batch_size=8", *extra])


def micro_batches(rank: int, world: int, steps: int, per_rank: int, accum: int):
    """Each step's global batch is drawn once; a rank takes its slice, split into ``accum`` micro-batches."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        n = per_rank * world
        x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        out += list(zip(x.chunk(accum), y.chunk(accum), strict=True))
    return out


def train(cfg, info, steps: int, accum: int, eval_bn: bool):
    torch.manual_seed(0)
    model = timm.create_model("sovit_7", num_classes=4, img_size=32)
    eng, _ = engine.build_engine(cfg, model, info.world_size, updates_per_epoch=100)
    if eval_bn:
        eng.eval()  # BatchNorm on running stats: a 2B batch and 2 x B accumulation then see the same function
    crit = engine.build_criterion(cfg, None)
    losses, norms = [], []
    per_rank = cfg.train.global_batch_size // info.world_size
    for x, y in micro_batches(info.rank, info.world_size, steps, per_rank, accum):
        loss, norm = engine.train_micro_step(eng, crit, None, x, y, grad_norm=True)
        losses.append(loss.item())
        norms += [] if norm is None else [float(norm)]
    if eng.zero_optimization_stage() == 3:
        import deepspeed

        params = list(eng.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            flat = torch.cat([p.detach().float().flatten() for p in params])
    else:
        flat = torch.cat([p.detach().float().flatten() for p in eng.module.parameters()])
    return losses, flat, norms


def bn_statistics(precision: str, info, steps: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Running statistics after ``steps`` training steps at a negligible lr (the weights, hence the BatchNorm
    inputs, stay the same in both precisions), on inputs whose statistics differ from BN's initial 0/1; and the
    statistics an fp32 BatchNorm fed the very same inputs holds (a shadow copy behind a forward pre-hook)."""
    cfg = tiny_cfg(0, precision, 8, 8 * info.world_size, "optim.lr=1e-12")
    torch.manual_seed(0)
    eng, _ = engine.build_engine(cfg, timm.create_model("sovit_7", num_classes=4, img_size=32),
                                 info.world_size, updates_per_epoch=100)
    shadows = {}
    for name, m in eng.module.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            shadows[name] = copy.deepcopy(m).float()
            m.register_forward_pre_hook(functools.partial(_feed, shadows[name]))
    g = torch.Generator().manual_seed(1)
    crit = engine.build_criterion(cfg, None)
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=g) * 1.5 + 0.3
        engine.train_micro_step(eng, crit, None, x, torch.randint(0, 4, (8,), generator=g))
    stats = {k: v.detach().clone() for k, v in eng.module.state_dict().items() if "running_" in k}
    shadow = {f"{n}.{k}": v.clone() for n, s in shadows.items() for k, v in s.state_dict().items() if "running_" in k}
    return stats, shadow


def _feed(shadow: torch.nn.Module, module: torch.nn.Module, inputs: tuple[torch.Tensor]) -> None:
    with torch.no_grad():
        shadow(inputs[0].float())


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).abs() / b.float().abs().clamp_min(1.0)


def main() -> None:
    mode = sys.argv[1]
    info = distributed.init()
    out = {}
    if mode == "bn":
        steps = int(sys.argv[2])
        (fp32, _), (bf16, shadow) = bn_statistics("fp32", info, steps), bn_statistics("bf16", info, steps)
        out = {"dtypes": sorted({str(v.dtype) for v in bf16.values()}),
               "vs_fp32_run_mean_rel": torch.cat([_rel(bf16[k], fp32[k]).flatten() for k in fp32]).mean().item(),
               "vs_fp32_bn_same_inputs_max_rel": max(_rel(bf16[k], shadow[k]).max().item() for k in shadow),
               "moved": max((fp32[k] - (0.0 if "mean" in k else 1.0)).abs().max().item() for k in fp32)}
    elif mode == "zero":
        precision = sys.argv[2]
        for stage in (0, 1, 2, 3):
            losses, flat, grad_norms = train(tiny_cfg(stage, precision, 4, 4 * info.world_size), info, 4, 1, False)
            out[stage] = {"losses": losses, "checksum": flat.double().sum().item(), "norm": flat.norm().item(),
                          "grad_norms": grad_norms}
    else:  # accumulation: 2 micro-batches of 4 vs 1 batch of 8, same samples, same global batch
        g = info.world_size
        _, small_w, _ = train(tiny_cfg(0, "fp32", 4, 8 * g), info, 2, 2, True)
        _, big_w, _ = train(tiny_cfg(0, "fp32", 8, 8 * g), info, 2, 1, True)
        out = {"max_weight_diff": (small_w - big_w).abs().max().item(), "weight_norm": big_w.norm().item()}
    if info.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
