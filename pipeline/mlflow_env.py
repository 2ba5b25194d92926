"""MLflow's side of tracking: its process settings, the tracking URI (and the credentials it may carry), the links
that open MLflow's training view, experiments, system metrics and the run's logged model. ``pipeline.courier``
delivers the record through these; nothing here runs on the training loop's thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .config import ConfigError, RunConfig
from .runtime import command

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
    db = sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db is not None and not db.is_absolute() else uri


def hide_credentials(uri: str) -> str:
    """A launcher's URI with credentials moves to ``$MLFLOW_TRACKING_URI`` (which the ranks and SLURM jobs inherit)
    and the config keeps it redacted, so no config dump, submitit pickle or sbatch script on disk holds a secret."""
    if redact(uri) == uri:
        return uri
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return redact(uri)


def sqlite_path(uri: str) -> Path | None:
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




def text(value: str) -> str:
    """MLflow stores text: a path's bytes that are not UTF-8 (surrogates in Python) are written as ``\\xe9``."""
    return os.fsencode(value).decode(errors="backslashreplace")



def store_lock(uri: str):
    """A fresh sqlite store is created (alembic migrations) by the first client of each process; two runs doing that
    at once crash one of them, so they take turns on a lock file beside the database."""
    from filelock import FileLock

    db = sqlite_path(uri)
    if db is None:
        return contextlib.nullcontext()
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(db.with_name(db.name + ".lock"))


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, made if missing; it gets the training-view tags it lacks (also one made before they
    existed)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        db = sqlite_path(uri)  # artifacts next to the store, not in ./mlruns of the working directory
        location = str(db.resolve().parent / "mlartifacts") if db is not None else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException as e:  # another run created it meanwhile
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    for key, value in EXPERIMENT_TAGS.items():
        if key not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def system_metrics(run_id: str, uri: str):
    """MLflow's monitor of this machine (CPU, memory, GPU) logging into ``run_id``, started; None, with a warning,
    where it cannot run: the run's own metrics flow all the same."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True, tracking_uri=uri)
        monitor.start()
    except Exception as e:  # psutil/pynvml missing or the monitor refused
        warnings.warn(f"MLflow system metrics are off: {redact(str(e))}", stacklevel=2)
        return None
    return monitor


def exported_config(weights: Path) -> dict[str, Any] | None:
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




def refused(e: Exception) -> bool:
    """MLflow answered, and retrying the same request cannot help (bad value, unknown run, changed param). Not so
    for a refused login (401/403: a token to renew), a timeout (408) or throttling (429): those are retried."""
    from mlflow.exceptions import MlflowException

    code = e.get_http_status_code() if isinstance(e, MlflowException) else 0
    return 400 <= code < 500 and code not in (401, 403, 408, 429)


