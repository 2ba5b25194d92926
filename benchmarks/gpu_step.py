"""Step speed: the best plain PyTorch step vs this repo's engine step, train.py end to end, per-rank ZeRO bytes.

    python benchmarks/gpu_step.py                               # CUDA: bf16, 224 px, compile, channels_last
    python benchmarks/gpu_step.py --device cpu --img-size 32    # the CPU: fp32, no compile, small batches (CI)

step    sovit_7 at batch 128 and sovit_19 at batch 64 (CPU: 8 and 4) on synthetic tensors already on the device:
        the plain step (autocast, fp32 weights, fused AdamW over timm's param_groups_weight_decay, channels_last,
        torch.compile; cross-entropy) and ``pipeline.engine``'s step (``build_engine`` + ``train_micro_step``) on
        the same model, batch and precision at ZeRO-0 and ZeRO-1 on one rank. Each variant runs its warm-up steps
        (compiling), then rounds of timed steps interleave the variants, so drift on a shared machine hits all
        alike; the ratio is engine images/s over plain images/s, printed beside its target.
e2e     ``launchers/train.py`` on the first arch and batch with each importable loader (synthetic JPEGs of 256 px
        for a 224 crop, 4 classes): images/s and data-wait fraction from the run's metrics.jsonl, leaving out the
        first logged interval (compile) and those holding an epoch start (worker start-up, which a real epoch of
        thousands of steps amortises).
memory  bytes per rank of parameters, gradients (after backward) and optimizer state at ZeRO 0-3 on 2 ranks
        (torchrun of this script; on CUDA it needs 2 devices): the memory the ZeRO-1 ratio pays for.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# run as a script, its own folder is on sys.path and the project root is not: the helpers shared with the smoke test
# are imported by their full name, benchmarks.gpu_smoke, never as a top-level module called gpu_smoke
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_smoke import (
    CLASSES,
    CheckFailed,
    Process,
    child_env,
    launch_command,
    make_data,
    missing_loaders,
    read_jsonl,
    report_failure,
    throughput,
    train_command,
    workers,
)

TARGETS = {0: 0.90, 1: 0.80, 2: 0.80}  # engine images/s over plain images/s, by ZeRO stage
DEFAULT_ARCHS = {"cuda": ["sovit_7:128", "sovit_19:64"], "cpu": ["sovit_7:8", "sovit_19:4"]}
# step timing (the defaults of --warmup --steps --rounds); e2e steps per epoch, epochs, log interval
PROFILES = {"cuda": {"warmup": 10, "steps": 30, "rounds": 3, "epoch": 16, "epochs": 3, "log": 4},
            "cpu": {"warmup": 2, "steps": 3, "rounds": 2, "epoch": 6, "epochs": 3, "log": 2}}


def step_config(arch: str, batch: int, img: int, zero: int, on_gpu: bool):
    """The engine's RunConfig for one step variant: ImageNet's 1000-class head (no data to count classes from), no
    mixup or label smoothing, so the loss is plain CE."""
    from pipeline.config import load_config

    flag = str(on_gpu).lower()
    return load_config(overrides=[
        f"model.arch={arch}", f"model.img_size={img}", f"data.img_size={img}", "model.num_classes=1000",
        f"data.micro_batch_size={batch}",
        f"train.global_batch_size={batch}", f"train.zero_stage={zero}", f"data.channels_last={flag}",
        f"train.precision={'bf16' if on_gpu else 'fp32'}", f"train.compile={flag}", "mixup.mixup=0", "mixup.cutmix=0",
        "mixup.label_smoothing=0", "ema.enabled=false", "tracking.enabled=false"])


def new_model(cfg, device):
    import timm
    import torch

    import pipeline.models  # noqa: F401  (registers sovit_* with timm)

    torch.manual_seed(0)
    return timm.create_model(cfg.model.arch, num_classes=cfg.model.num_classes, img_size=cfg.model.img_size).to(device)


def plain_step(cfg, device, x, y) -> Callable[[], None]:
    """The best step plain PyTorch offers for this model, the reference the engine is measured against."""
    import torch
    from timm.optim import param_groups_weight_decay

    model = new_model(cfg, device)
    if cfg.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = param_groups_weight_decay(model, cfg.optim.weight_decay, no_weight_decay_list=model.no_weight_decay())
    opt = torch.optim.AdamW(groups, lr=cfg.scaled_lr(), betas=cfg.optim.betas, fused=True)
    forward = torch.compile(model) if cfg.train.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    criterion = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with autocast:
            logits = forward(x)
        criterion(logits.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def engine_step(cfg, device, x, y) -> Callable[[], None]:
    from pipeline import engine

    eng, _ = engine.build_engine(cfg, new_model(cfg, device), 1, updates_per_epoch=100)
    criterion = engine.build_criterion(cfg, None)
    return lambda: engine.train_micro_step(eng, criterion, None, x, y, bool(cfg.data.channels_last))


def warm_up(step: Callable[[], None], n: int, sync: Callable[[], None]) -> float:
    """Seconds of ``n`` untimed steps (the first ones compile)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return time.perf_counter() - t0


def time_rounds(steps: dict[str, Callable[[], None]], timed: int, rounds: int,
                sync: Callable[[], None]) -> dict[str, float]:
    """Seconds per step of each of ``steps``: ``rounds`` rounds of ``timed`` steps, interleaved round by round so
    that drift on the machine hits all alike. ``sync`` waits for the device (torch.cuda.synchronize), so the timer
    reads finished work, not queued launches."""
    total = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(timed):
                step()
            sync()
            total[name] += time.perf_counter() - t0
    return {name: t / (rounds * timed) for name, t in total.items()}


def bench_steps(arch: str, batch: int, img: int, zeros: list[int], device, prof: dict) -> bool:
    """One line per step variant; False when a variant failed (the others are still measured: a first run on a new
    machine should not lose every figure to one error)."""
    import torch

    on_gpu = device.type == "cuda"
    cfgs = {zero: step_config(arch, batch, img, zero, on_gpu) for zero in zeros}
    cfg = cfgs[zeros[0]]
    fmt = torch.channels_last if cfg.data.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, img, img, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, cfg.model.num_classes, (batch,), device=device)
    builders = {"plain PyTorch": lambda: plain_step(cfg, device, x, y)}
    builders.update({f"engine ZeRO-{z}": (lambda c=c: engine_step(c, device, x, y)) for z, c in cfgs.items()})
    sync = torch.cuda.synchronize if on_gpu else lambda: None
    steps, setup = {}, {}
    for name, build in builders.items():
        try:
            step = build()
            setup[name] = warm_up(step, prof["warmup"], sync)
        except Exception as e:
            print(f"FAIL {arch} batch {batch} {name}: {type(e).__name__}: {e}", flush=True)
        else:
            steps[name] = step
    seconds = time_rounds(steps, prof["steps"], prof["rounds"], sync)
    base = seconds.get("plain PyTorch")
    for name, s in seconds.items():
        line = f"{arch:<9} batch {batch:<4} {name:<14} {1e3 * s:9.2f} ms/step {batch / s:9.1f} img/s"
        if name.startswith("engine") and base:
            target = TARGETS[int(name[-1])]
            line += f"   ratio {base / s:.2f} (target >= {target:.2f}: {'met' if base / s >= target else 'MISSED'})"
        print(f"{line}   [warm-up {setup[name]:.1f} s]", flush=True)
    return len(steps) == len(builders)


# ---------------------------------------------------------------------------------------------- train.py end to end


def e2e(arch: str, batch: int, args, prof: dict, work: Path) -> bool:
    """train.py with each importable loader: steady-state images/s and data-wait fraction from metrics.jsonl; False
    when a run failed."""
    missing = missing_loaders(args.loaders)
    for name, reason in missing.items():
        print(f"SKIP e2e {name}: {reason}", flush=True)
    loaders = [n for n in args.loaders if n not in missing]
    if not loaders:
        return True
    per_epoch, log = prof["epoch"], prof["log"]
    data = make_data(work, loaders, train_images=per_epoch * batch, val_images=CLASSES, size=args.img_size)
    steps, ok = per_epoch * prof["epochs"], True
    for name in loaders:
        run_dir = work / f"e2e-{name}"
        sets = [f"model.arch={arch}", f"model.img_size={args.img_size}", f"data.img_size={args.img_size}",
                f"model.num_classes={CLASSES}", f"data.loader={name}", f"data.train={data[name][0]}",
                f"data.val={data[name][1]}", f"data.micro_batch_size={batch}", f"train.global_batch_size={batch}",
                f"data.workers={workers(1)}", f"train.max_steps={steps}", f"schedule.epochs={prof['epochs']}",
                "schedule.warmup_epochs=0", "schedule.cooldown_epochs=0", f"train.log_every_steps={log}",
                f"train.eval_every_epochs={prof['epochs']}", f"checkpoint.run_dir={run_dir}", "tracking.enabled=false"]
        if args.device == "cpu":
            sets.append("train.precision=fp32")
        try:
            with Process(train_command(sets, 1), work / f"e2e-{name}.log", child_env(args.device)) as proc:
                proc.expect_exit(args.timeout, "train.py")
            ips, wait = throughput(read_jsonl(run_dir / "metrics.jsonl"),
                                   left_out=lambda step: (step - log) % per_epoch == 0)
        except CheckFailed as e:
            report_failure(f"e2e {name}", e)
            ok = False
            continue
        print(f"e2e train.py {name:<12} {arch} batch {batch}: {ips:9.1f} img/s, data wait {100 * wait:4.1f}% "
              f"({steps} steps)", flush=True)
    return ok


# ---------------------------------------------------------------------------------------------- per-rank ZeRO bytes


def tensor_bytes(tensors) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def gradient_bytes(eng) -> int:
    """Bytes of the gradient storage this rank holds once backward has reduced: the full ``.grad`` tensors
    (ZeRO-0), or ZeRO's partition (``averaged_gradients``, at stage 3 views into one flat buffer: each storage is
    counted once)."""
    import torch

    averaged = getattr(eng.optimizer, "averaged_gradients", None) or {}
    tensors = [p.grad for p in eng.module.parameters()]
    tensors += [t for v in averaged.values() for t in (v if isinstance(v, list) else [v])]
    tensors.append(getattr(eng.optimizer, "grad_partitions_flat_buffer", None))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if torch.is_tensor(t)}
    return sum(storages.values())


def memory_worker(img: int) -> None:
    """One rank of the ZeRO memory table (under torchrun); rank 0 prints ``RESULT {json}``."""
    import torch

    from pipeline import distributed, engine
    from pipeline.config import load_config

    info = distributed.init()
    rows = {}
    for stage in (0, 1, 2, 3):
        cfg = load_config(overrides=[
            "model.arch=sovit_7", f"model.img_size={img}", f"data.img_size={img}", "model.num_classes=10",
            "data.micro_batch_size=2", f"train.global_batch_size={2 * info.world_size}", f"train.zero_stage={stage}",
            "train.precision=fp32", "ema.enabled=false", "mixup.mixup=0", "mixup.cutmix=0"])
        eng, _ = engine.build_engine(cfg, new_model(cfg, info.device), info.world_size, 100)
        x, y = torch.randn(2, 3, img, img, device=info.device), torch.randint(0, 10, (2,), device=info.device)
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
    if info.is_main:
        print("RESULT " + json.dumps(rows), flush=True)
    distributed.shutdown()


def memory(args, work: Path) -> bool:
    cmd = [*launch_command(2), __file__, "--memory-worker", "--img-size", str(args.img_size)]
    try:
        # a rank once died of SIGABRT here in CI (1 run in about 40): the Python stack goes to the log if it recurs
        with Process(cmd, work / "memory.log", {**child_env(args.device), "PYTHONFAULTHANDLER": "1"}) as proc:
            out = proc.expect_exit(args.timeout, "the 2-rank memory run")
    except CheckFailed as e:
        report_failure("memory", e)
        return False
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    rows = {int(k): v for k, v in json.loads(line.removeprefix("RESULT ")).items()}
    print(f"{'per-rank MiB, 2 ranks, fp32 AdamW':<34} {'params':>8} {'grads':>8} {'optim':>8} {'total':>8}   "
          "vs ZeRO-0: params grads optim total")
    for r in rows.values():
        r["total"] = r["params"] + r["grads"] + r["optim"]
    for stage, r in rows.items():
        mib = " ".join(f"{r[k] / 2**20:8.2f}" for k in ("params", "grads", "optim", "total"))
        rel = " ".join(f"{r[k] / rows[0][k]:5.2f}" for k in ("params", "grads", "optim", "total"))
        print(f"{'ZeRO-' + str(stage):<34} {mib}              {rel}", flush=True)
    return True


# ---------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--archs", nargs="+", metavar="ARCH:BATCH",
                   help="default: sovit_7:128 sovit_19:64 on cuda, sovit_7:8 sovit_19:4 on cpu")
    p.add_argument("--warmup", type=int, help="untimed steps per variant (default: 10 on cuda, 2 on cpu)")
    p.add_argument("--steps", type=int, help="timed steps per variant and round (default: 30 on cuda, 3 on cpu)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default: 3 on cuda, 2 on cpu)")
    p.add_argument("--zero", nargs="+", type=int, choices=sorted(TARGETS), default=[0, 1])
    p.add_argument("--parts", nargs="+", choices=["step", "e2e", "memory"], default=["step", "e2e", "memory"])
    p.add_argument("--loaders", nargs="+", choices=["torchvision", "ffcv", "dali"],
                   default=["torchvision", "ffcv", "dali"], help="e2e loaders (those not importable are skipped)")
    p.add_argument("--timeout", type=float, default=420, help="seconds one train.py process may take")
    p.add_argument("--work-dir", type=Path, help="keep e2e data, runs and logs here (default: a temporary directory)")
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.archs = [(arch, int(batch)) for arch, _, batch in (s.partition(":") for s in a.archs or DEFAULT_ARCHS[a.device])]
    return a


def main() -> int:
    args = parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch starts: pipeline.distributed picks CUDA when it sees one
    import torch

    if args.memory_worker:
        memory_worker(args.img_size)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available here (use --device cpu to run this benchmark on the CPU)", file=sys.stderr)
        return 1
    prof = {**PROFILES[args.device], **{k: getattr(args, k) for k in ("warmup", "steps", "rounds") if getattr(args, k)}}
    on_gpu = args.device == "cuda"
    what = torch.cuda.get_device_name(0) if on_gpu else f"{len(os.sched_getaffinity(0))} cores"
    print(f"gpu_step: {args.device} ({what}), torch {torch.__version__}, {args.img_size} px, "
          f"{'bf16, compile, channels_last' if on_gpu else 'fp32, eager'}; {prof['warmup']} warm-up + "
          f"{prof['rounds']} rounds x {prof['steps']} timed steps", flush=True)
    ok = True
    if "step" in args.parts:
        from pipeline import distributed

        device = distributed.init().device
        for arch, batch in args.archs:
            ok &= bench_steps(arch, batch, args.img_size, args.zero, device, prof)
            gc.collect()
            torch._dynamo.reset()
            if on_gpu:
                torch.cuda.empty_cache()  # the e2e runs below are other processes on this device
        distributed.shutdown()
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_step-")))
        work.mkdir(parents=True, exist_ok=True)
        if "e2e" in args.parts:
            ok &= e2e(*args.archs[0], args, prof, work)
        if "memory" in args.parts:
            if on_gpu and torch.cuda.device_count() < 2:
                print(f"SKIP memory: needs 2 CUDA devices, {torch.cuda.device_count()} here", flush=True)
            else:
                ok &= memory(args, work)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
