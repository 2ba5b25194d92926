"""What a run tells its caller: ``RunResult``, whose ``status`` says what happened and so what the caller does next
(a requeue, an exit code). The launchers read it, so only the standard library is imported here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class Status(StrEnum):
    """How a run ended (``pipeline.trainer`` says when each happens). A str, so it is its own JSON and MLflow text."""

    FINISHED = "FINISHED"  # the schedule (or train.max_steps) is done
    STOPPED = "STOPPED"  # SIGUSR1: saved; the caller requeues the job, which resumes from ``latest``
    KILLED = "KILLED"  # SIGTERM or Ctrl-C: saved when SLURM's grace time allows, not requeued
    FAILED = "FAILED"  # the loss became NaN/inf

    @property
    def mlflow(self) -> str:
        """The MLflow run's end: a STOPPED run is KILLED there, until its requeued job sets it RUNNING again."""
        return Status.KILLED if self is Status.STOPPED else self


@dataclass
class RunResult:
    status: Status
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
        return self.status is Status.STOPPED

    def summary(self) -> str:
        """What a user needs at the end: the best result, where its weights and curves are (the launcher that
        prints it adds the commands that use them)."""
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
