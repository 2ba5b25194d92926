"""The training story, read top to bottom: ``run(cfg)`` sets up one rank, then trains epochs of steps with eval and
checkpoints, and returns a ``RunResult`` whose ``Status`` tells the caller what happened.

Setup order is chosen so that a mistake costs nothing: the config and data are checked before the model exists,
the run directory is locked and its checkpoints are read before anything in it is written.

The loop is policy in named steps: ``_train_epoch`` says what happens after each optimizer step, and small
predicates (``_should_log``, ``_should_check_stop``, ``_should_save``, ``_should_evaluate``) say when.

Stopping (``pipeline.stopping``): on SIGUSR1, SIGTERM or Ctrl-C the ranks agree at a step, save it and return
STOPPED (requeue) or KILLED; a non-finite loss returns FAILED, naming the last good checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
from timm.utils import ModelEmaV3, distribute_bn

import data_loaders
import pipeline.models  # noqa: F401  (registers sovit_* with timm)
from pipeline import checkpoint, distributed, elastic, engine, export, files, metrics, progress, record, tracking
from pipeline.config import ConfigError, RunConfig, resolve_device_defaults, save_config
from pipeline.models import forward_flops
from pipeline.result import RunResult, Status
from pipeline.run_dir import check_fixed_keys, lock_run_dir, resolve_run_dir
from pipeline.run_state import RNGState, RunState, TrainState
from pipeline.stopping import StopSignals


def run(cfg: RunConfig) -> RunResult:
    """Train one rank of the run ``cfg`` describes (call it on every rank). Raises ConfigError, DataError or
    CheckpointError for problems the user must fix, before training starts."""
    info = distributed.init()
    lock, started = None, False
    try:
        cfg.validate(info.world_size)
        resolve_device_defaults(cfg, info.device)
        cfg.model.num_classes = cfg.model.num_classes or len(data_loaders.class_names(cfg.data, "train"))
        run_dir = resolve_run_dir(cfg)
        lock = lock_run_dir(run_dir, info.is_main)
        with StopSignals() as stop:
            trainer = Trainer(cfg, info, run_dir)
            started = True
            return trainer.train(stop)
    finally:
        if lock is not None:
            lock.release(undo=not started)  # a start that failed leaves the run directory as it found it
        distributed.shutdown()


class Trainer:
    def __init__(self, cfg: RunConfig, info: distributed.DistInfo, run_dir: Path):
        self.cfg, self.info, self.run_dir = cfg, info, run_dir
        check_fixed_keys(cfg, run_dir)
        timm.utils.random_seed(cfg.train.seed, info.rank)  # per rank: drop-path and mixup draws differ across ranks
        self._build_data()  # first: a wrong path or class count fails before the model and DeepSpeed cost anything
        self._build_model()
        self.state = TrainState(accum=self.accum)
        self.parts = RunState(train_state=self.state, ema=self.ema, rng=RNGState(), loader=self.train_loader)
        self.resumed = self._resume()
        self._start_tracking()
        self.meter = metrics.StepMeter(cfg.train.global_batch_size, info.world_size, self.flops,
                                       metrics.peak_tflops(cfg.train.peak_tflops, info.device), info.device)
        self.progress = progress.TrainProgress(self.max_steps, self.state.step, info.is_main)
        self.losses: list[torch.Tensor] = []  # the losses since the host last looked at them (_checked_loss)
        self.finite_through = self.state.step  # the step of the last loss checked finite (see _set_aside_after_nan)
        self.last_eval: dict[str, float] = {}
        self.save_seconds = 0.0
        # with train.compile, this process's first optimizer step is mostly torch.compile at work: timed from here
        self.first_step, self.started = self.state.step + 1, time.perf_counter()

    def _build_data(self) -> None:
        cfg, info, n_cls = self.cfg, self.info, self.cfg.model.num_classes
        self.train_loader = data_loaders.build(cfg.data, "train", info.rank, info.world_size, info.device,
                                               num_classes=n_cls)
        self.val_loader = data_loaders.build(cfg.data, "val", info.rank, info.world_size, info.device,
                                             num_classes=n_cls, classes=self.train_loader.classes)
        self.accum = cfg.grad_accum_steps(info.world_size)
        self.updates_per_epoch = len(self.train_loader) // self.accum
        if self.updates_per_epoch == 0:
            raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} is invalid: one optimizer step "
                              f"needs {self.accum} micro-batches per rank but the train shard has "
                              f"{len(self.train_loader)}")
        self.epoch_batches = self.updates_per_epoch * self.accum  # the micro-batches an epoch trains on
        self.max_steps = min(cfg.train.max_steps or 10**18, engine.total_epochs(cfg) * self.updates_per_epoch)

    def _build_model(self) -> None:
        cfg, m, device = self.cfg, self.cfg.model, self.info.device
        model = timm.create_model(m.arch, num_classes=m.num_classes, img_size=m.img_size,
                                  drop_path_rate=m.drop_path_rate, drop_rate=m.drop_rate, head=m.head).to(device)
        self.flops = forward_flops(model, m.img_size)
        self.ema = ModelEmaV3(model, decay=cfg.ema.decay, device=device) if cfg.ema.enabled else None
        # before the engine: DeepSpeed reads load_universal at initialize
        universal = elastic.prepare_elastic(self.run_dir, self.info.world_size, self.info.rank)
        self.engine, self.scheduler = engine.build_engine(cfg, model, self.info.world_size, self.updates_per_epoch,
                                                          load_universal=universal)
        if self.ema is not None:  # copied before DeepSpeed hooked the model; now in the layout the engine gave it
            engine.to_param_layout(cfg, self.ema.module)
        self.mixup = engine.build_mixup(cfg)
        self.criterion = engine.build_criterion(cfg, self.mixup)

    def _resume(self) -> bool:
        exact = checkpoint.resume(self.engine, self.run_dir, self.info.rank, self.parts)
        if exact is None:
            return False
        if not exact:  # another world size: the same optimizer steps of the epoch are done, in new micro-batches
            self.state.batch = elastic.elastic_batch(self.state.batch, self.state.accum, self.accum)
            timm.utils.random_seed(self.cfg.train.seed + self.state.step, self.info.rank)
        self.state.accum = self.accum
        return True

    def _start_tracking(self) -> None:
        cfg, state = self.cfg, self.state
        if self.info.is_main:
            save_config(cfg, self.run_dir / "config.yaml", redact=tracking.redact)
        self.tracker = tracking.start(cfg, self.info.rank, run_id=state.mlflow_run_id, world_size=self.info.world_size,
                                      jsonl=self.run_dir / "metrics.jsonl")
        state.mlflow_run_id = self.tracker.run_id
        self.tracker.resume_at(state.step)  # the steps replayed from here are logged once, not twice
        if cfg.data.loader == "ffcv":
            for split in ("train", "val"):
                self.tracker.log_dataset(getattr(cfg.data, split), context=split)

    # ---------------------------------------------------------------------------------------------- the loop

    def train(self, stop: StopSignals) -> RunResult:
        """The loop; whatever escapes it (a bug, a second Ctrl-C) still ends the MLflow run, as FAILED or KILLED."""
        try:
            return self._train(stop)
        except KeyboardInterrupt:
            self.tracker.finish(Status.KILLED)
            raise
        except BaseException:
            self.tracker.finish(Status.FAILED)
            raise

    def _train(self, stop: StopSignals) -> RunResult:
        """Epochs until the schedule is done, the ranks agree on a stop signal, or the loss is not finite."""
        finished = self._finished_before()
        if finished is not None:
            return finished
        self._print_start()
        status, message = Status.FINISHED, ""
        with self.progress:
            try:
                while status is Status.FINISHED and self.state.step < self.max_steps:
                    status = self._train_epoch(stop)
            except engine.NonFiniteLoss as e:
                status, message = Status.FAILED, self._set_aside_after_nan(str(e))
        return self._finish(status, message, stop.name)

    def _train_epoch(self, stop: StopSignals) -> Status:
        """The rest of this epoch, then its eval (when due) and checkpoint. A stop signal the ranks agree on ends it
        at a step: saved when there is time, and returned."""
        for images, labels in self._epoch_batches():
            if not self._micro_step(images, labels):
                continue  # within an accumulation
            stopped = stop.agreed() if self._should_check_stop() else None
            if stopped is not None:
                self._save_if_time(stop)
                return stopped
            if self._should_save():
                self._save()
        if self.state.batch == self.epoch_batches:  # a whole epoch is done
            self.state.epoch, self.state.batch = self.state.epoch + 1, 0
        if self._should_evaluate():
            self._evaluate()
        self._save()  # the epoch's last step is saved after its eval
        return Status.FINISHED

    def _epoch_batches(self):
        """This epoch's micro-batches from the loader's position, up to the epoch's last optimizer step or
        train.max_steps; the time spent waiting for each goes to the meter."""
        self.train_loader.set_epoch(self.state.epoch, start_batch=self.state.batch)
        self.engine.train()
        waited = time.perf_counter()
        for batch in self.train_loader:
            self.meter.data_wait(time.perf_counter() - waited)
            yield batch
            if self._epoch_over():
                return
            waited = time.perf_counter()

    def _micro_step(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        """One forward/backward; True when it completed an optimizer step (then the schedule, EMA and logs follow)."""
        state, cfg = self.state, self.cfg
        boundary = (state.batch + 1) % self.accum == 0
        log_now = boundary and self._should_log(state.step + 1)
        loss, grad_norm = engine.train_micro_step(self.engine, self.criterion, self.mixup, images, labels,
                                                  bool(cfg.data.channels_last), grad_norm=log_now,
                                                  clip_grad=cfg.optim.clip_grad)
        self.losses.append(loss)
        state.batch += 1
        if boundary:
            state.step += 1
            self.scheduler.step_update(state.step)
            if self.ema is not None:
                self.ema.update(self.engine.module, step=state.step)
            self.meter.step()
            self.progress.step()
            if cfg.train.compile and state.step == self.first_step:
                self._log_compile()
            if log_now:
                self._log_train(grad_norm)
        return boundary

    # ---------------------------------------------------------------------------------------------- when

    def _should_log(self, step: int) -> bool:
        return step % self.cfg.train.log_every_steps == 0 or step == self.max_steps

    def _should_check_stop(self) -> bool:
        return self.state.step % self.cfg.train.stop_check_every_steps == 0

    def _epoch_over(self) -> bool:
        return self.state.batch == self.epoch_batches or self.state.step >= self.max_steps

    def _should_save(self) -> bool:
        """Every checkpoint.every_steps, except the epoch's last step, which is saved after its eval."""
        return self.state.step % self.cfg.checkpoint.every_steps == 0 and not self._epoch_over()

    def _should_evaluate(self) -> bool:
        return self.state.epoch % self.cfg.train.eval_every_epochs == 0 or self.state.step >= self.max_steps

    # ---------------------------------------------------------------------------------------------- steps

    def _checked_loss(self) -> float:
        """The mean loss over ranks since the last look, on the host (one sync); NonFiniteLoss if NaN/inf."""
        mean = distributed.all_reduce(torch.stack(self.losses).mean()) / self.info.world_size
        value = engine.check_finite(mean, self.state.step)
        self.finite_through = self.state.step  # the checkpoints before this step were followed by a finite loss
        return value

    def _log_train(self, grad_norm: torch.Tensor | None) -> None:
        loss = self._checked_loss()
        self.losses = []
        lr = self.engine.optimizer.param_groups[0]["lr"]
        m = {"train/loss": loss, "train/lr": lr, **{f"perf/{k}": v for k, v in self.meter.report().items()}}
        if grad_norm is not None:
            m["train/grad_norm"] = float(grad_norm)
        self.tracker.log_metrics(m, step=self.state.step)
        self.progress.report(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{m['perf/images_per_s']:.0f}")

    def _log_compile(self) -> None:
        """The first compiled step's time (one sync, once) in the metrics and the log, and out of images/s."""
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)
        seconds = time.perf_counter() - self.started
        self.tracker.log_metrics({"perf/compile_s": seconds}, step=self.state.step)
        self.meter.pause(seconds)
        if self.info.is_main:
            progress.write(f"torch.compile: the first step took {seconds:.0f} s")

    def _sync_bn(self) -> None:
        """Average BatchNorm running statistics over ranks (each rank saw other images), for eval, save and export."""
        if self.info.world_size > 1:
            distribute_bn(self.engine.module, self.info.world_size, reduce=True)
            if self.ema is not None:
                distribute_bn(self.ema.module, self.info.world_size, reduce=True)

    def _evaluate(self) -> None:
        t0, state = time.perf_counter(), self.state
        results = self._scores()
        score = results.get("ema_top1", results["top1"])
        if state.best_top1 is None or score > state.best_top1:
            state.best_top1, state.best_epoch = score, state.epoch
            state.best_eval = {k: v for k, v in results.items() if "samples" not in k}
            if self._save_best():
                self.tracker.log_best(self.run_dir / "best.safetensors", score, state.step)
        if self.info.is_main:
            ema_txt = f", EMA top-1 {results['ema_top1']:.2f}" if self.ema is not None else ""
            progress.write(f"epoch {state.epoch} step {state.step}: val top-1 {results['top1']:.2f} top-5 "
                           f"{results['top5']:.2f} loss {results['loss']:.4f} ({results['samples']} images){ema_txt}")
            record.append_summary(self.run_dir / "summary.csv", state.epoch, state.step, results)
        self.last_eval = results
        self.meter.pause(time.perf_counter() - t0)

    def _scores(self) -> dict[str, float]:
        """The model's val scores and the EMA's (``ema_`` keys), logged; BatchNorm statistics averaged first."""
        self._sync_bn()
        models = {"": self.engine.module, **({"ema_": self.ema.module} if self.ema is not None else {})}
        bar = progress.bar(len(self.val_loader) * len(models), 0, self.info.is_main,
                           desc=f"eval epoch {self.state.epoch}", unit="batch", leave=False)
        results, logged = {}, {}
        for prefix, module in models.items():
            scores = engine.evaluate(module, self.val_loader, self.cfg.train.precision, self.info.device, bar)
            results.update({f"{prefix}{k}": v for k, v in scores.items()})
            logged.update({f"{'val_ema' if prefix else 'val'}/{k}": v for k, v in scores.items() if k != "samples"})
        bar.close()
        self.tracker.log_metrics({**logged, "epoch": self.state.epoch}, step=self.state.step)
        return results

    def _save_best(self) -> bool:
        """best.safetensors: the EMA weights when there is an EMA (it is what scored), else the model's."""
        if self.ema is None and self.engine.zero_optimization_stage() == 3:
            return False  # partitioned parameters: export the best tag with launchers/export.py instead
        if self.info.is_main:
            module = self.ema.module if self.ema is not None else self.engine.module
            export.save_safetensors(module.state_dict(), self.cfg, self.run_dir / "best.safetensors")
        return True

    def _save(self) -> None:
        """Checkpoint this step on every rank; the loss since the last log is checked first, so a NaN never
        overwrites ``latest`` with broken weights."""
        if self.losses:
            self._checked_loss()
        t0 = time.perf_counter()
        self._sync_bn()
        self.state.mlflow_run_id = self.tracker.run_id  # created late if the server was down at start
        checkpoint.save(self.engine, self.run_dir, self.state.step, self.parts, self.info.rank,
                        self.cfg.checkpoint.keep_last)
        self.save_seconds = time.perf_counter() - t0
        self.meter.pause(self.save_seconds)

    def _set_aside_after_nan(self, error: str) -> str:
        """The message of a non-finite loss, naming the last good checkpoint: the newest one followed by a loss
        checked finite. The tags saved since that check hold weights the broken loss was computed from (finite,
        maybe 1e29 large), so they are set aside and ``latest`` moves back to the good one."""
        good, suspect = checkpoint.set_aside_since(self.run_dir, self.finite_through,
                                                   f"not followed by a finite loss: {error}", self.info.rank)
        last = (f"the last good checkpoint is {good[0]} (the newest one followed by a finite loss)" if good
                else "no checkpoint is known good")
        return f"{error}; stopping: {last}" + (f"; {', '.join(suspect)} set aside" if suspect else "")

    def _save_if_time(self, stop: StopSignals) -> None:
        fits, left = stop.save_fits(self.save_seconds)
        if fits:
            self._save()
        elif self.info.is_main:
            resumes_from = next(iter(checkpoint.complete_tags(self.run_dir)), "the start (no checkpoint yet)")
            progress.write(f"stop signal: not saving step {self.state.step} (the last save took "
                           f"{self.save_seconds:.0f} s, {left:.0f} s of SLURM's grace remain); the run resumes from "
                           f"{resumes_from}")

    # ---------------------------------------------------------------------------------------------- start / end

    def _finished_before(self) -> RunResult | None:
        """A relaunch of a run that already finished: say so, keep its final_metrics.json, train nothing."""
        final = self.run_dir / "final_metrics.json"
        if not (self.resumed and self.state.step >= self.max_steps and final.is_file()):
            return None
        stored = json.loads(final.read_text())
        if self.info.is_main:
            print(f"{self.run_dir} already finished at step {self.state.step} (status {stored.get('status')}, "
                  f"best top-1 {stored.get('best_top1')}); nothing to do. Raise schedule.epochs or train.max_steps "
                  "to train further.", flush=True)
        self.tracker.finish(stored.get("status", Status.FINISHED))
        return self._result(Status.FINISHED, "already finished",
                            val={k.removeprefix("val_"): v for k, v in stored.items() if k.startswith("val_")})

    def _print_start(self) -> None:
        cfg, info, state = self.cfg, self.info, self.state
        if not info.is_main:
            return
        link = self.tracker.ui_link()
        steps = f"{self.updates_per_epoch} steps/epoch x {engine.total_epochs(cfg)} epochs"
        if self.max_steps < engine.total_epochs(cfg) * self.updates_per_epoch:
            steps = f"{self.max_steps} steps (train.max_steps; {steps})"
        what = f"resuming at step {state.step}" if state.step or self.resumed else "starting"
        print(f"{what}: {cfg.model.arch}, {info.world_size} rank(s) on {info.device.type} ({info.backend}), "
              f"{cfg.train.precision}, {steps}, global batch {cfg.train.global_batch_size} = "
              f"{cfg.data.micro_batch_size} x {info.world_size} ranks x {self.accum} accumulation, "
              f"run dir {self.run_dir}" + (f"\nMLflow: {link}" if link else ""), flush=True)

    def _result(self, status: Status, message: str, **extra: Any) -> RunResult:
        state = self.state
        return RunResult(status=status, step=state.step, epoch=state.epoch, world_size=self.info.world_size,
                         run_dir=str(self.run_dir), mlflow_run_id=self.tracker.run_id, best_top1=state.best_top1,
                         best_epoch=state.best_epoch, best_eval=state.best_eval, message=message, **extra)

    def _finish(self, status: Status, message: str, stopped_by: str | None) -> RunResult:
        if status is Status.FAILED and self.info.is_main:
            print(f"error: {message}", file=sys.stderr, flush=True)
        result = self._result(status, message, val=self.last_eval, signal=stopped_by, link=self.tracker.ui_link())
        if self.info.is_main:
            files.write_json(self.run_dir / "final_metrics.json", result.to_json())
            for artifact in (self.run_dir / "config.yaml", self.run_dir / "final_metrics.json",
                             self.run_dir / "summary.csv", data_loaders.sidecar_path(self.cfg.data.train)):
                self.tracker.log_artifact(artifact)
        self.tracker.finish(status.mlflow)
        return result
