"""launchers/submit.py without a cluster: the dry-run script agrees with slurm/sovit.sbatch, every bad argument is one
clear line, a machine without (a configured) SLURM gets told what to do, --local ranks listen on the loopback only
and a failing rank is one line, and (slow) the embedded demo learns."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.distributed import free_port
from pipeline.slurm import parse_time

ROOT = Path(__file__).resolve().parent.parent
SUBMIT = ROOT / "launchers" / "submit.py"
BIN = Path(sys.executable).parent
RESOURCE_FLAGS = ("job-name", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time", "signal")
# So-ViT-7 at 32 px on the 4-class test set, 2 CPU ranks, 2 steps
TINY_LOCAL = ["--local", "--arch", "7", "--config", "demo", "--gpus-per-node", "2", "--cpus-per-task", "1",
              "--set", "model.num_classes=4", "--set", "train.global_batch_size=8", "--set", "data.micro_batch_size=4",
              "--set", "data.workers=1", "--set", "tracking.system_metrics=false", "--set", "train.max_steps=2"]


def run_submit(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 120):
    return subprocess.run([sys.executable, str(SUBMIT), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def sbatch_flags(script: str) -> dict[str, str]:
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script, flags=re.M))
    flags["time"] = str(parse_time(flags["time"]))  # 72:00:00 and 4320 are the same limit
    return flags


def fake_betons(root: Path, classes: int = 1000) -> Path:
    """Dry runs read the sidecars' class lists, not the .beton files."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (root / f"{split}.beton").write_bytes(b"")
        (root / f"{split}.beton.json").write_text(json.dumps({"classes": [f"n{i:05d}" for i in range(classes)],
                                                              "num_samples": 1}))
    return root


@pytest.fixture(scope="module")
def fake_dataset(tmp_path_factory) -> Path:
    return fake_betons(tmp_path_factory.mktemp("imagenet"))


def test_dry_run_for_arch19_on_4_nodes_agrees_with_the_sbatch_template(fake_dataset, tmp_path):
    r = run_submit("--arch", "19", "--nodes", "4", "--cpus-per-task", "10", "--data", str(fake_dataset), "--dry-run",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    script = out[out.index("#!/bin/bash"):out.index("# per-GPU memory")]
    template = (ROOT / "slurm" / "sovit.sbatch").read_text()

    generated, plain = sbatch_flags(script), sbatch_flags(template)
    assert {k: generated.get(k) for k in RESOURCE_FLAGS} == {k: plain.get(k) for k in RESOURCE_FLAGS}
    assert generated["nodes"] == "4" and generated["ntasks-per-node"] == generated["gpus-per-node"] == "8"
    # both start one srun step whose tasks are the ranks; the plain template runs the per-rank entry directly
    assert re.search(r"^srun .* -m submitit\.core\._submit ", script, flags=re.M)
    assert re.search(r"^srun .*launchers/train\.py", template, flags=re.M)
    assert "SUBMITIT_PREEMPT_SIGNAL=USR1" in script and "--requeue" in template

    assert "model:\n  arch: sovit_19" in out  # the resolved config
    assert f"train: {fake_dataset}/train.beton" in out
    m = re.search(r"#   total\s+([\d.]+) GiB", out)
    assert "ESTIMATE" in out and "ZeRO stage 0, world 32" in out and m and 0.5 < float(m.group(1)) < 80


def test_dry_run_memory_estimate_shrinks_with_zero_stage(fake_dataset, tmp_path):
    states = []
    for stage in (0, 3):
        r = run_submit("--arch", "19", "--nodes", "2", "--cpus-per-task", "10", "--data", str(fake_dataset),
                       "--dry-run", "--set", f"train.zero_stage={stage}", "--set", "ema.enabled=false", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        states.append(float(re.search(r"#   model states\s+([\d.]+) GiB", r.stdout).group(1)))
    assert states[1] < states[0] / 8  # stage 3 partitions weights, gradients and AdamW moments over 16 ranks


@pytest.mark.parametrize("args, names", [
    (["--arch", "12"], "--arch '12'"),
    (["--arch", "7", "--nodes", "0"], "--nodes 0"),
    (["--arch", "7", "--gpus-per-node", "0"], "--gpus-per-node 0"),
    (["--arch", "7", "--cpus-per-task", "0"], "--cpus-per-task 0"),
    (["--arch", "7", "--data", "/no/such/dir"], "--data /no/such/dir"),
    (["--arch", "7"], "no training data"),
    (["--arch", "7", "--time", "soon"], "--time 'soon'"),
    (["--arch", "7", "--signal", "TERM@60"], "--signal 'TERM@60'"),
    (["--arch", "7", "--time", "1", "--signal", "USR1@120"], "--signal USR1@120"),
    (["--arch", "7", "--mem", "lots"], "--mem lots"),
    (["--arch", "7", "--set", "optim.lr=-1"], "optim.lr=-1"),
    (["--arch", "7", "--set", "optim.nope=1"], "optim.nope"),
    (["--arch", "19", "--nodes", "3"], "train.global_batch_size=1024"),  # 1024 over 24 ranks x 32 does not divide
    (["--local", "--nodes", "2"], "--nodes 2 with --local"),
    (["--dry-run"], "no model chosen"),
    # what is written into the sbatch script: a newline there would start a command of its own
    (["--arch", "7", "--job-name", "x\nrm -rf ~"], "--job-name 'x\\nrm -rf ~'"),
    (["--arch", "7", "--partition", "gpu\n#SBATCH --uid=0"], "--partition 'gpu\\n#SBATCH --uid=0'"),
    (["--arch", "7", "--log-dir", "logs\r"], "--log-dir 'logs\\r'"),
    # the sidecars list 1000 classes
    (["--arch", "7", "--set", "model.num_classes=10"], "1000 classes but model.num_classes=10"),
])
def test_bad_arguments_are_one_clear_line(args, names, fake_dataset, tmp_path):
    if "--data" not in args and "no training data" not in names and "--local" not in args:
        args = [*args, "--data", str(fake_dataset)]
    r = run_submit(*args, "--dry-run", cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("submit.py: error: ") and names in lines[0], r.stderr
    assert not list(tmp_path.iterdir())  # nothing written, nothing submitted


@pytest.mark.parametrize("loader", ["ffcv", "torchvision"])
def test_class_count_comes_from_the_data(loader, tmp_path):
    """The README's dry run on a dataset of 4 classes needs no model.num_classes: the .beton sidecars, or the
    ImageFolder's class directories, say it. An explicit count that disagrees is an error."""
    if loader == "ffcv":
        data = fake_betons(tmp_path / "data", classes=4)
    else:
        data = tmp_path / "data"
        for split in ("train", "val"):
            for c in range(4):
                (data / split / f"n{c:05d}").mkdir(parents=True)
    r = run_submit("--arch", "7", "--data", str(data), "--loader", loader, "--dry-run", cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "model:\n  arch: sovit_7\n  img_size: 224\n  num_classes: 4\n" in r.stdout
    r = run_submit("--arch", "7", "--data", str(data), "--loader", loader, "--dry-run", "--set",
                   "model.num_classes=10", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "has 4 classes but model.num_classes=10" in r.stderr, r.stderr


@pytest.mark.parametrize("name", ["submit", "train", "evaluate", "export", "sync_mlflow"])
def test_help_is_the_whole_docstring_in_plain_text(name, capsys):
    """``--help`` shows every line of the launcher's docstring (submit.py's stopped mid-sentence), without the
    docstring's double backticks, and no "(default: None)" beside options whose help explains their default."""
    import importlib

    module = importlib.import_module(f"launchers.{name}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "``" not in out and "(default: None)" not in out
    missing = [line for line in module.__doc__.replace("``", "").strip().splitlines() if line not in out]
    assert missing == []


def test_val_classes_must_match_the_train_sidecar(tmp_path):
    data = fake_betons(tmp_path / "data")
    (data / "val.beton.json").write_text(json.dumps({"classes": ["n00000", "n99999"], "num_samples": 1}))
    r = run_submit("--arch", "7", "--data", str(data), "--dry-run", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "val.beton has class 'n99999' at index 1" in r.stderr, r.stderr


def test_without_sbatch_says_how_to_run_locally(fake_dataset, tmp_path):
    env = {**os.environ, "PATH": str(BIN)}  # the venv only: no sbatch, no srun
    r = run_submit("--arch", "7", "--data", str(fake_dataset), cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and "sbatch" in line and "--local" in line and "start.sh" in line


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs sbatch on PATH (apt-get install slurm-wlm)")
def test_sbatch_without_a_slurm_configuration_is_one_line(fake_dataset, tmp_path):
    """sbatch exists, its slurm.conf does not: SLURM would retry for 60 s, then submitit raise a traceback."""
    env = {**os.environ, "SLURM_CONF": str(tmp_path / "missing" / "slurm.conf")}
    t0 = time.time()
    r = run_submit("--arch", "7", "--data", str(fake_dataset), "--cpu", cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "SLURM is not reachable" in lines[0] and "SLURM_CONF" in lines[0], r.stderr
    assert time.time() - t0 < 45


def test_console_entry_point_runs_the_launcher(fake_dataset, tmp_path):
    """setup.sh installs the package (pip install -e .), which puts sovit-* beside the venv's python."""
    for name in ("sovit-train", "sovit-evaluate", "sovit-export"):
        assert (BIN / name).is_file(), f"{name} missing: reinstall with .venv/bin/pip install --no-deps -e ."
    r = subprocess.run([BIN / "sovit-submit", "--arch", "7", "--data", str(fake_dataset), "--local", "--dry-run"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "model:\n  arch: sovit_7" in r.stdout, r.stderr


@pytest.mark.multiproc
def test_local_run_listens_on_the_loopback_only(synthetic_betons, tmp_path):
    """Two local CPU ranks: the rendezvous store and gloo bind 127.0.0.1, never every interface; the hint names an
    mlflow that exists and opens the run's experiment in the training view."""
    proc = subprocess.Popen([sys.executable, str(SUBMIT), *TINY_LOCAL, "--data", str(synthetic_betons["train"].parent),
                             "--run-dir", "run"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    listening = set()
    while proc.poll() is None:
        try:
            procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            for p in procs:
                listening |= {(c.laddr.ip, p.pid) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass  # a process ended while we looked
        time.sleep(0.2)
    out, err = proc.communicate()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert len({pid for _, pid in listening}) >= 2, listening  # the launcher's store and the ranks' gloo
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["step"] == 2
    hint = re.search(r"^watch: (\S+) ui --backend-store-uri sqlite:///(\S+), then open (\S+)$", out, flags=re.M)
    assert hint and (tmp_path / hint.group(1)).resolve().is_file() and Path(hint.group(2)).is_file(), out
    # the run's experiment in MLflow's training view; no printed link leads to the GenAI home
    assert re.fullmatch(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs\?workflowType=machine_learning&.*",
                        hint.group(3)), hint.group(3)
    links = [line for line in out.splitlines() if "127.0.0.1:5000" in line]
    assert len(links) >= 2 and all("workflowType=machine_learning" in line for line in links), links


@pytest.mark.multiproc
def test_a_failing_local_rank_is_one_line(synthetic_betons, tmp_path):
    """A .beton whose sidecar is fine but whose data is not: the ranks fail, the user reads one line and a path."""
    data = tmp_path / "data"
    data.mkdir()
    for f in synthetic_betons["train"].parent.iterdir():
        shutil.copy(f, data / f.name)
    (data / "train.beton").write_bytes(b"\0" * 4096)
    r = run_submit(*TINY_LOCAL, "--data", str(data), cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    m = re.fullmatch(r"submit\.py: error: rank (\d) failed: DataError: (.+) \(its log and traceback: (\S+)\)",
                     lines[0])
    assert m and "train.beton is not a readable .beton" in m.group(2), lines[0]
    assert (Path(tmp_path, m.group(3)) / "error.json").is_file()


@pytest.mark.multiproc
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_signal_to_the_local_launcher_ends_its_ranks_as_under_the_plain_launcher(sig, synthetic_betons, tmp_path):
    """The one-machine command (README) is the project's launcher because torchrun cannot do this: SIGTERM exits
    143 (as launchers/train.py does) after the ranks saved, with one line of the launcher's own, no traceback and
    no 30 s wait for torch's shutdown timeout; a kill -9 of the launcher stops its ranks too. (SIGINT takes the
    same path to 130; each such run costs a minute of CI.)"""
    run_dir, log, data = tmp_path / "run", tmp_path / "launcher.log", synthetic_betons["train"].parent
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(SUBMIT), *TINY_LOCAL, "--data", str(data), "--run-dir", "run",
                                 "--set", "train.max_steps=2000", "--set", "schedule.epochs=400",
                                 "--set", "checkpoint.every_steps=2", "--set", "train.stop_check_every_steps=1"],
                                cwd=tmp_path, stdout=out, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    ranks = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    t0 = time.time()
    proc.send_signal(sig)
    if sig == signal.SIGKILL:
        proc.wait()
        _, alive = psutil.wait_procs(ranks, timeout=120)
        assert alive == [], alive
    else:
        err = proc.communicate(timeout=120)[1]
        lines = [line for line in err.splitlines() if line.startswith("submit.py:")]
        assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], err[-3000:]
        assert len(lines) == 1 and time.time() - t0 < 30, (lines, time.time() - t0)
        assert "Traceback" not in err + log.read_text() and "death signal" not in err
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["status"] == "KILLED" and (run_dir / "latest").read_text() == f"step_{final['step']:08d}"


@pytest.mark.multiproc
def test_no_output_of_a_local_run_or_a_dry_run_holds_the_tracking_credentials(synthetic_betons, tmp_path):
    """--mlflow-uri http://alice:SECRET@server: a 2-rank local run logs to a real MLflow server, and neither what
    submit.py prints (the summary, the watch line, a dry run's config and sbatch script) nor any file it, the ranks
    or the server write holds SECRET."""
    from test_tracking import _kill, _start_server

    secret, port = "PLANTED-s3cr3t", free_port()
    (tmp_path / "server").mkdir()
    server = _start_server(tmp_path / "server" / "mlflow.db", port)
    try:
        uri = f"http://alice:{secret}@127.0.0.1:{port}"
        local = run_submit(*TINY_LOCAL, "--data", str(synthetic_betons["train"].parent), "--run-dir", "run",
                           "--mlflow-uri", uri, cwd=tmp_path, timeout=300)
        dry = run_submit("--arch", "7", "--data", str(fake_betons(tmp_path / "fake")), "--mlflow-uri", uri,
                         "--dry-run", cwd=tmp_path, timeout=60)
    finally:
        _kill(server)
    assert local.returncode == 0 and dry.returncode == 0, local.stderr[-3000:] + dry.stderr[-3000:]
    assert f"watch: http://127.0.0.1:{port}" in local.stdout and "uri: http://alice:***@127.0.0.1" in dry.stdout
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("sovit-demo").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["tracking.uri"] == uri.replace(secret, "***")
    printed = local.stdout + local.stderr + dry.stdout + dry.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert secret not in printed and written == []


@pytest.mark.slow
def test_embedded_demo_reaches_60_percent_top1(tmp_path):
    """The README's first command, as a user runs it: generate, convert, train 2 ranks, evaluate, log."""
    r = run_submit("--local", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(r"^done in \d+ s on 2 local ranks: validation top-1 ([\d.]+)%", r.stdout, flags=re.M)
    assert m and float(m.group(1)) >= 60.0, r.stdout[-2000:]
    assert (tmp_path / "data" / "synthetic" / "train.beton").is_file() and (tmp_path / "mlflow.db").is_file()
    assert "mlflow ui" in r.stdout
    [run_dir] = (tmp_path / "runs").iterdir()  # one name for the demo's run directory, in the docs as on disk
    assert re.fullmatch(r"sovit_7-\d{8}-\d{6}", run_dir.name), run_dir
    assert all("runs/sovit_7-" in (ROOT / doc).read_text() for doc in ("configs/demo.yaml", "docs/tracking.md"))
