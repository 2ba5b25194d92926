"""The record: what rank 0's tracker writes. Every call (metrics, tags, status, artifacts, datasets, the logged
model) is appended to ``RUN_DIR/metrics.jsonl`` first, readable with no server at all, and the courier
(``pipeline.courier``) delivers it to MLflow from there; ``summary.csv`` holds one row per evaluation, as timm's
train.py writes it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import time
import warnings
from pathlib import Path
from typing import Any

from data_loaders import sidecar_path

from . import files
from .courier import MlflowCourier
from .mlflow_env import redact

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


def append_summary(path: Path, epoch: int, step: int, results: dict[str, float]) -> None:
    """One row per evaluation in ``summary.csv`` (as timm's train.py writes), readable without MLflow. A step that
    has its row already (a resumed run replaying the steps after its checkpoint) keeps the first one."""
    row = {"epoch": epoch, "step": step, **{f"val_{k}": v for k, v in results.items()}}
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            if any(r.get("step") == str(step) for r in csv.DictReader(f)):
                return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(row))
    if new:
        writer.writeheader()
    writer.writerow(row)
    files.append(path, text.getvalue())
