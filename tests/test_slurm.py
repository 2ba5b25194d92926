"""launchers/submit.py against a real SLURM: two nodes in network namespaces (slurm/local-cluster/start.sh --netns 2),
and beside it the one-node cluster a workstation user starts (start.sh without flags).

Nothing is faked: slurmctld schedules, srun starts one rank per node, gloo talks over the namespaces' bridge, and
the requeue test lets a real SLURM time limit send the warning signal. The cluster has no accounting, so job
states come from `scontrol show job` (kept for MinJobAge=600 s), not from sacct / submitit's job.state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "slurm" / "local-cluster"
pytestmark = pytest.mark.slurm

# So-ViT-7 at 32 px on the 4-class test set: 48 train images over 2 ranks, micro-batch 4 -> 3 steps per epoch.
TINY_RUN = ["--arch", "7", "--config", "demo", "--cpu",
            "--set", "model.num_classes=4", "--set", "train.global_batch_size=8", "--set", "data.micro_batch_size=4",
            "--set", "data.workers=1", "--set", "tracking.system_metrics=false",
            "--set", "train.eval_every_epochs=1000", "--set", "schedule.epochs=1000"]
TWO_NODES = ["--nodes", "2", "--gpus-per-node", "1", "--interface", "sovit0"]
TINY = [*TINY_RUN, *TWO_NODES, "--cpus-per-task", "1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0 or not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "ip", "nsenter")):
        pytest.skip("needs root, slurm-wlm, munge and iproute2 (apt-get install slurm-wlm munge iproute2)")
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "SOVIT_SLURM_DIR": str(state)}
    out = subprocess.run([CLUSTER / "start.sh", "--netns", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    env["SLURM_CONF"] = re.search(r"SLURM_CONF=(\S+)", out.stdout).group(1)
    yield env
    subprocess.run([CLUSTER / "stop.sh"], env=env, capture_output=True, timeout=120)


def submit(env: dict, workdir: Path, *args: str) -> str:
    return submit_and_print(env, workdir, *args)[0]


def submit_and_print(env: dict, workdir: Path, *args: str) -> tuple[str, str]:
    """(job id, what submit.py printed)."""
    r = run_submit(env, workdir, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return re.search(r"submitted job (\d+)", r.stdout).group(1), r.stdout


def run_submit(env: dict, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launchers" / "submit.py"), *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120)


def job_info(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(predicate, timeout: float, what: str, env: dict, job: str, logs: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        state = job_info(env, job).get("JobState")
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(1)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(logs.rglob("*_log.*")))
    pytest.fail(f"{what}: not reached (job {job}: {job_info(env, job)})\n{tails}")


def mlflow_runs(db: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def test_two_nodes_train_one_run(cluster, synthetic_betons, tmp_path):
    data = synthetic_betons["train"].parent
    args = [*TINY, "--data", str(data), "--run-dir", "run", "--log-dir", "logs", "--time", "10",
            "--set", "train.max_steps=4", "--set", "tracking.experiment=two-nodes"]
    dry = run_submit(cluster, tmp_path, *args, "--dry-run")
    job, printed = submit_and_print(cluster, tmp_path, *args)
    info = lambda: job_info(cluster, job)
    wait_for(lambda: info().get("JobState") == "COMPLETED", 300, "job COMPLETED", cluster, job, tmp_path / "logs")

    # what was submitted is exactly what --dry-run printed
    submitted = (tmp_path / "logs" / job / f"{job}_submission.sh").read_text()
    assert submitted.strip() in dry.stdout
    assert info()["NumNodes"] == "2" and info()["NodeList"] == "node[1-2]"
    logs = {t: (tmp_path / "logs" / job / f"{job}_{t}_log.out").read_text() for t in (0, 1)}
    assert "starting: sovit_7, 2 rank(s) on cpu (gloo)" in logs[0]
    run = tmp_path / "run"
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["status"] == "FINISHED" and final["step"] == 4 and final["world_size"] == 2
    assert (run / "latest").is_file()
    _, runs = mlflow_runs(tmp_path / "mlflow.db", "two-nodes")
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2" and runs[0].data.tags["slurm_job_id"] == job
    # the printed hints: the file to tail holds rank 0's progress bar, the mlflow named is an executable
    assert "4/4" in Path(re.search(r"tail -f (\S+)", printed).group(1)).read_text()
    assert os.access(re.search(r"^\s+(\S+) ui --backend-store-uri", printed, flags=re.M).group(1), os.X_OK)


def test_a_submission_prints_and_writes_no_tracking_credentials(cluster, synthetic_betons, tmp_path):
    """The secret of --mlflow-uri travels in the job's environment (sbatch exports it): not in what submit.py
    prints, nor in the sbatch script and submitit's pickles in the log folder, nor in what the job writes."""
    secret = "PLANTED-s3cr3t"
    job, printed = submit_and_print(cluster, tmp_path, *TINY, "--data", str(synthetic_betons["train"].parent),
                                    "--run-dir", "run", "--log-dir", "logs", "--time", "10",
                                    "--set", "train.max_steps=1", "--mlflow-uri", f"http://alice:{secret}@127.0.0.1:9")
    subprocess.run(["scancel", job], env=cluster, capture_output=True, timeout=60)
    assert secret not in printed and "http://127.0.0.1:9" in printed
    submitted = [p for p in (tmp_path / "logs").rglob("*") if p.is_file()]
    assert any(p.name.endswith("_submitted.pkl") for p in submitted), submitted
    assert [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()] == []


def test_tasks_are_sized_from_the_nodes(cluster, synthetic_betons, tmp_path):
    """--cpus-per-task comes from sinfo (the nodes' CPUs over their ranks); what no node has is refused, and so
    is a GPU request on nodes without GPUs: SLURM would leave either job pending forever."""
    cpus = os.cpu_count()  # start.sh gives every node all of this machine's CPUs
    args = [*TINY_RUN, *TWO_NODES, "--data", str(synthetic_betons["train"].parent), "--dry-run"]
    r = run_submit(cluster, tmp_path, *args)
    assert r.returncode == 0 and f"#SBATCH --cpus-per-task={cpus}\n" in r.stdout, r.stderr
    for bad, names in ((["--cpus-per-task", str(cpus + 1)], f"at most {cpus}"),
                       (["--partition", "nosuch"], "--partition nosuch")):
        r = run_submit(cluster, tmp_path, *args, *bad)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and names in r.stderr, r.stderr
    r = run_submit(cluster, tmp_path, *[a for a in args if a not in ("--cpu", "--dry-run")])
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "has no GPUs" in r.stderr, r.stderr


def test_one_node_cluster_runs_a_job_and_stops_alone(cluster, synthetic_betons, tmp_path, tmp_path_factory):
    """start.sh without --netns, as on a workstation, beside the two-node cluster: a 2-rank job finds its master
    (the node's name resolves), and this cluster's stop.sh leaves the other cluster's namespaces alone."""
    env = {**os.environ, "SOVIT_SLURM_DIR": str(tmp_path_factory.mktemp("one-node")), "SOVIT_SLURM_PORT": "7817"}
    out = subprocess.run([CLUSTER / "start.sh"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    env["SLURM_CONF"] = re.search(r"SLURM_CONF=(\S+)", out.stdout).group(1)
    try:
        job = submit(env, tmp_path, *TINY_RUN, "--gpus-per-node", "2", "--data",
                     str(synthetic_betons["train"].parent), "--run-dir", "run", "--log-dir", "logs", "--time", "10",
                     "--set", "train.max_steps=2", "--set", "tracking.experiment=one-node")
        wait_for(lambda: job_info(env, job).get("JobState") == "COMPLETED", 300, "job COMPLETED", env, job,
                 tmp_path / "logs")
        assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["world_size"] == 2
    finally:
        subprocess.run([CLUSTER / "stop.sh"], env=env, capture_output=True, timeout=120)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "sovit-node1" in namespaces and "sovit-node2" in namespaces
    idle = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], env=cluster, capture_output=True,
                          text=True).stdout.split()
    assert sorted(set(idle)) == ["node1", "node2"], idle


def test_time_limit_checkpoints_requeues_and_resumes_one_mlflow_run(cluster, synthetic_betons, tmp_path):
    """A real time limit: once training has saved a checkpoint the test cuts the job's limit to 1 minute; SLURM
    sends USR1, every rank saves, submitit requeues; the test then gives the requeued job time to finish."""
    # ~4.5 steps/s here; the signal comes 30-60 s after the cut, so 200 steps could finish before it
    steps = 400
    job, logs = start_long_run(cluster, synthetic_betons, tmp_path, "requeue", steps)
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=1"], env=cluster, check=True)
    wait_for(lambda: requeued(cluster, job), 150, "a requeue", cluster, job, logs)
    # SLURM holds a requeued job for ~2 minutes (Reason=BeginTime); an admin may start it early, the test does
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10", "StartTime=now"], env=cluster, check=True)
    wait_for(lambda: job_info(cluster, job).get("JobState") == "COMPLETED", 300, "job COMPLETED", cluster, job, logs)

    assert_saved_requeued_and_resumed_into_one_run(tmp_path, job, "requeue", steps)


def test_preemption_checkpoints_requeues_and_resumes_one_mlflow_run(cluster, synthetic_betons, tmp_path):
    """A real preemption: an exclusive job in the higher-tier 'urgent' partition takes both nodes. SLURM sends
    the job's --signal (preempt_send_user_signal), every rank saves, the job is requeued and resumes."""
    steps = 100  # the preemption signal comes within seconds
    job, logs = start_long_run(cluster, synthetic_betons, tmp_path, "preempt", steps)
    urgent = subprocess.run(["sbatch", "--parsable", "--partition", "urgent", "--nodes", "2", "--exclusive",
                             "--output", str(tmp_path / "urgent.out"), "--wrap", "sleep 10"],
                            env=cluster, check=True, capture_output=True, text=True).stdout.strip()
    wait_for(lambda: requeued(cluster, job), 150, "a requeue after preemption", cluster, job, logs)
    wait_for(lambda: job_info(cluster, urgent).get("JobState") == "COMPLETED", 120, "the urgent job", cluster,
             urgent, logs)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster, check=True)
    wait_for(lambda: job_info(cluster, job).get("JobState") == "COMPLETED", 300, "job COMPLETED", cluster, job, logs)
    assert_saved_requeued_and_resumed_into_one_run(tmp_path, job, "preempt", steps)


def requeued(cluster: dict, job: str) -> bool:
    info = job_info(cluster, job)
    return info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) >= 1


def start_long_run(cluster: dict, synthetic_betons: dict, tmp_path: Path, experiment: str,
                   steps: int) -> tuple[str, Path]:
    """Submit a 2-node run of ``steps`` steps that checkpoints every 5; return once its first checkpoint exists."""
    job = submit(cluster, tmp_path, *TINY, "--data", str(synthetic_betons["train"].parent), "--run-dir", "run",
                 "--log-dir", "logs", "--time", "10", "--signal", "USR1@5",
                 "--set", f"train.max_steps={steps}", "--set", "checkpoint.every_steps=5",
                 "--set", "train.log_every_steps=5", "--set", f"tracking.experiment={experiment}")
    logs = tmp_path / "logs"
    wait_for(lambda: (tmp_path / "run" / "latest").is_file(), 240, "a first checkpoint", cluster, job, logs)
    return job, logs


def assert_saved_requeued_and_resumed_into_one_run(tmp_path: Path, job: str, experiment: str, steps: int) -> None:
    log0 = (tmp_path / "logs" / job / f"{job}_0_log.out").read_text()
    resumed = re.search(r"resuming at step (\d+)", log0)
    assert resumed, f"no requeue: the job did all {steps} steps before its time limit or preemption"
    resumed_at = int(resumed.group(1))
    assert 5 <= resumed_at < steps, log0[-2000:]
    assert "Caught signal SIGUSR1" in log0 and "Requeued job" in log0
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["status"] == "FINISHED" and final["step"] == steps
    client, runs = mlflow_runs(tmp_path / "mlflow.db", experiment)
    assert len(runs) == 1, [r.info.run_id for r in runs]  # the requeued job appended to the same run
    logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(logged) == list(range(5, steps + 1, 5)), logged  # continuous: every step once, none lost


def test_a_state_dir_too_long_for_slurmds_sockets_is_refused_before_anything_starts(tmp_path):
    """Under such a directory every job failed to launch and sat held (launch_failed_requeued_held), with the
    reason only in slurmd's log: its step sockets' paths passed the 108 bytes a Unix socket path holds."""
    state = tmp_path / ("x" * 80)
    out = subprocess.run([CLUSTER / "start.sh"], env={**os.environ, "SOVIT_SLURM_DIR": str(state)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"SOVIT_SLURM_DIR '{state}' is {len(str(state))} characters" in out.stderr
    assert "expected at most" in out.stderr and not state.exists()
