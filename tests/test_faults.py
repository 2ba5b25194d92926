"""What survives what (docs/training.md): real trainer processes meet a second trainer, SIGTERM, Ctrl-C, a NaN, a full
disk, a planted pickle, unreadable checkpoints and a changed config. Each fault ends in one clear line and a run
directory that still resumes."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, finish, output, start_training, tiny_run, train

from pipeline import checkpoint


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, output(proc)[-3000:]
        assert time.time() < deadline, output(proc)[-3000:]
        time.sleep(0.05)


def mlflow_status(db: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("sovit").experiment_id])
    return run.info.status


def long_run(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return tiny_run(root, run_dir, 400, "schedule.epochs=40", *extra)


def test_a_second_trainer_is_refused_and_a_killed_ones_lock_is_not_stale(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    first = start_training(long_run(synthetic_root, run_dir), tmp_path, start_new_session=True)
    wait_for(lambda: (run_dir / "latest").exists(), first)
    out = train(long_run(synthetic_root, run_dir), tmp_path, returncode=2)
    assert f"error: {run_dir} is in use by another training process (host " in out
    assert f"pid {first.pid}" in out and "Traceback" not in out
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    resumed_at = int((run_dir / "latest").read_text()[-8:])
    out = train(tiny_run(synthetic_root, run_dir, resumed_at + 1, "schedule.epochs=40"), tmp_path)
    assert f"resuming at step {resumed_at}" in out


def test_sigterm_saves_the_next_step_and_ends_the_mlflow_run_killed(synthetic_root, tmp_path):
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    proc = start_training(long_run(synthetic_root, run_dir, "tracking.enabled=true", f"tracking.uri=sqlite:///{db}",
                                   "tracking.system_metrics=false"), tmp_path)
    wait_for(lambda: (run_dir / "latest").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, returncode=143)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["status"] == "KILLED" and final["signal"] == "SIGTERM"
    assert (run_dir / "latest").read_text() == f"step_{final['step']:08d}"  # the stop step itself was saved
    assert "Traceback" not in out
    assert mlflow_status(db) == "KILLED"


def test_ctrl_c_saves_and_prints_one_line_not_a_traceback(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_training(long_run(synthetic_root, run_dir), tmp_path)
    wait_for(lambda: (run_dir / "latest").exists(), proc)
    proc.send_signal(signal.SIGINT)
    out = finish(proc, returncode=130)
    assert "interrupted: saving at the next step check" in out and "Traceback" not in out
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert (run_dir / "latest").read_text() == f"step_{final['step']:08d}"


def test_a_nan_loss_exits_non_zero_and_fails_the_mlflow_run(synthetic_root, tmp_path):
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    out = train(tiny_run(synthetic_root, run_dir, 12, "optim.lr=1e30", "ema.enabled=false",
                         "tracking.enabled=true", f"tracking.uri=sqlite:///{db}",
                         "tracking.system_metrics=false"), tmp_path, returncode=1)
    assert "error: loss is nan at optimizer step" in out or "error: loss is inf at optimizer step" in out
    assert json.loads((run_dir / "final_metrics.json").read_text())["status"] == "FAILED"
    assert not (run_dir / "latest").exists()  # nothing NaN was saved as a checkpoint
    assert mlflow_status(db) == "FAILED"


def test_checkpoints_none_of_which_load_are_an_error_not_a_restart(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_run(synthetic_root, run_dir, 6), tmp_path)
    for tag in ("step_00000003", "step_00000006"):
        f = run_dir / tag / "mp_rank_00_model_states.pt"
        f.write_bytes(f.read_bytes()[:500])
    before = sorted(p.name for p in run_dir.iterdir())
    out = train(tiny_run(synthetic_root, run_dir, 9), tmp_path, returncode=2)
    line = next(x for x in out.splitlines() if x.startswith("error:"))
    assert f"{run_dir} holds checkpoints but none loads: step_00000006 (" in line and "step_00000003 (" in line
    assert sorted(p.name for p in run_dir.iterdir()) == before and (run_dir / "latest").read_text() == "step_00000006"


def test_a_corrupt_meta_json_falls_back_like_any_other_corruption(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_run(synthetic_root, run_dir, 6), tmp_path)
    (run_dir / "step_00000006" / "meta.json").write_text('{"world_size": ')
    out = train(tiny_run(synthetic_root, run_dir, 7), tmp_path)
    assert "step_00000006 is unreadable" in out and "meta.json is missing or corrupt" in out
    assert "resuming at step 3" in out


def test_a_corrupt_newest_checkpoint_is_trained_again_once_saved_again_and_logged_once(synthetic_root, tmp_path):
    """The fallback re-trains steps 10-12 and the eval at 12: step 12 is saved again (it used to keep its corrupt
    file, and every relaunch re-trained from 9), and the record, summary.csv and MLflow hold each step once."""
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"

    def args(steps: int) -> list[str]:
        return tiny_run(synthetic_root, run_dir, steps, "checkpoint.keep_last=5", "tracking.enabled=true",
                        f"tracking.uri=sqlite:///{db}", "tracking.system_metrics=false")

    train(args(12), tmp_path)
    corrupt = run_dir / "step_00000012" / "mp_rank_00_model_states.pt"
    corrupt.write_bytes(corrupt.read_bytes()[:1000])
    out = train(args(14), tmp_path)
    assert "step_00000012 set aside (unreadable); resuming from step_00000009" in out
    assert "step_00000012 saved again, replacing the copy that was set aside (unreadable when resuming:" in out
    assert (run_dir / "step_00000012" / "COMPLETE").exists() and (run_dir / "latest").read_text() == "step_00000014"
    checkpoint.check_safe(corrupt)  # readable again
    assert "resuming at step 14" in train(args(15), tmp_path)

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 16))
    assert [r["step"] for r in records if "val/top1" in r] == [12, 14, 15]
    with open(run_dir / "summary.csv") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["12", "14", "15"]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("sovit").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 16))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/top1")) == [12, 14, 15]


def test_after_a_nan_latest_and_the_message_name_the_last_checkpoint_followed_by_a_finite_loss(synthetic_root,
                                                                                               tmp_path):
    """lr 1e30: the loss is finite at steps 1 and 2 and NaN at 3. Step 2's weights (up to 1e26) fed that NaN loss:
    it is set aside, and step 1, whose weights gave the finite loss of step 2, is the last good checkpoint."""
    run_dir = tmp_path / "run"
    out = train(tiny_run(synthetic_root, run_dir, 12, "optim.lr=1e30", "ema.enabled=false", "train.log_every_steps=2",
                         "checkpoint.every_steps=1", "checkpoint.keep_last=5"), tmp_path, returncode=1)
    line = next(x for x in out.splitlines() if x.startswith("error:"))
    assert "loss is nan at optimizer step 3" in line and "the last good checkpoint is step_00000001" in line, line
    assert "step_00000002 set aside" in line and (run_dir / "latest").read_text() == "step_00000001"
    assert not (run_dir / "step_00000002" / "COMPLETE").exists()
    assert "loss is nan" in (run_dir / "step_00000002" / "SET_ASIDE").read_text()
    for tag, bound in (("step_00000001", 1e3), ("step_00000002", float("inf"))):
        states = checkpoint.safe_load(run_dir / tag / "mp_rank_00_model_states.pt")["module"]
        assert max(v.abs().max().item() for v in states.values() if v.is_floating_point()) < bound


def test_a_failed_start_leaves_the_run_directory_as_it_found_it(synthetic_root, tmp_path):
    """A bad data path (a new nested run directory) and a wrong class count (an existing empty one): exit 2, and
    neither directory holds anything afterwards, not even the run lock."""
    new_dir = tmp_path / "runs" / "a" / "run"
    out = train(tiny_run(synthetic_root, new_dir, 3, f"data.train={tmp_path / 'nothing'}"), tmp_path / "logs",
                returncode=2)
    assert "error: " in out and not (tmp_path / "runs").exists()
    existing = tmp_path / "empty"
    existing.mkdir()
    out = train(tiny_run(synthetic_root, existing, 3, "model.num_classes=5"), tmp_path / "logs", returncode=2)
    assert "error: " in out and list(existing.iterdir()) == []


def test_a_killed_lone_runs_file_store_is_removed_by_the_next_start(synthetic_root, tmp_path, monkeypatch):
    """One process rendezvouses through a file in the temporary directory; a kill -9 leaves it, the next lone
    start removes it (and its own at the end)."""
    store_dir = tmp_path / "tmp"
    store_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(store_dir))
    first = start_training(long_run(synthetic_root, tmp_path / "first"), tmp_path, start_new_session=True)
    wait_for(lambda: (tmp_path / "first" / "latest").exists(), first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    stale = list(store_dir.glob("sovit-store-*"))
    assert stale
    train(tiny_run(synthetic_root, tmp_path / "second", 1), tmp_path)
    assert list(store_dir.glob("sovit-store-*")) == []


def test_set_takes_paths_that_are_not_utf8(synthetic_root, tmp_path, monkeypatch):
    """Data and run directories whose names hold a Latin-1 byte, given with --set, in a locale whose stdout refuses
    undecodable text: training runs, prints the paths as their bytes, writes them into config.yaml, gives MLflow
    an escaped text, and evaluate.py reads the run back."""
    latin1 = os.fsdecode(b"\xe9t\xe9")  # what argv and listdir make of b"\xe9t\xe9"
    data, run_dir, db = tmp_path / f"data-{latin1}", tmp_path / f"run-{latin1}", tmp_path / "mlflow.db"
    shutil.copytree(synthetic_root, data)
    monkeypatch.setenv("PYTHONIOENCODING", "utf-8:strict")  # as in en_US.UTF-8; C.UTF-8 would let them through
    proc = start_training(tiny_run(data, run_dir, 3, "tracking.enabled=true", f"tracking.uri=sqlite:///{db}",
                                   "tracking.system_metrics=false"), tmp_path)
    proc.wait(timeout=300)
    printed = proc.log.read_bytes()
    assert proc.returncode == 0, printed[-3000:]
    assert b"run dir " + os.fsencode(run_dir) in printed and b"Traceback" not in printed
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("sovit").experiment_id])
    assert run.data.params["data.train"] == str(tmp_path / "data-\\xe9t\\xe9" / "train")
    out = subprocess.run([sys.executable, str(ROOT / "launchers" / "evaluate.py"), "--checkpoint", str(run_dir),
                          "--data", str(data / "val")], capture_output=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith(b"top-1 "), out.stderr[-3000:]


def test_a_planted_pickle_never_runs(synthetic_root, tmp_path):
    """A model-states file whose unpickling would create a marker file: resume refuses it, nothing executes."""
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    train(tiny_run(synthetic_root, run_dir, 3, "checkpoint.keep_last=1"), tmp_path)
    planted = run_dir / "step_00000003" / "mp_rank_00_model_states.pt"
    subprocess.run(["python3", "-c", f"""
import os, pickle, zipfile
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
with zipfile.ZipFile("{planted}", "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({{"module": Payload()}}, protocol=2))
    z.writestr("archive/version", "3\\n")
"""], check=True)
    out = train(tiny_run(synthetic_root, run_dir, 6), tmp_path, returncode=2)
    assert "holds foreign objects (posix.system)" in out or "holds foreign objects (os.system)" in out
    assert not marker.exists()


def test_a_finished_run_is_not_trained_again_and_keeps_its_result(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_run(synthetic_root, run_dir, 6), tmp_path)
    final = (run_dir / "final_metrics.json").read_bytes()
    stamp = (run_dir / "step_00000006" / "mp_rank_00_model_states.pt").stat().st_mtime_ns
    out = train(tiny_run(synthetic_root, run_dir, 6), tmp_path)
    assert f"{run_dir} already finished at step 6" in out
    assert (run_dir / "final_metrics.json").read_bytes() == final
    assert (run_dir / "step_00000006" / "mp_rank_00_model_states.pt").stat().st_mtime_ns == stamp


def test_resuming_with_another_arch_or_batch_is_refused_naming_the_differences(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_run(synthetic_root, run_dir, 3), tmp_path)
    out = train(tiny_run(synthetic_root, run_dir, 6, "model.arch=sovit_10", "train.global_batch_size=8"), tmp_path,
                returncode=2)
    assert "model.arch 'sovit_7' -> 'sovit_10'" in out and "train.global_batch_size 4 -> 8" in out
    assert not (run_dir / "step_00000006").exists()


def test_without_a_run_dir_each_run_gets_its_own(synthetic_root, tmp_path):
    args = tiny_run(synthetic_root, Path("unused"), 1)
    i = args.index("checkpoint.run_dir=unused")
    del args[i - 1:i + 1]
    for _ in range(2):
        proc = start_training(args, tmp_path / "logs", cwd=tmp_path)
        finish(proc)
        time.sleep(1.1)  # the default name has one-second resolution
    assert len(list((tmp_path / "runs").glob("sovit_7-*"))) == 2


def fill(disk: Path) -> None:
    """Leaves no byte free on ``disk``."""
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()


@pytest.mark.parametrize("write", ["checkpoint", "best weights", "record"])
def test_a_full_disk_is_one_line_with_the_real_free_space_and_a_failed_mlflow_run(write, small_disk, synthetic_root,
                                                                                   tmp_path):
    """Whatever write meets the full disk: one ``error:`` line naming the file and the free space df sees after
    exit, no traceback, no temporary file left, no torn record line, and the MLflow run (its store elsewhere)
    FAILED without a wait that blames MLflow."""
    run_dir, db = small_disk / "run", tmp_path / "mlflow.db"
    every = "3" if write == "checkpoint" else "100"  # else the first write too big for the disk is the eval's best
    proc = start_training(tiny_run(synthetic_root, run_dir, 12, "tracking.enabled=true", f"tracking.uri=sqlite:///{db}",
                                   "tracking.system_metrics=false", f"checkpoint.every_steps={every}"), tmp_path)
    t0 = time.time()
    if write == "record":
        wait_for(lambda: (run_dir / "metrics.jsonl").exists(), proc)
        fill(small_disk)
    out = finish(proc, returncode=2)
    lines = [x for x in out.splitlines() if "error:" in x]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out, out[-3000:]
    named = {"checkpoint": f"could not save checkpoint step_00000003 in {run_dir}:",
             "best weights": f"could not write {run_dir / 'best.safetensors'} (",
             "record": f"could not write {run_dir / 'metrics.jsonl'} ("}[write]
    assert named in lines[0], lines[0]
    free = float(re.search(r"([\d.]+) MiB free", lines[0]).group(1))
    assert abs(free - shutil.disk_usage(small_disk).free / 2**20) < 0.1, (lines[0], shutil.disk_usage(small_disk))
    assert not [p.name for p in run_dir.rglob("*") if p.name.endswith(".tmp")] and not list(run_dir.glob("step_*"))
    records = (run_dir / "metrics.jsonl").read_text()
    assert records.endswith("\n") and all(json.loads(x) for x in records.splitlines())
    assert mlflow_status(db) == "FAILED" and "unreachable" not in out and time.time() - t0 < 50


def test_a_lone_run_listens_on_no_port(synthetic_root, tmp_path):
    """One process needs no rendezvous server (a file store, removed at the end): nothing it starts may accept
    connections from the network. gloo's own pairs listen on the loopback."""
    import psutil

    proc = start_training(tiny_run(synthetic_root, tmp_path / "run", 6), tmp_path)
    listening, trained = set(), False
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            for p in (psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)):
                listening |= {c.laddr for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        trained = trained or (tmp_path / "run" / "latest").exists()
        time.sleep(0.1)
    finish(proc)
    assert trained and {a.ip for a in listening} <= {"127.0.0.1"}, listening
