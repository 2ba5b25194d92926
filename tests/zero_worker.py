"""Run under torchrun by tests/test_engine.py: the same tiny training under each ZeRO stage, and gradient
accumulation against one large batch. Prints one JSON line of results on rank 0."""

from __future__ import annotations

import json
import sys

import timm
import torch

import pipeline.models  # noqa: F401
from pipeline import distributed, engine
from pipeline.config import load_config


def tiny_cfg(stage: int, precision: str, micro: int, global_batch: int):
    return load_config(overrides=[
        "model.arch=sovit_7", "model.img_size=32", "data.img_size=32", "model.num_classes=4",
        "model.drop_path_rate=0.0", f"data.micro_batch_size={micro}", f"train.global_batch_size={global_batch}",
        f"train.zero_stage={stage}", f"train.precision={precision}", "ema.enabled=false", "mixup.mixup=0",
        "mixup.cutmix=0", "mixup.label_smoothing=0", "schedule.warmup_epochs=0", "schedule.epochs=10",
        "optim.base_batch_size=8"])


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
    losses = []
    per_rank = cfg.train.global_batch_size // info.world_size
    for x, y in micro_batches(info.rank, info.world_size, steps, per_rank, accum):
        losses.append(engine.train_micro_step(eng, crit, None, x, y, engine.DTYPES[cfg.train.precision], 0).item())
    if eng.zero_optimization_stage() == 3:
        import deepspeed

        params = list(eng.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            flat = torch.cat([p.detach().float().flatten() for p in params])
    else:
        flat = torch.cat([p.detach().float().flatten() for p in eng.module.parameters()])
    return losses, flat


def main() -> None:
    mode = sys.argv[1]
    info = distributed.init()
    out = {}
    if mode == "zero":
        precision = sys.argv[2]
        for stage in (0, 1, 2, 3):
            losses, flat = train(tiny_cfg(stage, precision, 4, 4 * info.world_size), info, 4, 1, False)
            out[stage] = {"losses": losses, "checksum": flat.double().sum().item(), "norm": flat.norm().item()}
    else:  # accumulation: 2 micro-batches of 4 vs 1 batch of 8, same samples, same global batch
        g = info.world_size
        _, small_w = train(tiny_cfg(0, "fp32", 4, 8 * g), info, 2, 2, True)
        _, big_w = train(tiny_cfg(0, "fp32", 8, 8 * g), info, 2, 1, True)
        out = {"max_weight_diff": (small_w - big_w).abs().max().item(), "weight_norm": big_w.norm().item()}
    if info.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
