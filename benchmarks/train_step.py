"""Cost of the DeepSpeed engine on the CPU: images/s of an engine step vs a plain PyTorch step (same model, batch,
precision; target overhead <= 5%), and per-rank bytes of parameters, gradients and optimizer state at ZeRO 0-3
on 2 ranks.

    python benchmarks/train_step.py [--batch 16 --img-size 32 --steps 20]

The memory table is measured, not estimated: the bytes of this rank's parameter storage (ZeRO-3: its partition),
of the gradients it holds after backward (ZeRO 1-3: its reduced partition) and of the tensors in its optimizer
state (ZeRO 1/2: with the fp32 partition it owns). It runs in a 2-rank torchrun
started by this script.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import timm
import torch

import pipeline.models  # noqa: F401
from pipeline import distributed, engine
from pipeline.config import load_config


def cfg_for(stage: int, batch: int, img: int, world: int):
    return load_config(overrides=[
        "model.arch=sovit_7", f"model.img_size={img}", f"data.img_size={img}", "model.num_classes=10",
        f"data.micro_batch_size={batch}", f"train.global_batch_size={batch * world}", f"train.zero_stage={stage}",
        "train.precision=fp32", "ema.enabled=false", "mixup.mixup=0", "mixup.cutmix=0"])


def timed(step, steps: int) -> float:
    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t


def speed(args) -> None:
    distributed.init()
    cfg = cfg_for(0, args.batch, args.img_size, 1)
    x, y = torch.randn(args.batch, 3, args.img_size, args.img_size), torch.randint(0, 10, (args.batch,))
    crit = engine.build_criterion(cfg, None)

    torch.manual_seed(0)
    model = timm.create_model("sovit_7", num_classes=10, img_size=args.img_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.scaled_lr())

    def plain() -> None:
        loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    torch.manual_seed(0)
    eng, _ = engine.build_engine(cfg, timm.create_model("sovit_7", num_classes=10, img_size=args.img_size), 1, 100)

    def deepspeed_step() -> None:
        engine.train_micro_step(eng, crit, None, x, y, torch.float32, 0)

    # interleaved rounds: the machine is shared, so drift hits both sides alike
    t_plain = t_ds = 0.0
    for _ in range(args.rounds):
        t_plain += timed(plain, args.steps)
        t_ds += timed(deepspeed_step, args.steps)
    n = args.rounds * args.steps * args.batch
    print(f"sovit_7 {args.img_size}px, batch {args.batch}, fp32, {torch.get_num_threads()} thread(s)")
    print(f"plain PyTorch step : {n / t_plain:8.1f} images/s")
    print(f"DeepSpeed step     : {n / t_ds:8.1f} images/s   overhead {100 * (t_ds / t_plain - 1):+.1f}%")
    distributed.shutdown()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def gradient_bytes(eng) -> int:
    """Bytes of the gradient storage this rank holds once backward has reduced: the full ``.grad`` tensors
    (ZeRO-0), or ZeRO's partition (``averaged_gradients``, at stage 3 views into one flat buffer: each storage is
    counted once)."""
    averaged = getattr(eng.optimizer, "averaged_gradients", None) or {}
    tensors = [p.grad for p in eng.module.parameters()]
    tensors += [t for v in averaged.values() for t in (v if isinstance(v, list) else [v])]
    tensors.append(getattr(eng.optimizer, "grad_partitions_flat_buffer", None))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if torch.is_tensor(t)}
    return sum(storages.values())


def memory_worker(args) -> None:
    info = distributed.init()
    rows = {}
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        cfg = cfg_for(stage, 2, args.img_size, info.world_size)
        eng, _ = engine.build_engine(cfg, timm.create_model("sovit_7", num_classes=10, img_size=args.img_size),
                                     info.world_size, 100)
        x, y = torch.randn(2, 3, args.img_size, args.img_size), torch.randint(0, 10, (2,))
        eng.backward(engine.build_criterion(cfg, None)(eng(x), y))
        grads = gradient_bytes(eng)  # after backward, before the step frees them
        eng.step()
        params = tensor_bytes(getattr(p, "ds_tensor", p) for p in eng.module.parameters())
        base = getattr(eng.optimizer, "optimizer", eng.optimizer)  # ZeRO wraps the torch optimizer
        optim = tensor_bytes(v for s in base.state.values() for v in s.values())
        if stage in (1, 2):  # ZeRO 1/2 keep an fp32 master copy of the owned partition beside the Adam moments
            optim += tensor_bytes(getattr(eng.optimizer, "single_partition_of_fp32_groups", []))
        rows[stage] = {"params": params, "grads": grads, "optim": optim}
        del eng
    if info.rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    distributed.shutdown()


def memory(args) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, "--memory-worker", "--img-size", str(args.img_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the 2-rank memory run failed:\n{out.stderr[-3000:]}")
    rows = {int(k): v for k, v in json.loads(line.removeprefix("RESULT ")).items()}
    print(f"\n{'per-rank MiB, 2 ranks, fp32 AdamW':<34} {'params':>8} {'grads':>8} {'optim':>8} {'total':>8}   "
          "vs ZeRO-0: params grads optim total")
    for r in rows.values():
        r["total"] = r["params"] + r["grads"] + r["optim"]
    base = rows[0]
    for stage, r in rows.items():
        mib = " ".join(f"{r[k] / 2**20:8.2f}" for k in ("params", "grads", "optim", "total"))
        rel = " ".join(f"{r[k] / base[k]:5.2f}" for k in ("params", "grads", "optim", "total"))
        print(f"{'ZeRO-' + str(stage):<34} {mib}              {rel}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_worker:
        memory_worker(a)
    else:
        speed(a)
        memory(a)
