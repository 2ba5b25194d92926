"""The training story, read top to bottom: ``run(cfg)`` sets up one rank, then trains epochs of steps with eval and
checkpoints, and returns a ``RunResult`` whose status tells the caller what happened.

Setup order is chosen so that a mistake costs nothing: the config and data are checked before the model exists,
the run directory is locked and its checkpoints are read before anything in it is written.

Stopping. SIGUSR1 (SLURM's time-limit warning, or a preemption notice), SIGTERM (``scancel``, preemption without
a warning) and Ctrl-C set a flag. Ranks agree on it every ``train.stop_check_every_steps`` optimizer steps (one
small all-reduce; checking every step would force a host sync per step), save the same step and return:

    FINISHED   the schedule (or train.max_steps) is done
    STOPPED    SIGUSR1: saved; the caller requeues the job, which resumes from ``latest`` into the same MLflow run
    KILLED     SIGTERM or Ctrl-C: saved when SLURM's grace time allows, not requeued by us
    FAILED     the loss became NaN/inf; the checkpoints saved since the last finite loss are set aside, and the
               message names the last good one

The MLflow run always ends with one of FINISHED, KILLED (for STOPPED too: the requeued job sets it RUNNING again)
or FAILED.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import timm
import torch
import yaml
from timm.utils import ModelEmaV3, distribute_bn

import data_loaders
import pipeline.models  # noqa: F401  (registers sovit_* with timm)
from pipeline import checkpoint, distributed, engine, export, files, metrics, tracking
from pipeline.config import ConfigError, RunConfig, save_config
from pipeline.models import forward_flops
from pipeline.runtime import slurm_job_id

# SLURM sends SIGKILL this long after SIGTERM (its KillWait default): a save must fit in it to be worth starting
TERM_GRACE_S = 30.0
# what resuming may not change silently (the weights or the schedule would no longer mean the same)
FIXED_ON_RESUME = ("model.arch", "model.num_classes", "model.img_size", "train.global_batch_size")


@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint, restored on resume."""

    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch this rank has consumed
    step: int = 0  # optimizer steps
    accum: int = 1  # micro-batches per optimizer step when saved (elastic resume converts positions)
    best_top1: float | None = None  # what picks best.safetensors: the EMA's top-1 when there is an EMA
    best_epoch: int | None = None
    best_eval: dict[str, float] = field(default_factory=dict)  # that evaluation: top1, top5, ema_top1, ...
    mlflow_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


@dataclass
class RunResult:
    status: str  # FINISHED, STOPPED, KILLED or FAILED (see the module docstring)
    step: int
    epoch: int
    world_size: int
    run_dir: str
    mlflow_run_id: str | None = None
    best_top1: float | None = None
    best_epoch: int | None = None
    best_eval: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)  # the last evaluation: top1, top5, loss, ema_top1, ...
    message: str = ""
    signal: str | None = None  # the stop signal this rank received: SIGUSR1, SIGTERM or SIGINT
    link: str | None = None  # the run in MLflow's training view

    @property
    def requeue(self) -> bool:
        return self.status == "STOPPED"

    def summary(self) -> str:
        """What a user needs at the end: the best result, where its weights and curves are (the launcher that
        printed it adds the commands that use them)."""
        run_dir = Path(self.run_dir)
        lines = [f"{self.status.lower()} at step {self.step} (epoch {self.epoch}), run dir {run_dir}"]
        ema = self.best_eval.get("ema_top1")
        if self.best_eval:
            lines.append(f"  best     top-1 {self.best_eval['top1']:.2f}"
                         + (f", EMA top-1 {ema:.2f}" if ema is not None else "") + f" at epoch {self.best_epoch}")
        if (run_dir / "best.safetensors").exists():
            which = "the EMA's" if ema is not None else "the model's"
            lines.append(f"  weights  {run_dir / 'best.safetensors'} ({which} best, with its config)")
        lines.append(f"  curves   {run_dir / 'summary.csv'}, {run_dir / 'metrics.jsonl'}")
        if self.link:
            lines.append(f"  MLflow   {self.link}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update({f"val_{k}": v for k, v in out.pop("val").items()})
        return out


class StopSignals:
    """Turns SIGUSR1/SIGTERM/SIGINT into a flag for the duration of a run; the previous handlers come back after.

    A second Ctrl-C (a second later or more) quits at once, for a user who does not want to wait for the save."""

    CODES: ClassVar[dict[int, int]] = {signal.SIGUSR1: 1, signal.SIGTERM: 2, signal.SIGINT: 2}  # highest wins

    def __init__(self) -> None:
        self.code, self.since, self.name = 0, 0.0, None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for s in self.CODES:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.code and time.monotonic() - self.since > 1.0:
            raise KeyboardInterrupt  # a person pressing again, not a launcher echoing the first Ctrl-C to its ranks
        if signum == signal.SIGINT:
            print("\ninterrupted: saving at the next step check (Ctrl-C again to quit without saving)",
                  file=sys.stderr, flush=True)
        self.code, self.since = max(self.code, self.CODES[signum]), self.since or time.monotonic()
        self.name = signal.Signals(signum).name

    def agreed(self) -> int:
        """Collective: the highest stop code raised on any rank (0: go on)."""
        return int(distributed.all_reduce([self.code], "max").item())


def run(cfg: RunConfig) -> RunResult:
    """Train one rank of the run ``cfg`` describes (call it on every rank). Raises ConfigError, DataError or
    CheckpointError for problems the user must fix, before training starts."""
    info = distributed.init()
    lock, started = None, False
    try:
        cfg.validate(info.world_size)
        _resolve_device_defaults(cfg, info.device)
        cfg.model.num_classes = cfg.model.num_classes or len(data_loaders.class_names(cfg.data, "train"))
        run_dir = _resolve_run_dir(cfg)
        lock = checkpoint.RunLock(run_dir)
        _lock(lock, run_dir, info.is_main)
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
        rank, world, device = info.rank, info.world_size, info.device
        _check_fixed_keys(cfg, run_dir)
        timm.utils.random_seed(cfg.train.seed, rank)  # per rank: drop-path and mixup draws differ across ranks

        # data first: a wrong path or class count fails before the model and DeepSpeed cost anything
        n_cls = cfg.model.num_classes
        self.train_loader = data_loaders.build(cfg.data, "train", rank, world, device, num_classes=n_cls)
        self.val_loader = data_loaders.build(cfg.data, "val", rank, world, device, num_classes=n_cls,
                                             classes=self.train_loader.classes)
        self.accum = cfg.grad_accum_steps(world)
        self.updates_per_epoch = len(self.train_loader) // self.accum
        if self.updates_per_epoch == 0:
            raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} is invalid: one optimizer step "
                              f"needs {self.accum} micro-batches per rank but the train shard has "
                              f"{len(self.train_loader)}")
        self.max_steps = min(cfg.train.max_steps or 10**18, engine.total_epochs(cfg) * self.updates_per_epoch)

        model = timm.create_model(cfg.model.arch, num_classes=n_cls, img_size=cfg.model.img_size,
                                  drop_path_rate=cfg.model.drop_path_rate, drop_rate=cfg.model.drop_rate,
                                  head=cfg.model.head).to(device)
        self.flops = forward_flops(model, cfg.model.img_size)
        self.ema = ModelEmaV3(model, decay=cfg.ema.decay, device=device) if cfg.ema.enabled else None
        elastic = checkpoint.prepare_elastic(run_dir, world, rank)  # before the engine: DeepSpeed reads it at init
        self.engine, self.scheduler = engine.build_engine(cfg, model, world, self.updates_per_epoch,
                                                          load_universal=elastic)
        if self.ema is not None:  # copied before DeepSpeed hooked the model; now in the layout the engine gave it
            engine.to_param_layout(cfg, self.ema.module)
        self.mixup = engine.build_mixup(cfg)
        self.criterion = engine.build_criterion(cfg, self.mixup)

        self.state = TrainState(accum=self.accum)
        self.resumed = self._resume()
        self.finite_through = self.state.step  # the step of the last loss checked finite (see _set_aside_after_nan)
        if info.is_main:
            save_config(cfg, run_dir / "config.yaml", redact=tracking.redact)
        self.tracker = tracking.start(cfg, rank, run_id=self.state.mlflow_run_id, world_size=world,
                                      jsonl=run_dir / "metrics.jsonl")
        self.state.mlflow_run_id = self.tracker.run_id
        self.tracker.resume_at(self.state.step)  # the steps replayed from here are logged once, not twice
        if cfg.data.loader == "ffcv":
            for split in ("train", "val"):
                self.tracker.log_dataset(getattr(cfg.data, split), context=split)
        self.meter = metrics.StepMeter(cfg.train.global_batch_size, world, self.flops,
                                       metrics.peak_tflops(cfg.train.peak_tflops, device), device)
        self.last_eval: dict[str, float] = {}
        self.save_seconds = 0.0

    def _resume(self) -> bool:
        resumed = checkpoint.resume(self.engine, self.run_dir, self.info.rank)
        if resumed is None:
            return False
        client, rank_state = resumed
        self.state.load_state_dict(client["train_state"])
        if self.ema is not None and client.get("ema") is not None:
            self.ema.load_state_dict(client["ema"])
        if rank_state is not None:
            checkpoint.set_rng_state(rank_state["rng"])
            self.train_loader.load_state_dict(rank_state["loader"])
        else:  # elastic: another world size; the same optimizer steps of the epoch are done, in new micro-batches
            self.state.batch = checkpoint.elastic_batch(self.state.batch, self.state.accum, self.accum)
            timm.utils.random_seed(self.cfg.train.seed + self.state.step, self.info.rank)
        self.state.accum = self.accum
        return True

    # ---------------------------------------------------------------------------------------------- the loop

    def train(self, stop: StopSignals) -> RunResult:
        """The loop; whatever escapes it (a bug, a second Ctrl-C) still ends the MLflow run, as FAILED or KILLED."""
        try:
            return self._train(stop)
        except KeyboardInterrupt:
            self.tracker.finish("KILLED")
            raise
        except BaseException:
            self.tracker.finish("FAILED")
            raise

    def _train(self, stop: StopSignals) -> RunResult:
        cfg, state, info = self.cfg, self.state, self.info
        finished = self._finished_before()
        if finished is not None:
            return finished
        self._print_start()
        status, losses = "FINISHED", []
        first_step = time.perf_counter()  # with train.compile, the first step is mostly torch.compile at work
        bar = _progress(self.max_steps, state.step, info.is_main)
        self.bar = bar
        try:
            while state.step < self.max_steps and status == "FINISHED":
                self.train_loader.set_epoch(state.epoch, start_batch=state.batch)
                self.engine.train()
                epoch_end = self.updates_per_epoch * self.accum
                t_wait = time.perf_counter()
                for images, labels in self.train_loader:
                    self.meter.data_wait(time.perf_counter() - t_wait)
                    boundary = (state.batch + 1) % self.accum == 0
                    log_now = boundary and ((state.step + 1) % cfg.train.log_every_steps == 0
                                            or state.step + 1 == self.max_steps)
                    loss, grad_norm = engine.train_micro_step(self.engine, self.criterion, self.mixup, images, labels,
                                                              bool(cfg.data.channels_last), grad_norm=log_now,
                                                              clip_grad=cfg.optim.clip_grad)
                    losses.append(loss)
                    state.batch += 1
                    if boundary:  # an optimizer step happened
                        state.step += 1
                        self.scheduler.step_update(state.step)
                        if self.ema is not None:
                            self.ema.update(self.engine.module, step=state.step)
                        self.meter.step()
                        bar.update(1)
                        if cfg.train.compile and first_step:
                            self._log_compile(first_step)
                            first_step = 0.0
                        if log_now:
                            self._log_train(losses, grad_norm)
                            losses = []
                        if state.step % cfg.train.stop_check_every_steps == 0:
                            status = {0: "FINISHED", 1: "STOPPED", 2: "KILLED"}[stop.agreed()]
                        last_of_epoch = state.batch == epoch_end or state.step >= self.max_steps
                        if status != "FINISHED":
                            self._save_if_time(stop, losses)
                        elif state.step % cfg.checkpoint.every_steps == 0 and not last_of_epoch:
                            self._save(losses)  # the epoch's last step is saved after its eval, below
                        if status != "FINISHED" or last_of_epoch:
                            break
                    t_wait = time.perf_counter()
                if status != "FINISHED":
                    break
                if state.batch == epoch_end:  # a whole epoch is done
                    state.epoch, state.batch = state.epoch + 1, 0
                if state.epoch % cfg.train.eval_every_epochs == 0 or state.step >= self.max_steps:
                    self._evaluate()
                self._save(losses)
        except engine.NonFiniteLoss as e:
            status, message = "FAILED", self._set_aside_after_nan(str(e))
        else:
            message = ""
        finally:
            bar.close()
        return self._finish(status, message, stop.name)

    # ---------------------------------------------------------------------------------------------- steps

    def _checked_loss(self, losses: list[torch.Tensor]) -> float:
        """The mean loss over ranks since the last look, on the host (one sync); NonFiniteLoss if NaN/inf."""
        mean = distributed.all_reduce(torch.stack(losses).mean()) / self.info.world_size
        value = engine.check_finite(mean, self.state.step)
        self.finite_through = self.state.step  # the checkpoints before this step were followed by a finite loss
        return value

    def _log_train(self, losses: list[torch.Tensor], grad_norm: torch.Tensor | None) -> None:
        loss = self._checked_loss(losses)
        lr = self.engine.optimizer.param_groups[0]["lr"]
        m = {"train/loss": loss, "train/lr": lr, **{f"perf/{k}": v for k, v in self.meter.report().items()}}
        if grad_norm is not None:
            m["train/grad_norm"] = float(grad_norm)
        self.tracker.log_metrics(m, step=self.state.step)
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{m['perf/images_per_s']:.0f}")

    def _log_compile(self, started: float) -> None:
        """The first compiled step's time (one sync, once) in the metrics and the log, and out of images/s."""
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)
        seconds = time.perf_counter() - started
        self.tracker.log_metrics({"perf/compile_s": seconds}, step=self.state.step)
        self.meter.pause(seconds)
        if self.info.is_main:
            _write(f"torch.compile: the first step took {seconds:.0f} s")

    def _sync_bn(self) -> None:
        """Average BatchNorm running statistics over ranks (each rank saw other images), for eval, save and export."""
        if self.info.world_size > 1:
            distribute_bn(self.engine.module, self.info.world_size, reduce=True)
            if self.ema is not None:
                distribute_bn(self.ema.module, self.info.world_size, reduce=True)

    def _evaluate(self) -> None:
        t0 = time.perf_counter()
        state, cfg = self.state, self.cfg
        self._sync_bn()
        bar = _progress(len(self.val_loader) * (2 if self.ema is not None else 1), 0, self.info.is_main,
                        desc=f"eval epoch {state.epoch}", unit="batch", leave=False)
        results = engine.evaluate(self.engine.module, self.val_loader, cfg.train.precision, self.info.device, bar)
        logged = {f"val/{k}": v for k, v in results.items() if k != "samples"}
        if self.ema is not None:
            ema_results = engine.evaluate(self.ema.module, self.val_loader, cfg.train.precision, self.info.device,
                                          bar)
            logged.update({f"val_ema/{k}": v for k, v in ema_results.items() if k != "samples"})
            results.update({f"ema_{k}": v for k, v in ema_results.items()})
        bar.close()
        self.tracker.log_metrics({**logged, "epoch": state.epoch}, step=state.step)
        score = results.get("ema_top1", results["top1"])
        if state.best_top1 is None or score > state.best_top1:
            state.best_top1, state.best_epoch = score, state.epoch
            state.best_eval = {k: v for k, v in results.items() if "samples" not in k}
            if self._save_best():
                self.tracker.log_best(self.run_dir / "best.safetensors", score, state.step)
        if self.info.is_main:
            ema_txt = f", EMA top-1 {results['ema_top1']:.2f}" if self.ema is not None else ""
            _write(f"epoch {state.epoch} step {state.step}: val top-1 {results['top1']:.2f} top-5 "
                   f"{results['top5']:.2f} loss {results['loss']:.4f} ({results['samples']} images){ema_txt}")
            export.append_summary(self.run_dir / "summary.csv", state.epoch, state.step, results)
        self.last_eval = results
        self.meter.pause(time.perf_counter() - t0)

    def _save_best(self) -> bool:
        """best.safetensors: the EMA weights when there is an EMA (it is what scored), else the model's."""
        if self.ema is None and self.engine.zero_optimization_stage() == 3:
            return False  # partitioned parameters: export the best tag with launchers/export.py instead
        if self.info.is_main:
            module = self.ema.module if self.ema is not None else self.engine.module
            export.save_safetensors(module.state_dict(), self.cfg, self.run_dir / "best.safetensors")
        return True

    def _save(self, losses: list[torch.Tensor]) -> None:
        """Checkpoint this step on every rank; the loss since the last log is checked first, so a NaN never
        overwrites ``latest`` with broken weights."""
        if losses:
            self._checked_loss(losses)
        t0 = time.perf_counter()
        self._sync_bn()
        self.state.mlflow_run_id = self.tracker.run_id  # created late if the server was down at start
        client = {"train_state": self.state.state_dict(),
                  "ema": self.ema.state_dict() if self.ema is not None else None}
        rank_state = {"rng": checkpoint.rng_state(), "loader": self.train_loader.state_dict()}
        checkpoint.save(self.engine, self.run_dir, self.state.step, client, rank_state, self.info.rank,
                        self.cfg.checkpoint.keep_last)
        self.save_seconds = time.perf_counter() - t0
        self.meter.pause(self.save_seconds)

    def _set_aside_after_nan(self, error: str) -> str:
        """The message of a non-finite loss, naming the last good checkpoint: the newest one followed by a loss
        checked finite. The tags saved since that check hold weights the broken loss was computed from (finite,
        maybe 1e29 large), so they are set aside and ``latest`` moves back to the good one."""
        tags = checkpoint.complete_tags(self.run_dir)
        suspect = {t: f"not followed by a finite loss: {error}" for t in tags
                   if int(t.removeprefix("step_")) >= self.finite_through}
        if suspect and self.info.is_main:
            checkpoint.set_aside(self.run_dir, suspect)
        distributed.barrier()
        good = [t for t in tags if t not in suspect]
        last = (f"the last good checkpoint is {good[0]} (the newest one followed by a finite loss)" if good
                else "no checkpoint is known good")
        return f"{error}; stopping: {last}" + (f"; {', '.join(suspect)} set aside" if suspect else "")

    def _save_if_time(self, stop: StopSignals, losses: list[torch.Tensor]) -> None:
        """On SIGUSR1 always save (SLURM warned ahead); on SIGTERM only when the last save's time fits in what is
        left of the grace period, since a save cut short by SIGKILL is wasted I/O."""
        left = TERM_GRACE_S - (time.monotonic() - stop.since) if stop.since else TERM_GRACE_S
        fits = distributed.all_agree(stop.code != 2 or self.save_seconds < left)
        if fits:
            self._save(losses)
        elif self.info.is_main:
            _write(f"stop signal: not saving step {self.state.step} (the last save took {self.save_seconds:.0f} s, "
                   f"{left:.0f} s of SLURM's grace remain); the run resumes from {self._latest()}")

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
        self.tracker.finish(stored.get("status", "FINISHED"))
        return RunResult(status="FINISHED", step=self.state.step, epoch=self.state.epoch,
                         world_size=self.info.world_size, run_dir=str(self.run_dir),
                         mlflow_run_id=self.tracker.run_id, best_top1=self.state.best_top1,
                         best_epoch=self.state.best_epoch, best_eval=self.state.best_eval,
                         val={k.removeprefix("val_"): v for k, v in stored.items() if k.startswith("val_")},
                         message="already finished")

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

    def _latest(self) -> str:
        tags = checkpoint.complete_tags(self.run_dir)
        return tags[0] if tags else "the start (no checkpoint yet)"

    def _finish(self, status: str, message: str, stopped_by: str | None) -> RunResult:
        state, info = self.state, self.info
        if status == "FAILED" and info.is_main:
            print(f"error: {message}", file=sys.stderr, flush=True)
        result = RunResult(status=status, step=state.step, epoch=state.epoch, world_size=info.world_size,
                           run_dir=str(self.run_dir), mlflow_run_id=self.tracker.run_id, best_top1=state.best_top1,
                           best_epoch=state.best_epoch, best_eval=state.best_eval, val=self.last_eval,
                           message=message, signal=stopped_by, link=self.tracker.ui_link())
        if info.is_main:
            files.write_json(self.run_dir / "final_metrics.json", result.to_json())
            for artifact in (self.run_dir / "config.yaml", self.run_dir / "final_metrics.json",
                             self.run_dir / "summary.csv", data_loaders.sidecar_path(self.cfg.data.train)):
                self.tracker.log_artifact(artifact)
        self.tracker.finish({"STOPPED": "KILLED"}.get(status, status))
        return result


# ---------------------------------------------------------------------------------------------- setup helpers


def _resolve_device_defaults(cfg: RunConfig, device: torch.device) -> None:
    """``None`` means "what is fast here": channels_last and torch.compile pay off on CUDA, cost time on a CPU.
    Not compile at ZeRO-3: its parameter-gathering hooks on every submodule are ``torch.compiler.disable``d, so the
    compiled model is one graph break per submodule, compile time without its gain."""
    on_gpu = device.type == "cuda"
    if cfg.data.channels_last is None:
        cfg.data.channels_last = on_gpu
    if cfg.train.compile is None:
        cfg.train.compile = on_gpu and cfg.train.zero_stage < 3


def default_run_dir(arch: str, job_id: str | None = None) -> Path:
    """``runs/<arch>-<SLURM job id>``: stable across requeues of one job; elsewhere the start time."""
    job = job_id or slurm_job_id()
    return Path("runs") / f"{arch}-{job or time.strftime('%Y%m%d-%H%M%S')}"


def _resolve_run_dir(cfg: RunConfig) -> Path:
    if not cfg.checkpoint.run_dir:  # rank 0 picks, so every rank agrees even when their clocks straddle a second
        cfg.checkpoint.run_dir = str(distributed.broadcast_object(default_run_dir(cfg.model.arch)))
    return Path(cfg.checkpoint.run_dir)


def _lock(lock: checkpoint.RunLock, run_dir: Path, is_main: bool) -> None:
    """Rank 0 takes the run directory's lock; every rank learns the outcome, so all stop together."""
    error = None
    if is_main:
        try:
            lock.acquire()
        except (checkpoint.CheckpointError, OSError) as e:
            error = e
    if distributed.any_rank(error is not None):
        if isinstance(error, OSError):
            raise ConfigError(f"checkpoint.run_dir={str(run_dir)!r} is not usable: {error}") from None
        raise error or checkpoint.CheckpointError(f"{run_dir} is in use by another training process")


def _check_fixed_keys(cfg: RunConfig, run_dir: Path) -> None:
    """Resuming a run under another arch, class count, image size or batch would load weights or a schedule that
    mean something else: refuse, naming the differences, unless checkpoint.allow_config_change is set."""
    saved_file = run_dir / "config.yaml"
    if cfg.checkpoint.allow_config_change or not saved_file.is_file() or not checkpoint.complete_tags(run_dir):
        return
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return  # the checkpoints' own loading decides whether this directory is usable
    now = cfg.to_dict()
    diffs = []
    for key in FIXED_ON_RESUME:
        section, name = key.split(".")
        old, new = saved.get(section, {}).get(name), now[section][name]
        if old is not None and old != new:
            diffs.append(f"{key} {old!r} -> {new!r}")
    if diffs:
        raise ConfigError(f"{run_dir} holds a run with other settings ({', '.join(diffs)}): use a new "
                          "checkpoint.run_dir, or --set checkpoint.allow_config_change=true to resume anyway")


def _progress(total: int, initial: int, enabled: bool, **kw):
    """tqdm's bar on a terminal; in a file (a SLURM log, CI) the plain lines of ``LineProgress`` instead of a bar
    that rewrites one endless line with ``\\r`` and cursor escape codes."""
    if not sys.stderr.isatty():
        return LineProgress(total, initial, enabled)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, mininterval=2.0,
                **{"unit": "step", **kw})


class LineProgress:
    """The progress bar's interface for a log file: counting is silent, and each ``set_postfix`` (the trainer calls
    it once per log interval) writes one plain line: ``step 120/1000 (12%) loss 3.210 lr 1.00e-03 img_s 512
    [01:02<07:40]``. An eval, which sets no postfix, writes nothing; its result line is the trainer's own."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.n, self.total, self.enabled = initial, total, enabled
        self._start, self._start_n = time.monotonic(), initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        elapsed = time.monotonic() - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        left = tqdm.format_interval((self.total - self.n) / rate) if rate > 0 else "?"
        fields = " ".join(f"{k} {v}" for k, v in values.items())
        print(f"step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%) {fields} "
              f"[{tqdm.format_interval(elapsed)}<{left}]", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _write(line: str) -> None:
    """A line on stdout that does not break the progress bar (which lives on stderr)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
