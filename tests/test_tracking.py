"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (sqlite): contents, resume, a dying server, the
late delivery of what an outage held back, credentials, and two runs creating one sqlite store at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import timm
import torch
from mlflow import MlflowClient

from pipeline import export, tracking
from pipeline.config import load_config
from pipeline.distributed import free_port


def _start_server(db, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--default-artifact-root", str(db.parent / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job workers: starts sooner
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.3)
    _kill(proc)
    raise RuntimeError("mlflow server did not come up")


def _kill(server: subprocess.Popen) -> None:
    """The whole server: `mlflow server` is only a parent of uvicorn and the job consumers, which would otherwise
    keep serving the port (no outage at all) and outlive the test."""
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = _start_server(tmp_path / "mlflow.db", port)
    yield f"http://127.0.0.1:{port}", proc, tmp_path / "mlflow.db", port
    if proc.returncode is None:
        _kill(proc)


ROOT = Path(__file__).resolve().parent.parent


def _cfg(uri: str, run_dir: Path | None = None):
    return load_config(["arch/sovit_7"], [f"tracking.uri={uri}", "tracking.system_metrics=false",
                                          *([f"checkpoint.run_dir={run_dir}"] if run_dir else [])])


def _wait_for(check, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def _steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _sidecar(tmp_path: Path) -> Path:
    """What data_loaders.convert writes beside a .beton (only the fields tracking reads, and the class list)."""
    path = tmp_path / "train.beton.json"
    path.write_text(json.dumps({"format": "ffcv", "fields": {"image": "RGBImageField", "label": "IntField"},
                                "num_samples": 48, "num_classes": 4, "classes": ["a", "b", "c", "d"], "bytes": 999}))
    return path


def test_run_has_params_metrics_tags_dataset_best_and_resume_appends(mlflow_server, tmp_path, capfd, monkeypatch):
    """... and the best weights are an MLflow 3 logged model of the run (its Models tab): linked to the run and to
    its val metrics at the best step, and loadable through MLflow, with the outputs of the weights it was made of."""
    uri = mlflow_server[0]
    torch.manual_seed(0)
    best = timm.create_model("sovit_7", num_classes=4, img_size=32).eval()
    export.save_safetensors(best.state_dict(), load_config([], ["model.num_classes=4", "model.img_size=32",
                                                                "data.img_size=32"]), tmp_path / "best.safetensors")
    cfg = _cfg(uri.replace("http://", "http://alice:s3cretTOKEN@"), run_dir=tmp_path / "sovit7-demo")
    t = tracking.start(cfg, rank=0, world_size=8, tags={"extra": "yes"})
    _wait_for(lambda: t.run_id is not None)  # created at start, or by the thread if the loaded server was slow
    for step in (1, 2, 3):
        t.log_metrics({"train/loss": 1.0 / step}, step=step)
    (tmp_path / "config.yaml").write_text("x: 1\n")
    t.log_artifact(tmp_path / "config.yaml")
    t.log_dataset(_sidecar(tmp_path), context="train")
    t.log_metrics({"val/top1": 61.5, "val/loss": 0.9}, step=3)
    t.log_best(tmp_path / "best.safetensors", top1=61.5, step=3)
    t.finish("KILLED")  # a requeue
    run_id = t.run_id
    again = tracking.start(cfg, rank=0, run_id=run_id, world_size=4)
    again.log_metrics({"train/loss": 0.1}, step=4)
    again.finish()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "sovit7-demo"  # the run directory's name
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["model.arch"] == "sovit_7"
    assert run.data.tags["arch"] == "sovit_7" and run.data.tags["world_size"] == "4" and run.data.tags["extra"] == "yes"
    assert {"zero_stage", "precision", "loader"} <= run.data.tags.keys()
    assert _steps(client, run_id) == [1, 2, 3, 4]
    assert run.data.metrics["val/best_top1"] == 61.5
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
    [model] = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert model.name == "sovit_7" and model.source_run_id == run_id and str(model.status) == "READY"
    assert model.params["model.arch"] == "sovit_7"
    assert {(m.key, m.value, m.step) for m in model.metrics} == {("val/top1", 61.5, 3), ("val/loss", 0.9, 3),
                                                                ("val/best_top1", 61.5, 3)}
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, 3)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert np.array_equal(loaded.predict(x.numpy()), best(x).numpy())
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.name == "train.beton" and len(dataset.dataset.digest) == 16
    assert json.loads(dataset.dataset.source)["uri"] == str(tmp_path / "train.beton")
    assert json.loads(dataset.dataset.profile)["num_rows"] == 48
    assert [(tag.key, tag.value) for tag in dataset.tags] == [("mlflow.data.context", "train")]
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the resume appended, no second run
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.sovit-training"])  # the UI's shared view: metric columns
    assert "metrics.`val/top1`" in view["selectedColumns"]
    assert again.ui_link() == (f"{uri}/#/experiments/{exp.experiment_id}/runs"
                               "?workflowType=machine_learning&viewStateShareKey=sovit-training")
    assert run.data.params["tracking.uri"] == uri.replace("http://", "http://alice:***@")
    assert "s3cretTOKEN" not in "".join(capfd.readouterr())  # e.g. MLflow's own "View run at" line


def test_other_ranks_log_nothing():
    t = tracking.start(_cfg("http://127.0.0.1:9"), rank=1)
    assert t.run_id is None and type(t) is tracking.Tracker


def test_server_dying_mid_run_never_blocks_training_nor_shows_credentials(mlflow_server, capfd, caplog):
    uri, proc, *_ = mlflow_server
    secret_uri = uri.replace("http://", "http://alice:s3cretTOKEN@")  # the plain server ignores the credentials
    t = tracking.start(_cfg(secret_uri), rank=0)
    t.log_metrics({"train/loss": 1.0}, step=1)
    _wait_for(lambda: t.run_id is not None and _steps(MlflowClient(uri), t.run_id) == [1])
    _kill(proc)
    with pytest.raises(OSError):  # a real outage: nothing answers on the port any more
        urllib.request.urlopen(f"{uri}/health", timeout=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.time()
        for step in range(2, 200):
            t.log_metrics({"train/loss": 1.0}, step=step)
        assert time.time() - t0 < 1.0  # the training loop never waits on the network
        t0 = time.time()
        t.finish(timeout=5)
        assert time.time() - t0 < 10
    unreachable = [w for w in caught if "unreachable" in str(w.message)]
    assert 1 <= len(unreachable) <= 2  # one warning (plus finish's), not one per step
    out, err = capfd.readouterr()
    shown = [str(w.message) for w in caught] + [out, err, caplog.text, t.ui_link() or ""]
    assert not [text for text in shown if "s3cretTOKEN" in text]


def test_redact_hides_passwords_and_tokens():
    assert tracking.redact("http://user:TOKEN@host:5000") == "http://user:***@host:5000"
    assert tracking.redact("request to https://TOKEN@h/api failed") == "request to https://***@h/api failed"
    assert tracking.redact("postgresql://u:p%40ss@db/mlflow and http://h:5000") == \
        "postgresql://u:***@db/mlflow and http://h:5000"
    assert tracking.redact("sqlite:////data/mlflow.db") == "sqlite:////data/mlflow.db"


def test_server_back_after_outage_receives_the_queued_metrics(mlflow_server):
    uri, proc, db, port = mlflow_server
    t = tracking.start(_cfg(uri), rank=0)
    _kill(proc)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{uri}/health", timeout=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, 6):
            t.log_metrics({"train/loss": float(step)}, step=step)
        time.sleep(2)
        server = _start_server(db, port)
        try:
            t.finish(timeout=60)
            steps = [m.step for m in MlflowClient(uri).get_metric_history(t.run_id, "train/loss")]
        finally:
            _kill(server)
    assert steps == [1, 2, 3, 4, 5]


def test_server_down_at_start_is_a_warning_not_an_error():
    with pytest.warns(UserWarning, match="unreachable"):
        t = tracking.start(_cfg(f"http://127.0.0.1:{free_port()}"), rank=0)
    t.log_metrics({"x": 1.0}, step=1)
    t.finish(timeout=3)
    assert t.run_id is None


def test_default_uri_is_mlflow_3s_sqlite_store(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["arch/sovit_7"])
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    relative = load_config(["arch/sovit_7"], ["tracking.uri=sqlite:///db/m.db"])
    assert tracking.tracking_uri(relative) == f"sqlite:///{tmp_path / 'db' / 'm.db'}"  # the same file from anywhere
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert tracking.tracking_uri(cfg) == "http://example.invalid:5000"


def test_outage_before_the_end_is_delivered_by_the_next_start_and_by_sync(mlflow_server, tmp_path):
    """A requeue story: the server dies before the end of each of two attempts; the resumed start delivers what
    the first left behind, the sync command what the second did. Every point arrives once, and the run ends
    FINISHED, though the server was down when training finished."""
    uri, proc, db, port = mlflow_server
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = run_dir / "metrics.jsonl"
    cfg = _cfg(uri, run_dir)
    client = MlflowClient(uri)

    def attempt(server, steps, status, run_id=None):
        t = tracking.start(cfg, rank=0, run_id=run_id, jsonl=record)
        for step in steps[:10]:
            t.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
        _wait_for(lambda: t.run_id is not None and _steps(client, t.run_id)[-1:] == [steps[9]])
        _kill(server)
        for step in steps[10:]:
            t.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
        t.log_artifact(run_dir / "config.yaml")
        with pytest.warns(UserWarning, match="sync_mlflow.py"):
            t.finish(status, timeout=2)
        return t.run_id

    (run_dir / "config.yaml").write_text("x: 1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_id = attempt(proc, range(1, 21), "KILLED")
        server = _start_server(db, port)
        assert attempt(server, range(21, 41), "FINISHED", run_id) == run_id
    server = _start_server(db, port)
    try:
        sync = [sys.executable, "launchers/sync_mlflow.py", str(run_dir)]
        first = subprocess.run(sync, cwd=ROOT, capture_output=True, text=True, timeout=120)
        second = subprocess.run(sync, cwd=ROOT, capture_output=True, text=True, timeout=120)
        run = client.get_run(run_id)
        assert first.returncode == 0, first.stderr
        assert "status FINISHED" in first.stdout and "delivered 0 record(s)" in second.stdout
        assert _steps(client, run_id) == _steps(client, run_id, "train/lr") == list(range(1, 41))
        assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] == 1.0 / 40
        assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
    finally:
        _kill(server)


def test_finish_waits_for_a_server_that_comes_back(mlflow_server):
    """The server is away when training finishes and back some seconds later: finish keeps trying (its backoff
    stays short) within its timeout, so the run still ends FINISHED."""
    uri, proc, db, port = mlflow_server
    t = tracking.start(_cfg(uri), rank=0)
    t.log_metrics({"train/loss": 1.0}, step=1)
    _wait_for(lambda: t.run_id is not None and _steps(MlflowClient(uri), t.run_id) == [1])
    _kill(proc)
    servers = []
    restart = threading.Timer(8.0, lambda: servers.append(_start_server(db, port)))
    restart.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.finish(timeout=120)
        restart.join()
        assert MlflowClient(uri).get_run(t.run_id).info.status == "FINISHED"
    finally:
        restart.join()
        for server in servers:
            _kill(server)


RACER = """
import sys, time
from pathlib import Path
import mlflow  # imported before the barrier, so the two runs meet at the store itself
from pipeline import tracking
from pipeline.config import load_config
from pipeline.distributed import free_port

db, run_dir, barrier, me = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
cfg = load_config(["arch/sovit_7"], [f"tracking.uri=sqlite:///{db}", "tracking.system_metrics=false",
                                     f"checkpoint.run_dir={run_dir}"])
run_dir.mkdir()
(barrier / me).touch()
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.005)
t = tracking.start(cfg, 0, jsonl=run_dir / "metrics.jsonl")
print(t.run_id)
t.log_metrics({"train/loss": 1.0}, step=1)
(run_dir / "config.yaml").write_text("x: 1")
t.log_artifact(run_dir / "config.yaml")
t.finish()
"""


def test_two_runs_creating_a_fresh_sqlite_store_at_once(tmp_path):
    """Both runs start together on a store that does not exist yet, from a working directory that is not the
    store's: both create their run at once, print no MLflow/alembic INFO lines and no warning, and their artifacts
    land beside the store (not in ./mlruns)."""
    cwd, barrier, db = tmp_path / "cwd", tmp_path / "barrier", tmp_path / "store" / "mlflow.db"
    for d in (cwd, barrier, db.parent):
        d.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(db), str(tmp_path / f"run{i}"), str(barrier), str(i)],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0 and out.strip() not in ("", "None"), err
        assert "INFO" not in err and "Warning" not in err, err
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("sovit").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1"]
    assert sorted(r.info.run_id for r in runs) == sorted(out.strip() for out, _ in results)
    for r in runs:
        assert r.info.artifact_uri == str(db.parent / "mlartifacts" / r.info.run_id / "artifacts")
        assert (Path(r.info.artifact_uri) / "config.yaml").is_file()
    assert not (cwd / "mlruns").exists()


def test_sync_stops_at_a_torn_last_line(tmp_path):
    """A kill -9 mid-append can leave half a line at the end of the record: sync delivers everything before it and
    returns (it used to spin on it forever)."""
    db, run_dir = tmp_path / "mlflow.db", tmp_path / "run"
    run_dir.mkdir()
    tracker = tracking.start(_cfg(f"sqlite:///{db}", run_dir), rank=0, jsonl=run_dir / "metrics.jsonl")
    for step in range(3):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    tracker.finish("FINISHED")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/lo')
    code = f"from pipeline import tracking; print(tracking.sync({str(run_dir / 'metrics.jsonl')!r}).status)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "FINISHED", out.stderr[-2000:]
    from mlflow import MlflowClient

    history = MlflowClient(f"sqlite:///{db}").get_metric_history(tracker.run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 1, 2]


def test_dataset_version_is_the_data_not_the_conversion_run(synthetic_root, tmp_path):
    """Converting one folder again, with another worker count, writes the same .beton bytes; only the sidecar's
    timings and speed settings differ. MLflow must see one dataset version (a new one was logged before); a
    conversion that stores other data is another version."""
    from data_loaders import sidecar_path
    from data_loaders.convert import ConvertOptions, convert

    def convert_and_log(name: str, **options) -> tuple[bytes, bytes, str]:
        beton = tmp_path / name / "val.beton"
        convert(synthetic_root / "val", beton, options=ConvertOptions(**options), progress=False)
        tracker = tracking.JsonlTracker(tmp_path / name / "metrics.jsonl")
        tracker.log_dataset(beton, context="val")
        [record] = (json.loads(line) for line in tracker.path.read_text().splitlines())
        return beton.read_bytes(), sidecar_path(beton).read_bytes(), record["dataset"]["digest"]

    beton, sidecar, digest = convert_and_log("first", max_resolution=64, workers=1)
    beton_again, sidecar_again, digest_again = convert_and_log("again", max_resolution=64, workers=2)
    assert beton_again == beton and sidecar_again != sidecar
    assert digest_again == digest and len(digest) == 16
    assert convert_and_log("smaller", max_resolution=32, workers=1)[2] != digest
