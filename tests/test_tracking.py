"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (sqlite): contents, resume, and a dying server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings

import pytest
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.config import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(db, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--default-artifact-root", str(db.parent / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
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
    port = _free_port()
    proc = _start_server(tmp_path / "mlflow.db", port)
    yield f"http://127.0.0.1:{port}", proc, tmp_path / "mlflow.db", port
    if proc.returncode is None:
        _kill(proc)


def _cfg(uri: str):
    return load_config(["arch/sovit_7"], [f"tracking.uri={uri}", "tracking.system_metrics=false"])


def test_run_has_params_metrics_tags_and_resume_appends(mlflow_server, tmp_path):
    uri = mlflow_server[0]
    cfg = _cfg(uri)
    t = tracking.start(cfg, rank=0, world_size=8, tags={"extra": "yes"})
    deadline = time.time() + 60  # created at start, or by the background thread if the loaded server was slow
    while t.run_id is None and time.time() < deadline:
        time.sleep(0.2)
    assert t.run_id is not None
    for step in (1, 2, 3):
        t.log_metrics({"train/loss": 1.0 / step}, step=step)
    (tmp_path / "config.yaml").write_text("x: 1\n")
    t.log_artifact(tmp_path / "config.yaml")
    t.finish("KILLED")  # a requeue
    run_id = t.run_id
    again = tracking.start(cfg, rank=0, run_id=run_id, world_size=4)
    again.log_metrics({"train/loss": 0.1}, step=4)
    again.finish()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["model.arch"] == "sovit_7"
    assert run.data.tags["arch"] == "sovit_7" and run.data.tags["world_size"] == "4" and run.data.tags["extra"] == "yes"
    assert {"zero_stage", "precision", "loader"} <= run.data.tags.keys()
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the resume appended, no second run


def test_other_ranks_log_nothing():
    t = tracking.start(_cfg("http://127.0.0.1:9"), rank=1)
    assert t.run_id is None and type(t) is tracking.Tracker


def test_server_dying_mid_run_never_blocks_training(mlflow_server):
    uri, proc, *_ = mlflow_server
    t = tracking.start(_cfg(uri), rank=0)
    t.log_metrics({"train/loss": 1.0}, step=1)
    time.sleep(1)
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
    assert len(unreachable) <= 2  # one warning (plus finish's), not one per step


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
        t = tracking.start(_cfg(f"http://127.0.0.1:{_free_port()}"), rank=0)
    t.log_metrics({"x": 1.0}, step=1)
    t.finish(timeout=3)
    assert t.run_id is None


def test_default_uri_is_mlflow_3s_sqlite_store(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["arch/sovit_7"])
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert tracking.tracking_uri(cfg) == "http://example.invalid:5000"
