"""MLflow tracking from rank 0: one MLflow run per training run, appended to by resumes and requeues.

Tracking must never stop training, and must never lose what training measured. So ``metrics.jsonl`` in the run
directory is the record (``pipeline.record``): every call (metrics, tags, status, artifacts, datasets) is appended
there first, and a background thread, the courier (``pipeline.courier``), delivers the record to MLflow from the
byte offset it last reached. Whatever MLflow did not take - an outage, a ``finish`` that timed out - is delivered
later, exactly once, by the next start of the same run or by ``python launchers/sync_mlflow.py RUN_DIR``. The record
ends with the run's final status, so the late delivery also closes the run as FINISHED, KILLED or FAILED. MLflow's
own side (settings, URIs and links, experiments, system metrics, the logged model) is ``pipeline.mlflow_env``.

The training loop never waits on the network: MLflow's own HTTP retries (7, exponential) are cut to one short
attempt per call, and the thread retries with its own backoff. ``finish`` waits a bounded time.

This module starts a run's tracker (``start``) and delivers a record after the fact (``sync``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, RunConfig
from .courier import MlflowCourier, state_path
from .mlflow_env import PROJECT_DIR, configure, hide_credentials, redact, tracking_uri, ui_link
from .record import JsonlTracker, Tracker
from .runtime import slurm_job_id

__all__ = ["JsonlTracker", "Synced", "Tracker", "hide_credentials", "redact", "start", "sync", "tracking_uri",
           "ui_link"]


def default_tags(cfg: RunConfig, world_size: int) -> dict[str, str]:
    tags = {"arch": cfg.model.arch, "loader": cfg.data.loader, "world_size": str(world_size),
            "zero_stage": str(cfg.train.zero_stage), "precision": cfg.train.precision, "host": socket.gethostname()}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        tags["git_commit"] = subprocess.run(["git", "-C", str(PROJECT_DIR), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=5, check=True).stdout.strip()
    job = slurm_job_id()
    if job:
        tags["slurm_job_id"] = job
    return tags


def start(cfg: RunConfig, rank: int, run_id: str | None = None, tags: dict[str, str] | None = None,
          world_size: int = 1, jsonl: Path | None = None) -> Tracker:
    """Rank 0's tracker: the ``jsonl`` record (a temporary file when not given) delivered to MLflow unless
    tracking is disabled. Other ranks: a no-op. ``run_id`` resumes that run; without it, the run the record's
    state names (if any) goes on."""
    if rank != 0:
        return Tracker()
    if not cfg.tracking.enabled:
        return JsonlTracker(jsonl) if jsonl is not None else Tracker()
    configure()
    spool = None
    if jsonl is None:  # nothing outlives the process then
        spool = tempfile.TemporaryDirectory(prefix="mlflow-record-")
        jsonl = Path(spool.name) / "metrics.jsonl"
    run_name = cfg.tracking.run_name or Path(cfg.checkpoint.run_dir).name or None
    courier = MlflowCourier(jsonl, tracking_uri(cfg), cfg.tracking.experiment, run_name, run_id,
                            cfg.tracking.system_metrics)
    tracker = JsonlTracker(jsonl, courier, spool)
    if courier.new_run:  # params are immutable in MLflow: only the first start's config goes in
        tracker.append({"params": {k: redact(v) if isinstance(v, str) else v for k, v in cfg.flat().items()}})
    tracker.append({"tags": {**default_tags(cfg, world_size), **(tags or {})}})
    tracker.append({"status": "RUNNING"})
    courier.open()
    return tracker


@dataclass
class Synced:
    run_id: str
    records: int  # lines of the record delivered by this sync
    status: str  # the run's status in MLflow afterwards
    link: str | None


def sync(record: str | Path, uri: str | None = None) -> Synced:
    """Delivers what MLflow has not yet taken from a run's record, ending with its final status if it has one.

    ``uri`` defaults to the one the run was logged to; a URI that carried credentials is stored redacted, so then
    ``uri`` or ``$MLFLOW_TRACKING_URI`` must give it. Raises on the first failure (run it again later; nothing is
    lost and nothing is sent twice)."""
    configure()
    record = Path(record)
    state = state_path(record)
    if not state.exists():
        raise ConfigError(f"{state} does not exist: {record} was not written with MLflow tracking on")
    uri = uri or json.loads(state.read_text())["uri"]
    if "***" in uri:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
        if not uri:
            raise ConfigError(f"the tracking URI of {record} had credentials and is stored redacted: pass --uri or "
                              "set MLFLOW_TRACKING_URI")
    courier = MlflowCourier(record, uri)
    while True:  # chunk by chunk; a chunk that delivers nothing is a torn last line a crash left: stop there
        before = courier.sent
        if courier.deliver() or courier.sent == before:
            break
    status = courier.client.get_run(courier.run_id).info.status
    return Synced(courier.run_id, courier.sent, status, courier.ui_link())
