"""launchers/submit.py without a cluster: the dry-run script agrees with slurm/sovit.sbatch, every bad argument is one
clear line, a machine without SLURM gets told what to do, and (slow) the embedded demo learns."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBMIT = ROOT / "launchers" / "submit.py"
sys.path.insert(0, str(ROOT))

from launchers.submit import parse_time  # noqa: E402

RESOURCE_FLAGS = ("job-name", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time", "signal")


def run_submit(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 120):
    return subprocess.run([sys.executable, str(SUBMIT), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def sbatch_flags(script: str) -> dict[str, str]:
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script, flags=re.M))
    flags["time"] = str(parse_time(flags["time"]))  # 72:00:00 and 4320 are the same limit
    return flags


@pytest.fixture(scope="module")
def fake_dataset(tmp_path_factory) -> Path:
    """Dry runs check that the files exist, not what is in them."""
    d = tmp_path_factory.mktemp("imagenet")
    (d / "train.beton").write_bytes(b"")
    (d / "val.beton").write_bytes(b"")
    return d


def test_dry_run_for_arch19_on_4_nodes_agrees_with_the_sbatch_template(fake_dataset, tmp_path):
    r = run_submit("--arch", "19", "--nodes", "4", "--data", str(fake_dataset), "--dry-run", cwd=tmp_path)
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
    totals = []
    for stage in (0, 3):
        r = run_submit("--arch", "7", "--nodes", "2", "--data", str(fake_dataset), "--dry-run",
                       "--set", f"train.zero_stage={stage}", "--set", "ema.enabled=false", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        params = float(re.search(r"#   parameters\s+([\d.]+) GiB", r.stdout).group(1))
        optim = float(re.search(r"#   optimizer\s+([\d.]+) GiB", r.stdout).group(1))
        totals.append((params, optim))
    (p0, o0), (p3, o3) = totals
    assert p3 < p0 and o3 < o0 / 8  # stage 3 partitions params and optimizer states over 16 ranks


@pytest.mark.parametrize("args, names", [
    (["--arch", "12"], "--arch '12'"),
    (["--arch", "7", "--nodes", "0"], "--nodes 0"),
    (["--arch", "7", "--gpus-per-node", "0"], "--gpus-per-node 0"),
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
])
def test_bad_arguments_are_one_clear_line(args, names, fake_dataset, tmp_path):
    if "--data" not in args and "no training data" not in names and "--local" not in args:
        args = [*args, "--data", str(fake_dataset)]
    r = run_submit(*args, "--dry-run", cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("submit.py: error: ") and names in lines[0], r.stderr
    assert not list(tmp_path.iterdir())  # nothing written, nothing submitted


def test_without_sbatch_says_how_to_run_locally(fake_dataset, tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # the venv only: no sbatch, no srun
    r = run_submit("--arch", "7", "--data", str(fake_dataset), cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and "sbatch" in line and "--local" in line and "start.sh" in line


@pytest.mark.slow
def test_embedded_demo_reaches_60_percent_top1(tmp_path):
    """The README's first command, as a user runs it: generate, convert, train 2 ranks, evaluate, log."""
    r = run_submit("--local", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(r"^done in \d+ s on 2 local ranks: validation top-1 ([\d.]+)%", r.stdout, flags=re.M)
    assert m and float(m.group(1)) >= 60.0, r.stdout[-2000:]
    assert (tmp_path / "data" / "synthetic" / "train.beton").is_file() and (tmp_path / "mlflow.db").is_file()
    assert "mlflow ui" in r.stdout
