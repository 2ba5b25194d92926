"""Per-rank training entry: ``python launchers/train.py --arch 7 --set data.train=...`` (under torchrun or srun),
or ``launchers.train.run(cfg)`` from the SLURM/local launcher.

Read top to bottom, this is the whole training story: distributed setup, validated config, data, model,
DeepSpeed engine, resume, tracking, then epochs of train/eval/checkpoint. SIGUSR1 (SLURM's timeout warning or a
preemption notice) makes every rank stop at the next optimizer step, save, and - under SLURM - requeue the job,
which then resumes from ``latest`` into the same MLflow run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3

import data_loaders
import pipeline.models  # noqa: F401  (registers sovit_* with timm)
from pipeline import checkpoint, distributed, engine, metrics, tracking
from pipeline.config import ConfigError, RunConfig, add_config_args, config_from_args, save_config
from pipeline.models import forward_flops

STOP_SIGNALS = (signal.SIGUSR1,)


class _StopFlag:
    """Set by SIGUSR1; ranks agree on it at an optimizer step so they all save the same step."""

    def __init__(self) -> None:
        self.raised = False
        for s in STOP_SIGNALS:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self.raised = True

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def run(cfg: RunConfig) -> dict:
    info = distributed.init()
    rank, world, device = info.rank, info.world_size, info.device
    cfg.validate(world)
    stop = _StopFlag()
    run_dir = Path(cfg.checkpoint.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed + rank)  # per rank: drop-path and mixup draws differ across ranks
    np.random.seed(cfg.train.seed + rank)

    # data first: a wrong path or class count fails before the model and DeepSpeed cost anything
    n_cls = cfg.model.num_classes
    train_loader = data_loaders.build(cfg.data, "train", rank, world, device, num_classes=n_cls)
    val_loader = data_loaders.build(cfg.data, "val", rank, world, device, num_classes=n_cls)
    accum = cfg.grad_accum_steps(world)
    updates_per_epoch = len(train_loader) // accum
    if updates_per_epoch == 0:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} is invalid: one optimizer step "
                          f"needs {accum} micro-batches per rank but the train shard has {len(train_loader)}")

    model = timm.create_model(cfg.model.arch, num_classes=n_cls, img_size=cfg.model.img_size,
                              drop_path_rate=cfg.model.drop_path_rate, drop_rate=cfg.model.drop_rate,
                              head=cfg.model.head).to(device)
    flops = forward_flops(model, cfg.model.img_size)
    ema = ModelEmaV3(model, decay=cfg.ema.decay, device=device, dtype=torch.float32) if cfg.ema.enabled else None
    elastic = checkpoint.prepare_elastic(run_dir, world, rank)  # before the engine: DeepSpeed reads it at init
    ds_engine, scheduler = engine.build_engine(cfg, model, world, updates_per_epoch, load_universal=elastic)
    dtype = engine.DTYPES[cfg.train.precision]
    mixup = engine.build_mixup(cfg)
    criterion = engine.build_criterion(cfg, mixup)

    state = {"epoch": 0, "batch": 0, "step": 0, "accum": accum, "best_top1": None, "mlflow_run_id": None}
    resumed = checkpoint.resume(ds_engine, run_dir, rank)
    if resumed:
        client, rank_state = resumed
        state.update(client["train_state"])
        if ema is not None:
            ema.load_state_dict(client["ema"])
        if rank_state is not None:
            checkpoint.set_rng_state(rank_state["rng"])
            if rank_state.get("loader") is not None:
                train_loader.load_state_dict(rank_state["loader"])
        else:  # elastic: another world size; the same optimizer steps of the epoch are done, in new micro-batches
            state["batch"] = state["batch"] // state.get("accum", accum) * accum
            state["accum"] = accum
            torch.manual_seed(cfg.train.seed + rank + state["step"])
            np.random.seed(cfg.train.seed + rank + state["step"])
    tracker = tracking.start(cfg, rank, run_id=state["mlflow_run_id"], world_size=world,
                             jsonl=run_dir / "metrics.jsonl")
    state["mlflow_run_id"] = tracker.run_id
    if info.is_main:
        print(f"{'resuming at step ' + str(state['step']) if resumed else 'starting'}: {cfg.model.arch}, {world} "
              f"rank(s) on {device.type} ({info.backend}), {updates_per_epoch} steps/epoch x "
              f"{engine.total_epochs(cfg)} epochs, global batch {cfg.train.global_batch_size} = "
              f"{cfg.data.micro_batch_size} x {world} ranks x {accum} accumulation, run dir {run_dir}", flush=True)

    def save() -> None:
        state["mlflow_run_id"] = tracker.run_id  # created late if the server was down at start
        client = {"train_state": dict(state), "ema": ema.state_dict() if ema is not None else None}
        loader_state = train_loader.state_dict() if hasattr(train_loader, "state_dict") else None
        checkpoint.save(ds_engine, run_dir, state["step"], client, {"rng": checkpoint.rng_state(),
                        "loader": loader_state}, rank, cfg.checkpoint.keep_last)

    max_steps = min(cfg.train.max_steps or 10**18, engine.total_epochs(cfg) * updates_per_epoch)
    meter = metrics.StepMeter(cfg.train.global_batch_size, flops, metrics.peak_tflops(cfg.train.peak_tflops, device),
                              device)
    bar = _progress(max_steps, state["step"], info.is_main)
    last_eval: dict[str, float] = {}
    status, losses = "FINISHED", []
    try:
        while state["step"] < max_steps and status == "FINISHED":
            epoch = state["epoch"]
            train_loader.set_epoch(epoch, start_batch=state["batch"])
            ds_engine.train()
            t_wait = time.perf_counter()
            for images, labels in train_loader:
                meter.data_wait(time.perf_counter() - t_wait)
                losses.append(engine.train_micro_step(ds_engine, criterion, mixup, images, labels, dtype,
                                                      state["step"]))
                state["batch"] += 1
                if state["batch"] % accum == 0:  # an optimizer step happened
                    state["step"] += 1
                    scheduler.step_update(state["step"])
                    if ema is not None:
                        ema.update(ds_engine.module, step=state["step"])
                    meter.step()
                    bar.update(1)
                    if state["step"] % cfg.train.log_every_steps == 0 or state["step"] == max_steps:
                        _log_train(tracker, bar, ds_engine, meter, losses, state["step"])
                        losses = []
                    if stop.agreed(device):
                        status = "KILLED"
                    if status != "FINISHED" or state["step"] % cfg.checkpoint.every_steps == 0:
                        save()
                    if status != "FINISHED" or state["step"] >= max_steps or \
                            state["batch"] == updates_per_epoch * accum:
                        break
                t_wait = time.perf_counter()
            if status != "FINISHED":
                break
            if state["batch"] == updates_per_epoch * accum:  # a whole epoch is done
                state["epoch"], state["batch"] = epoch + 1, 0
            if state["epoch"] % cfg.train.eval_every_epochs == 0 or state["step"] >= max_steps:
                last_eval = _evaluate(ds_engine, ema, val_loader, dtype, device, tracker, state, run_dir, info)
            save()
    except engine.NonFiniteLoss as e:
        status = "FAILED"
        if info.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
    finally:
        bar.close()

    result = {"status": status, "step": state["step"], "epoch": state["epoch"], "world_size": world,
              "mlflow_run_id": tracker.run_id, **{f"val_{k}": v for k, v in last_eval.items()}}
    if info.is_main:
        checkpoint.write_json(run_dir / "final_metrics.json", result)
        for artifact in (run_dir / "config.yaml", run_dir / "final_metrics.json", _sidecar(cfg.data.train)):
            tracker.log_artifact(artifact)
    tracker.finish(status)
    if status == "KILLED":
        _requeue(info)
    distributed.shutdown()
    return result


def _evaluate(ds_engine, ema, val_loader, dtype, device, tracker, state, run_dir: Path, info) -> dict[str, float]:
    results = engine.evaluate(ds_engine.module, val_loader, dtype, device)
    logged = {f"val/{k}": v for k, v in results.items() if k != "samples"}
    if ema is not None:
        ema_results = engine.evaluate(ema.module, val_loader, torch.float32, device)
        logged.update({f"val_ema/{k}": v for k, v in ema_results.items() if k != "samples"})
        results.update({f"ema_{k}": v for k, v in ema_results.items()})
    tracker.log_metrics({**logged, "epoch": state["epoch"]}, step=state["step"])
    score = results.get("ema_top1", results["top1"])
    if state["best_top1"] is None or score > state["best_top1"]:
        state["best_top1"] = score
        if info.is_main and (ema is not None or not _partitioned(ds_engine)):
            from safetensors.torch import save_file

            weights = (ema.module if ema is not None else ds_engine.module).state_dict()
            tmp = run_dir / ".best.safetensors.tmp"
            save_file({k: v.detach().float().cpu().contiguous() for k, v in weights.items()}, str(tmp))
            tmp.replace(run_dir / "best.safetensors")
    if info.is_main:
        ema_txt = f", EMA top-1 {results['ema_top1']:.2f}" if ema is not None else ""
        print(f"epoch {state['epoch']} step {state['step']}: val top-1 {results['top1']:.2f} top-5 "
              f"{results['top5']:.2f} loss {results['loss']:.4f} ({results['samples']} images){ema_txt}", flush=True)
    return results


def _partitioned(ds_engine) -> bool:
    return ds_engine.zero_optimization_stage() == 3


def _log_train(tracker, bar, ds_engine, meter, losses, step: int) -> None:
    loss = torch.stack(losses).mean()
    if dist.is_initialized():
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    lr = ds_engine.optimizer.param_groups[0]["lr"]
    grad_norm = ds_engine.get_global_grad_norm()
    m = {"train/loss": loss.item(), "train/lr": lr, **{f"perf/{k}": v for k, v in meter.report().items()}}
    if grad_norm is not None:
        m["train/grad_norm"] = float(grad_norm)
    tracker.log_metrics(m, step=step)
    bar.set_postfix(loss=f"{m['train/loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{m['perf/images_per_s']:.0f}")


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=2.0)


def _sidecar(train_path: str) -> Path:
    return Path(train_path).with_name(Path(train_path).name + ".json")


def _requeue(info) -> None:
    """Under SLURM, put the job back in the queue: it resumes from ``latest``. Elsewhere just stop."""
    job = os.environ.get("SLURM_JOB_ID")
    if info.is_main and job and not os.environ.get("SOVIT_NO_REQUEUE"):
        print(f"checkpoint saved; requeueing SLURM job {job}", flush=True)
        subprocess.run(["scontrol", "requeue", job], check=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="launchers/train.py", description="Train So-ViT (one process per rank).")
    add_config_args(parser)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    try:
        cfg = config_from_args(args)
        run(cfg)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
