"""The courier: delivers a run's record (``metrics.jsonl``) to its MLflow run, from the byte offset delivery last
reached. The offset and the run id live beside the record in ``metrics.jsonl.mlflow.json`` (``state_path``, written
atomically, under a file lock), so whatever MLflow did not take is delivered later, exactly once, by the next start
of the same run or by ``launchers/sync_mlflow.py``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from . import files, mlflow_env
from .mlflow_env import exported_config, log_best_model, redact, refused, sqlite_path, text, ui_link


def state_path(record: Path) -> Path:
    """Where delivery of ``record`` stands: the MLflow run, the offset delivered, the URI (redacted)."""
    return record.with_name(record.name + ".mlflow.json")


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
        self.state_path = state_path(self.record)
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

            with mlflow_env.store_lock(self.uri):
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
        db = sqlite_path(self.uri)
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
                    if not refused(e):
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
            params = [Param(k, text(str(v))[:6000]) for k, v in rec["params"].items()]
            for i in range(0, len(params), 100):  # MLflow's limit per log_batch
                c.log_batch(run, params=params[i:i + 100])
        elif "tags" in rec:
            c.log_batch(run, tags=[RunTag(k, text(redact(str(v)))) for k, v in rec["tags"].items()])
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
            dataset = {k: text(v) for k, v in rec["dataset"].items()}
            c.log_inputs(run, datasets=[DatasetInput(Dataset(**dataset),
                                                     tags=[InputTag("mlflow.data.context", rec["context"])])])
        elif "model" in rec:
            hub = exported_config(Path(rec["model"]))
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
            exp_id = mlflow_env.experiment_id(self.client, state["experiment"], self.uri)
            run_id = self.client.create_run(exp_id, run_name=state["run_name"] and text(state["run_name"]),
                                            start_time=self._first_timestamp()).info.run_id
        self.run_id, self._experiment_id, state["run_id"] = run_id, exp_id, run_id
        self._write_state(state)  # at once: a failure later must not create a second run
        self._start_system_metrics()

    def _start_system_metrics(self) -> None:
        if self._system_metrics and self._monitor is None and not self._finishing.is_set():
            self._monitor = mlflow_env.system_metrics(self.run_id, self.uri)

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
