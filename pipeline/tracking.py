"""MLflow tracking from rank 0: one MLflow run per training run, appended to by resumes and requeues.

Tracking must never stop training. Every MLflow call runs on a background thread behind a bounded queue; a
server that is down (at start or mid-run) costs one warning, the thread retries with backoff, and logging catches
up when the server returns. MLflow's own HTTP retries (7, exponential) would block for minutes, so they are cut
to one short attempt per call here. The training loop never waits on the network, and ``finish`` waits a bounded
time for the queue to drain.

Tracking URI: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow 3's default ``sqlite:///mlflow.db`` in
the working directory, which ``mlflow ui`` (run from the same directory, no arguments) opens.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from .config import RunConfig

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no calls home from training jobs
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

PROJECT_DIR = Path(__file__).resolve().parent.parent


class Tracker:
    """The no-op tracker of ranks != 0 and of runs with ``tracking.enabled: false``."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class JsonlTracker(Tracker):
    """Appends every metrics record to ``run_dir/metrics.jsonl`` (rank 0): readable with no server at all, and
    it survives requeues, since a resumed run appends to the same file."""

    def __init__(self, path: Path, inner: Tracker):
        self.path, self.inner = path, inner

    @property
    def run_id(self) -> str | None:
        return self.inner.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self.inner.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path) -> None:
        self.inner.log_artifact(path)

    def finish(self, status: str = "FINISHED") -> None:
        self.inner.finish(status)


class MlflowTracker(Tracker):
    """Queues calls for a background thread that owns the MLflow client and retries while the server is away."""

    MAX_QUEUED = 100_000  # bounded memory when the server is gone for a long time: the oldest metrics are dropped

    def __init__(self, uri: str, experiment: str, run_name: str | None, run_id: str | None,
                 params: dict[str, Any], tags: dict[str, str], system_metrics: bool):
        from mlflow import MlflowClient

        self.uri, self._client = uri, MlflowClient(uri)
        self._experiment, self._run_name, self.run_id = experiment, run_name, run_id
        self._params, self._tags, self._system_metrics = params, tags, system_metrics
        self._monitor = None
        self._queue: queue.Queue = queue.Queue(self.MAX_QUEUED)
        self._warned, self._started = False, False
        if not self._ensure_run():  # one synchronous try, so the run id can go into the first checkpoint
            self._put(("start",))  # otherwise the thread keeps trying even before the first metric arrives
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # ---- called by the training loop: never blocks on the network
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put(("metrics", {k: float(v) for k, v in metrics.items()}, step, int(time.time() * 1000)))

    def log_artifact(self, path: str | Path) -> None:
        if Path(path).exists():
            self._put(("artifact", str(path)))

    def finish(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        self._put(("finish", status))
        self._thread.join(timeout)
        if self._thread.is_alive():
            warnings.warn(f"MLflow at {self.uri} did not take the last {self._queue.qsize()} records within "
                          f"{timeout:.0f} s; they are dropped (training itself is unaffected)", stacklevel=2)

    def _put(self, item: tuple) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                self._queue.get_nowait()

    # ---- the background thread
    def _ensure_run(self) -> bool:
        if self._started:
            return True
        try:
            if self.run_id is None:
                exp = self._client.get_experiment_by_name(self._experiment)
                exp_id = exp.experiment_id if exp else self._client.create_experiment(self._experiment)
                run = self._client.create_run(exp_id, run_name=self._run_name, tags=self._tags)
                self.run_id = run.info.run_id
                self._client.log_batch(self.run_id, params=_params(self._params))
            else:  # a resume or requeue: the same run goes on; params are immutable in MLflow, tags refresh
                self._client.update_run(self.run_id, status="RUNNING")
                for k, v in self._tags.items():
                    self._client.set_tag(self.run_id, k, v)
            self._started = True
            self._start_system_metrics()
            return True
        except Exception as e:
            self._warn(e)
            return False

    def _start_system_metrics(self) -> None:
        if not self._system_metrics or self._monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10, resume_logging=True,
                                                 tracking_uri=self.uri)
            self._monitor.start()
        except Exception as e:  # psutil/pynvml missing or the monitor refused: metrics still flow
            warnings.warn(f"MLflow system metrics are off: {e}", stacklevel=2)

    def _work(self) -> None:
        backoff = 1.0
        while True:
            item = self._queue.get()
            while True:
                try:
                    if not self._ensure_run():
                        raise ConnectionError("run not created yet")
                    done = self._apply(item)
                    break
                except Exception as e:
                    self._warn(e)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    if item[0] == "finish" and backoff >= 8:  # don't hold the process at exit for long
                        return
            backoff = 1.0
            if done:
                return

    def _apply(self, item: tuple) -> bool:
        from mlflow.entities import Metric

        kind = item[0]
        if kind == "metrics":
            _, metrics, step, ts = item
            self._client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])
        elif kind == "artifact":
            self._client.log_artifact(self.run_id, item[1])
        elif kind == "finish":
            if self._monitor is not None:
                self._monitor.finish()
            self._client.set_terminated(self.run_id, status=item[1])
            return True
        if self._warned:
            warnings.warn(f"MLflow at {self.uri} is reachable again; logging resumed", stacklevel=2)
            self._warned = False
        return False

    def _warn(self, e: Exception) -> None:
        if not self._warned:
            self._warned = True
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.warn(f"MLflow at {self.uri} is unreachable ({msg[:200]}); training goes on and logging "
                          "retries in the background", stacklevel=2)


def _params(params: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in params.items()]


def tracking_uri(cfg: RunConfig) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def default_tags(cfg: RunConfig, world_size: int) -> dict[str, str]:
    tags = {"arch": cfg.model.arch, "loader": cfg.data.loader, "world_size": str(world_size),
            "zero_stage": str(cfg.train.zero_stage), "precision": cfg.train.precision, "host": socket.gethostname()}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        tags["git_commit"] = subprocess.run(["git", "-C", str(PROJECT_DIR), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=5, check=True).stdout.strip()
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        tags["slurm_job_id"] = job
    return tags


def start(cfg: RunConfig, rank: int, run_id: str | None = None, tags: dict[str, str] | None = None,
          world_size: int = 1, jsonl: Path | None = None) -> Tracker:
    """Rank 0's tracker: MLflow (unless disabled), plus a local ``jsonl`` file when given. Others: no-op."""
    if rank != 0:
        return Tracker()
    tracker = Tracker()
    if cfg.tracking.enabled:
        all_tags = {**default_tags(cfg, world_size), **(tags or {})}
        tracker = MlflowTracker(tracking_uri(cfg), cfg.tracking.experiment, cfg.tracking.run_name, run_id,
                                cfg.flat(), all_tags, cfg.tracking.system_metrics)
    return JsonlTracker(jsonl, tracker) if jsonl is not None else tracker
