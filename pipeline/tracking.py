"""MLflow tracking from rank 0: one MLflow run per training run, appended to by resumes and requeues.

Tracking must never stop training, and must never lose what training measured. So ``metrics.jsonl`` in the run
directory is the record: every call (metrics, tags, status, artifacts, datasets) is appended there first, and a
background thread delivers the record to MLflow from the byte offset it last reached. The offset and the run id
live beside the record in ``metrics.jsonl.mlflow.json`` (written atomically, under a file lock), so whatever MLflow
did not take - an outage, a ``finish`` that timed out - is delivered later, exactly once, by the next start of the
same run or by ``python launchers/sync_mlflow.py RUN_DIR``. The record ends with the run's final status, so the
late delivery also closes the run as FINISHED, KILLED or FAILED.

The training loop never waits on the network: MLflow's own HTTP retries (7, exponential) are cut to one short
attempt per call, and the thread retries with its own backoff. ``finish`` waits a bounded time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from data_loaders import sidecar_path

from . import files
from .config import ConfigError, RunConfig
from .runtime import command, slurm_job_id

PROJECT_DIR = Path(__file__).resolve().parent.parent
# MLflow 3.17's UI opens an experiment in its GenAI view (traces, tokens) unless told otherwise. The experiment-kind
# tag is what the UI writes when a user picks a kind, but the 3.17 bundle decides by the ``workflowType`` query
# parameter (else the browser's last choice, GenAI at first), so ``ui_link`` carries that. Its runs table shows no
# metric column by default; a shared view (an experiment tag the UI's "share" writes, named by the link's
# ``viewStateShareKey``) adds the top-1 and loss columns.
VIEW_KEY = "sovit-training"
_COLUMNS = ["metrics.`val/best_top1`", "metrics.`val/top1`", "metrics.`train/loss`"]
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development",
                   f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps({"selectedColumns": _COLUMNS})}
WORKFLOW = "workflowType=machine_learning"
TRAINING_VIEW = f"{WORKFLOW}&viewStateShareKey={VIEW_KEY}"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:]+)(?P<password>:[^\s/@]*)?@")


def configure() -> None:
    """Process-wide MLflow settings for a training job, applied by ``start`` and ``sync`` rather than at import.

    One short HTTP attempt per call (the background thread owns retrying), no telemetry calls home (MLflow reads
    that flag when it is first imported, hence the environment comes first), and a quiet terminal: no MLflow/alembic
    INFO lines (table creation, migrations, system-metrics monitoring; warnings still show), no "View run at"
    lines, which would show the URI's credentials and open the GenAI view (``ui_link`` is the link to print), and
    no artifact progress bars (the logged model's files, at the end of a run). Values exported by the user win over
    these defaults."""
    for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "5"),
                       ("MLFLOW_DISABLE_TELEMETRY", "true"), ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"),
                       ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")):
        os.environ.setdefault(key, value)
    import mlflow  # noqa: F401  (it sets its logger to INFO when imported: import first, then quieten)

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # a failed sqlite write is logged with its whole SQL and traceback, each retry; the courier warns once instead
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced: ``http://user:TOKEN@host`` becomes
    ``http://user:***@host``, and a lone user part (often a token: ``http://TOKEN@host``) becomes ``***``."""
    def hide(m: re.Match) -> str:
        return f"{m['scheme']}{m['user']}:***@" if m["password"] is not None else f"{m['scheme']}***@"

    return _USERINFO.sub(hide, str(text))


def tracking_uri(cfg: RunConfig) -> str:
    """The one place the tracking URI is chosen: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow 3's
    default store ``sqlite:///mlflow.db`` in the working directory. A relative sqlite path is made absolute here,
    so the launcher, every rank and a later sync all mean the same file. A redacted ``tracking.uri`` (see
    ``hide_credentials``) stands for ``$MLFLOW_TRACKING_URI``, which holds it with its credentials."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if "***@" in uri:
        real = os.environ.get("MLFLOW_TRACKING_URI", "")
        if redact(real) != uri:
            raise ConfigError(f"tracking.uri={uri} is redacted: set MLFLOW_TRACKING_URI to it with its credentials")
        uri = real
    db = _sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db is not None and not db.is_absolute() else uri


def hide_credentials(uri: str) -> str:
    """A launcher's URI with credentials moves to ``$MLFLOW_TRACKING_URI`` (which the ranks and SLURM jobs inherit)
    and the config keeps it redacted, so no config dump, submitit pickle or sbatch script on disk holds a secret."""
    if redact(uri) == uri:
        return uri
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return redact(uri)


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///:memory:"):
        return None
    return Path(uri[len("sqlite:///"):].split("?")[0])


def ui_link(uri: str, experiment_id: str | None = None) -> str:
    """Where to watch in MLflow's training view: the experiment's runs, or before a run has made its experiment
    (a job still in the queue) the list of experiments, also in the training view (MLflow's root opens the GenAI
    view). A URL for an HTTP server (credentials left out), else the ``mlflow ui`` command for the store, then the
    URL to open."""
    path = f"/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}" if experiment_id else f"/#/experiments?{WORKFLOW}"
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", "")) + path
    return f"{command('mlflow')} ui --backend-store-uri {redact(uri)}, then open http://127.0.0.1:5000{path}"


def _text(value: str) -> str:
    """MLflow stores text: a path's bytes that are not UTF-8 (surrogates in Python) are written as ``\\xe9``."""
    return os.fsencode(value).decode(errors="backslashreplace")


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


# What a .beton sidecar says about the conversion run rather than the data: where it read from, how long it took
# and how fast, and its speed settings (the converter writes the same bytes whatever the worker count and chunks).
_CONVERSION_RUN = ("source", "seconds", "images_per_second", "images_per_second_per_worker")
_SPEED_OPTIONS = ("workers", "chunk_size")


def dataset_digest(report: dict) -> str:
    """The MLflow dataset version of a .beton: a hash of what its sidecar says about the data (classes, counts,
    options, the skipped and ignored files, size), so converting the same images again is the same version and
    storing other data is another one. A whole-file hash made every re-conversion a new version (the timings)."""
    content = {key: value for key, value in report.items() if key not in _CONVERSION_RUN}
    if isinstance(content.get("options"), dict):
        content["options"] = {k: v for k, v in content["options"].items() if k not in _SPEED_OPTIONS}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


class Tracker:
    """The no-op tracker of ranks != 0 and of runs with neither MLflow nor a record file."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def log_dataset(self, sidecar: str | Path, context: str = "train") -> None:
        pass

    def log_best(self, path: str | Path, top1: float, step: int) -> None:
        pass

    def ui_link(self) -> str | None:
        return None

    def resume_at(self, step: int) -> None:
        pass

    def finish(self, status: str = "FINISHED", timeout: float = 60.0) -> None:
        pass


class JsonlTracker(Tracker):
    """Appends every call as one JSON line to the record (rank 0), then lets ``courier`` deliver it to MLflow.

    Readable with no server at all, and it survives requeues: a resumed run appends to the same file. Lines with a
    ``step`` are metrics (``{"step": 100, "timestamp": ms, "train/loss": 2.3}``); the others carry exactly one of
    ``params``, ``tags``, ``status``, ``artifact``, ``dataset``, ``model``."""

    def __init__(self, path: Path, courier: MlflowCourier | None = None, spool: Any = None):
        self.path, self.courier = Path(path), courier
        self._spool = spool  # the temporary directory holding ``path`` when the caller gave no record: kept alive
        self._best: tuple[Path, int] | None = None  # the best weights and the step of their evaluation
        self._recorded: dict[int, set[str]] = {}  # step -> metrics the record holds already (see resume_at)

    @property
    def run_id(self) -> str | None:
        return self.courier.run_id if self.courier else None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        recorded = self._recorded.get(step, ())
        fresh = {k: float(v) for k, v in metrics.items() if k not in recorded}
        if fresh:
            self.append({"step": step, **fresh})

    def resume_at(self, step: int) -> None:
        """A resumed run replays the steps after its checkpoint, which the record may hold already (the run went
        on after that save): those metrics are not logged again, so the record and MLflow hold each step once. An
        exact resume computes the same values; an elastic one keeps the first run's values for the replayed steps."""
        self._recorded = {}
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if rec.get("step", -1) > step:
                        self._recorded.setdefault(rec["step"], set()).update(rec)

    def log_artifact(self, path: str | Path) -> None:
        """Uploads ``path`` (as it is at delivery time) to the run's artifact root; a path that does not exist is
        skipped (the trainer passes optional files, such as the sidecar of a loader that has none)."""
        if Path(path).is_file():
            self.append({"artifact": str(Path(path).resolve())})

    def log_dataset(self, sidecar: str | Path, context: str = "train") -> None:
        """Records the ``.beton`` a loader reads as an MLflow dataset input of the run (``mlflow.log_input``): named
        after the file, sourced at its path, with ``dataset_digest`` of its conversion report (the sidecar JSON) as
        digest. ``sidecar`` may be the ``.beton`` or its sidecar."""
        sidecar = sidecar_path(sidecar) if Path(sidecar).suffix == ".beton" else Path(sidecar)
        try:
            report = json.loads(sidecar.read_bytes())
        except (OSError, ValueError) as e:  # never fatal to training
            warnings.warn(f"dataset not logged: {sidecar} is not a readable .beton sidecar ({e})", stacklevel=2)
            return
        beton = sidecar.with_suffix("").resolve()
        profile = {"num_rows": report.get("num_samples"), "num_classes": report.get("num_classes"),
                   "bytes": report.get("bytes"), "fields": report.get("fields")}
        self.append({"dataset": {"name": beton.name, "digest": dataset_digest(report),
                                 "source_type": "local", "source": json.dumps({"uri": str(beton)}),
                                 "profile": json.dumps(profile)}, "context": context})

    def log_best(self, path: str | Path, top1: float, step: int) -> None:
        """New best weights at ``path``: ``val/best_top1`` is logged now, and the file becomes the run's logged
        model once, by ``finish``, rather than at every improvement (it is rewritten in place and can be large)."""
        self.log_metrics({"val/best_top1": top1}, step)
        self._best = (Path(path).resolve(), step)

    def ui_link(self) -> str | None:
        return self.courier.ui_link() if self.courier else None

    def finish(self, status: str = "FINISHED", timeout: float = 60.0) -> None:
        """Appends the best weights (as a logged model) and the final status, and waits at most ``timeout`` s for
        MLflow to take the whole record; whatever it has not taken then stays in the record for a later start or
        sync.

        When this machine's disk is what failed (the record or its delivery state cannot be written, typically a
        full disk), waiting cannot help: the MLflow run is ended with ``status`` at once, and the record keeps the
        rest for ``sync_mlflow.py``. Never raises for that: it runs while training is already failing."""
        try:
            if self._best is not None and self._best[0].is_file():
                self.append({"model": str(self._best[0]), "best_step": self._best[1]})
            self.append({"status": status})
        except files.WriteError as e:
            local: Exception | None = e
        else:
            if not self.courier or self.courier.finish(timeout):
                return
            local = self.courier.local_error
        rest = ("lost (no record file was given)" if self._spool else "delivered by the next start of this run, "
                f"or now by: python launchers/sync_mlflow.py {self.path.parent}")
        if local is None:
            warnings.warn(f"MLflow at {redact(self.courier.uri)} has not taken the whole record within "
                          f"{timeout:.0f} s; the rest is {rest}", stacklevel=2)
            return
        ended = self.courier is not None and self.courier.end(status)
        warnings.warn(f"{local}; " + (f"the MLflow run was ended {status} directly, and the rest of the record is "
                                      f"{rest}" if ended else f"the MLflow run could not be ended: the rest of the "
                                      f"record, and its status, is {rest}"), stacklevel=2)

    def append(self, record: dict[str, Any]) -> None:
        files.append(self.path, json.dumps({**record, "timestamp": int(time.time() * 1000)}) + "\n")


class MlflowCourier:
    """Delivers a record file to one MLflow run, from where delivery last stopped.

    The live tracker runs it on a background thread; ``sync`` runs it to the end in the foreground. Both hold the
    record's file lock while they deliver a chunk and move the offset, so they never send a line twice. A line
    MLflow refuses for good (a 4xx answer, a file gone) is skipped with a warning; anything else is retried."""

    CHUNK = 1 << 20  # bytes of the record read per delivery step
    MAX_METRICS = 1000  # MLflow's limit per log_batch
    POLL = 1.0  # seconds between looks at the record when everything is delivered

    def __init__(self, record: Path, uri: str, experiment: str | None = None, run_name: str | None = None,
                 run_id: str | None = None, system_metrics: bool = False):
        self.record, self.uri, self._client = Path(record), uri, None
        self.state_path = self.record.with_name(self.record.name + ".mlflow.json")
        self._lock_path = self.record.with_name(self.record.name + ".lock")
        self.run_id: str | None = None
        self._experiment_id: str | None = None
        self._system_metrics, self._monitor = system_metrics, None
        self._warned, self.sent = False, 0  # sent: lines delivered (or refused) by this courier
        self.local_error: files.WriteError | None = None  # this machine's disk failed delivery (not MLflow)
        self._wake, self._finishing, self._done, self._stop = (threading.Event() for _ in range(4))
        if experiment is not None:  # a live start: bring the state up to date before the first line is appended
            with self._locked():
                state = self.read_state(missing_ok=True) or {"delivered": self._size() if run_id else 0}
                state.update(uri=redact(uri), experiment=experiment, run_name=run_name)
                state["run_id"] = run_id or state.get("run_id")
                self._write_state(state)

    @property
    def client(self):
        """Made on first use, inside the callers' error handling: creating the client creates the store."""
        if self._client is None:
            from mlflow import MlflowClient

            with self._store_lock():
                self._client = MlflowClient(self.uri)
        return self._client

    @property
    def new_run(self) -> bool:
        return self.read_state()["run_id"] is None

    # ---- the live tracker's side
    def open(self) -> None:
        """One synchronous try, so the run id can go into the first checkpoint; then the background thread."""
        try:
            with self._locked():
                state = self.read_state()
                self._ensure_run(state)
                self._write_state(state)
        except Exception as e:
            self._failed(e, finishing=False)
        threading.Thread(target=self._work, name="mlflow-tracker", daemon=True).start()

    def finish(self, timeout: float) -> bool:
        """Waits at most ``timeout`` s for the whole record (which now ends with the status) to be delivered;
        False, and the thread stops, if it was not, or at once when this machine's disk stopped the delivery."""
        if self._monitor is not None:
            self._monitor.finish()
        self._finishing.set()
        self._wake.set()
        if self._done.wait(timeout) and self.local_error is None:
            return True
        self._stop.set()
        return False

    def end(self, status: str) -> bool:
        """Ends the MLflow run with ``status`` now, outside the record; False when MLflow could not be told."""
        if self.run_id is None:
            return False
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception:  # the caller's warning says the record keeps the rest
            return False
        return True

    def _work(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            finishing = self._finishing.is_set()  # read first: a status appended before it is seen below
            try:
                done = self.deliver()
            except Exception as e:
                if self._failed(e, finishing) and finishing:  # waiting for this machine's disk cannot help now
                    self._done.set()
                    return
                self._sleep(backoff)  # finish() wakes it, and once finishing a returning server is seen within 1 s
                backoff = min(backoff * 2, 1.0 if self._finishing.is_set() else 30.0)
                continue
            backoff, self.local_error = 1.0, None
            if self._warned:
                self._warned = False
                warnings.warn(f"MLflow at {redact(self.uri)} is reachable again; logging resumed", stacklevel=2)
            if done and finishing:
                self._done.set()
                return
            if done:
                self._sleep(self.POLL)

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def _failed(self, e: Exception, finishing: bool) -> bool:
        """Warns once about a failed delivery; True when this machine's disk failed it, not MLflow: the record's
        state could not be written, or a local sqlite store is on a full disk (SQLite's SQLITE_FULL message)."""
        db = _sqlite_path(self.uri)
        if db is not None and "database or disk is full" in str(e):
            e = files.WriteError(f"could not write MLflow's store {db} (database or disk is full); "
                                 f"{files.free_mib(db):.1f} MiB free on its file system")
        if not isinstance(e, files.WriteError):
            self._warn(e)
            return False
        if self.local_error is None and not finishing:
            warnings.warn(f"{e}; delivery to MLflow waits for it", stacklevel=3)
        self.local_error = e
        return True

    def _warn(self, e: Exception) -> None:
        if not self._warned:
            self._warned = True
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.warn(f"MLflow at {redact(self.uri)} is unreachable ({redact(msg)[:300]}); training goes on, "
                          "the record keeps every line and delivery retries in the background", stacklevel=2)

    # ---- delivery, shared with sync
    def deliver(self) -> bool:
        """Delivers the next chunk of the record beyond the saved offset; True when nothing is left."""
        with self._locked():
            state = self.read_state()
            self._ensure_run(state)
            with open(self.record, "rb") as f:
                f.seek(state["delivered"])
                data = f.read(self.CHUNK)
            for records, end in self._units(data, state["delivered"]):
                try:
                    self._apply(records)
                except Exception as e:
                    if not _refused(e):
                        raise
                    warnings.warn(f"MLflow at {redact(self.uri)} refused a record, skipped: "
                                  f"{redact(str(e).splitlines()[0])[:300]}", stacklevel=2)
                state["delivered"] = end
                self._write_state(state)
                self.sent += len(records)
            return state["delivered"] >= self._size()

    def _units(self, data: bytes, offset: int):
        """Complete lines from ``data`` as ``(records, end offset)``: runs of metric lines up to MLflow's batch
        limit together, every other line alone."""
        batch, n_metrics, end = [], 0, offset
        for raw in data[:data.rfind(b"\n") + 1].splitlines(keepends=True):
            try:
                rec = json.loads(raw)
            except ValueError:  # a line torn by a crash mid-write
                rec = None
            is_metrics = bool(rec) and "step" in rec
            n = sum(k not in ("step", "timestamp") for k in rec) if is_metrics else 0
            if batch and (not is_metrics or n_metrics + n > self.MAX_METRICS):
                yield batch, end
                batch, n_metrics = [], 0
            end += len(raw)
            if is_metrics:
                batch.append(rec)
                n_metrics += n
            else:
                yield ([rec] if rec else []), end
        if batch:
            yield batch, end

    def _apply(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

        if not records:
            return
        c, run, rec = self.client, self.run_id, records[0]
        now = int(time.time() * 1000)
        if "step" in rec:
            c.log_batch(run, metrics=[Metric(k, v, r.get("timestamp", now), r["step"]) for r in records
                                      for k, v in r.items() if k not in ("step", "timestamp")])
        elif "params" in rec:
            params = [Param(k, _text(str(v))[:6000]) for k, v in rec["params"].items()]
            for i in range(0, len(params), 100):  # MLflow's limit per log_batch
                c.log_batch(run, params=params[i:i + 100])
        elif "tags" in rec:
            c.log_batch(run, tags=[RunTag(k, _text(redact(str(v)))) for k, v in rec["tags"].items()])
        elif "status" in rec:
            if rec["status"] == "RUNNING":
                c.update_run(run, status="RUNNING")
            else:
                c.set_terminated(run, status=rec["status"], end_time=rec.get("timestamp"))
        elif "artifact" in rec:
            if Path(rec["artifact"]).is_file():
                c.log_artifact(run, rec["artifact"])
            else:
                warnings.warn(f"artifact {rec['artifact']} no longer exists; not uploaded", stacklevel=2)
        elif "dataset" in rec:
            dataset = {k: _text(v) for k, v in rec["dataset"].items()}
            c.log_inputs(run, datasets=[DatasetInput(Dataset(**dataset),
                                                     tags=[InputTag("mlflow.data.context", rec["context"])])])
        elif "model" in rec:
            hub = _exported_config(Path(rec["model"]))
            if hub is not None:
                log_best_model(c, run, self._experiment_id, Path(rec["model"]), hub, rec["best_step"])

    def _ensure_run(self, state: dict[str, Any]) -> None:
        """Finds the run of the state (or creates it, in an experiment that opens in the training view)."""
        if self.run_id is not None and self.run_id == state["run_id"]:
            return
        from mlflow.exceptions import MlflowException

        run_id = state["run_id"] or self.run_id  # known here, not on disk: the state write after create_run failed
        if run_id is not None:
            try:
                exp_id = self.client.get_run(run_id).info.experiment_id
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                warnings.warn(f"run {run_id} is not in MLflow at {redact(self.uri)}: a new run gets the whole "
                              f"record {self.record}", stacklevel=2)
                run_id, state["delivered"] = None, 0
        if run_id is None:
            exp_id = self._get_or_create_experiment(state["experiment"])
            run_id = self.client.create_run(exp_id, run_name=state["run_name"] and _text(state["run_name"]),
                                            start_time=self._first_timestamp()).info.run_id
        self.run_id, self._experiment_id, state["run_id"] = run_id, exp_id, run_id
        self._write_state(state)  # at once: a failure later must not create a second run
        self._start_system_metrics()

    def _get_or_create_experiment(self, name: str) -> str:
        """The experiment's id; it gets the training-view tags it lacks (also one made before they existed)."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            db = _sqlite_path(self.uri)  # artifacts next to the store, not in ./mlruns of the working directory
            location = str(db.resolve().parent / "mlartifacts") if db is not None else None
            try:
                return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
            except MlflowException as e:  # another run created it meanwhile
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(name)
        for key, value in EXPERIMENT_TAGS.items():
            if key not in exp.tags:
                self.client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    def _start_system_metrics(self) -> None:
        if not self._system_metrics or self._monitor is not None or self._finishing.is_set():
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10, resume_logging=True,
                                                 tracking_uri=self.uri)
            self._monitor.start()
        except Exception as e:  # psutil/pynvml missing or the monitor refused: metrics still flow
            warnings.warn(f"MLflow system metrics are off: {redact(str(e))}", stacklevel=2)

    def ui_link(self) -> str | None:
        return ui_link(self.uri, self._experiment_id) if self._experiment_id is not None else None

    # ---- files
    def read_state(self, missing_ok: bool = False) -> dict[str, Any] | None:
        if missing_ok and not self.state_path.exists():
            return None
        return json.loads(self.state_path.read_text())

    def _write_state(self, state: dict[str, Any]) -> None:
        files.write_json(self.state_path, state, indent=None)

    def _first_timestamp(self) -> int | None:
        """When the record began: the run's start, also for a run created late (server down at start, or sync)."""
        with contextlib.suppress(OSError, ValueError), open(self.record) as f:
            return json.loads(f.readline()).get("timestamp")
        return None

    def _size(self) -> int:
        return self.record.stat().st_size if self.record.exists() else 0

    def _locked(self):
        from filelock import FileLock

        return FileLock(self._lock_path)

    def _store_lock(self):
        """A fresh sqlite store is created (alembic migrations) by the first client of each process; two runs
        doing that at once crash one of them, so they take turns on a lock file beside the database."""
        from filelock import FileLock

        db = _sqlite_path(self.uri)
        if db is None:
            return contextlib.nullcontext()
        db.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(db.with_name(db.name + ".lock"))


def _exported_config(weights: Path) -> dict[str, Any] | None:
    """The config in the header of the best weights; None, with a warning, for a file that is gone or is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return json.loads(f.metadata()["config"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        warnings.warn(f"best weights {weights} are not a readable export ({type(e).__name__}: {e}); no logged "
                      "model", stacklevel=2)
        return None


def log_best_model(client, run_id: str, experiment_id: str, weights: Path, hub: dict[str, Any], step: int) -> str:
    """The best weights as an MLflow 3 logged model of ``run_id`` (the Models tab), made as MLflow's own
    ``log_model`` makes one, with the client of this run's store: the run's params, an output of the run at ``step``
    (the best evaluation) with the run's val metrics at that step linked to it, and READY once its files are up.
    ``hub`` is the export config that the weights' header carries.

    The files are a pyfunc from code (pipeline/mlflow_pyfunc.py, with this package as its code: nothing pickled)
    around the timm local-dir export of the weights: ``mlflow.pyfunc.load_model("models:/ID")`` predicts, and the
    downloaded ``artifacts/export`` folder is what ``timm.create_model("local-dir:...", pretrained=True)`` reads."""
    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model

    run = client.get_run(run_id)
    model = client.create_logged_model(experiment_id, name=hub["architecture"], source_run_id=run_id,
                                       params=run.data.params)
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        client.log_batch(run_id, metrics=[
            Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id, run_id=run_id)
            for key in run.data.metrics if key.startswith("val") for m in client.get_metric_history(run_id, key)
            if m.step == step])
        with tempfile.TemporaryDirectory() as tmp:
            export = Path(tmp, "export")
            export.mkdir()
            (export / "config.json").write_text(json.dumps(hub, indent=1))
            shutil.copyfile(weights, export / "model.safetensors")  # a copy: MLflow refuses links out of a folder
            with warnings.catch_warnings():  # the signature says what an example would; an image batch is large
                warnings.filterwarnings("ignore", message=".*An input example was not provided")
                mlflow.pyfunc.save_model(
                    Path(tmp, "model"), python_model=str(Path(__file__).with_name("mlflow_pyfunc.py")),
                    artifacts={"export": str(export)}, code_paths=[str(PROJECT_DIR / "pipeline")],
                    pip_requirements=_requirements("torch", "timm", "safetensors", "numpy"),
                    signature=_signature(hub), mlflow_model=Model(artifact_path=model.artifact_location,
                                                                  model_uuid=model.model_id, run_id=run_id,
                                                                  model_id=model.model_id))
            client.log_model_artifacts(model.model_id, str(Path(tmp, "model")))
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def _requirements(*packages: str) -> list[str]:
    """This environment's versions, without local labels (``2.14.1+cpu`` is not on PyPI), as MLflow infers them."""
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+')[0]}" for p in packages]


def _signature(hub: dict[str, Any]):
    """A float32 image batch at the export's size in, logits out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    size = hub["model_args"]["img_size"]
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype("float32"), (-1, 3, size, size))]),
                          outputs=Schema([TensorSpec(np.dtype("float32"), (-1, hub["num_classes"]))]))


def _refused(e: Exception) -> bool:
    """MLflow answered, and retrying the same request cannot help (bad value, unknown run, changed param). Not so
    for a refused login (401/403: a token to renew), a timeout (408) or throttling (429): those are retried."""
    from mlflow.exceptions import MlflowException

    code = e.get_http_status_code() if isinstance(e, MlflowException) else 0
    return 400 <= code < 500 and code not in (401, 403, 408, 429)


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
    state_path = record.with_name(record.name + ".mlflow.json")
    if not state_path.exists():
        raise FileNotFoundError(f"{state_path} does not exist: {record} was not written with MLflow tracking on")
    uri = uri or json.loads(state_path.read_text())["uri"]
    if "***" in uri:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
        if not uri:
            raise ValueError(f"the tracking URI of {record} had credentials and is stored redacted: pass --uri or "
                             "set MLFLOW_TRACKING_URI")
    courier = MlflowCourier(record, uri)
    while True:  # chunk by chunk; a chunk that delivers nothing is a torn last line a crash left: stop there
        before = courier.sent
        if courier.deliver() or courier.sent == before:
            break
    status = courier.client.get_run(courier.run_id).info.status
    return Synced(courier.run_id, courier.sent, status, courier.ui_link())
