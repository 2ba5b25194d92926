"""Session fixtures (one tiny synthetic ImageFolder and its .beton conversion) and the helpers the tests share:
a free port, torchrun of a worker script, and tiny training runs of ``launchers/train.py`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from data_loaders.synthetic import generate
from pipeline.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "launchers" / "train.py"


@pytest.fixture(autouse=True)
def _environment_is_state():
    """Each test gets the process environment back as it found it: a RANK or MASTER_ADDR left behind by an
    in-process trainer would make every later trainer, torchrun and SLURM job wait for ranks that never come."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """4 classes x 12 train / 5 val JPEGs of 64 px: ``root/train/class_XX/*.JPEG``, ``root/val/...``."""
    return generate(tmp_path_factory.mktemp("data") / "synthetic", classes=4, per_class=12, size=64,
                    val_per_class=5, seed=0)


@pytest.fixture(scope="session")
def synthetic_betons(synthetic_root, tmp_path_factory) -> dict[str, Path]:
    """``{"train": .beton, "val": .beton}`` converted from ``synthetic_root`` (sidecars beside them)."""
    from data_loaders.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("betons")
    opts = ConvertOptions(max_resolution=64, workers=2)
    convert(synthetic_root / "train", out / "train.beton", options=opts, progress=False)
    convert(synthetic_root / "val", out / "val.beton", classes_from=out / "train.beton.json", options=opts,
            progress=False)
    return {"train": out / "train.beton", "val": out / "val.beton"}


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MiB file system (tmpfs): a tiny run's checkpoint needs 63 MiB, its weights 16 MiB, its record KiBs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def tiny_run(root: Path, run_dir: Path, max_steps: int, *extra: str) -> list[str]:
    """``--set`` arguments of a tiny So-ViT-7 run at 32 px on ``root`` (torchvision loader, fp32, 12 steps/epoch
    at micro-batch 4), every source of randomness switched on; ``extra`` overrides come last and win."""
    sets = [
        "model.arch=sovit_7", "model.img_size=32", "data.img_size=32", "model.num_classes=4",
        "model.drop_path_rate=0.1",  # torch RNG in the step
        "data.loader=torchvision", f"data.train={root / 'train'}", f"data.val={root / 'val'}",
        "data.micro_batch_size=4", "data.workers=0", "data.auto_augment=rand-m9-mstd0.5-inc1",
        "train.global_batch_size=4", "train.precision=fp32", f"train.max_steps={max_steps}",
        "train.log_every_steps=1", "train.stop_check_every_steps=1", "schedule.epochs=3",
        "schedule.warmup_epochs=1", "schedule.cooldown_epochs=0",
        "mixup.mixup=0.8", "mixup.cutmix=1.0",  # numpy RNG in the step
        "ema.enabled=true", "ema.decay=0.9", f"checkpoint.run_dir={run_dir}", "checkpoint.every_steps=3",
        "checkpoint.keep_last=2", "tracking.enabled=false", *extra,
    ]
    return [arg for s in sets for arg in ("--set", s)]


def start_training(args: list[str], log_dir: Path, **popen) -> subprocess.Popen:
    """``launchers/train.py ARGS`` in the background. Output goes to a file (``proc.log``), not a pipe: an unread
    pipe fills up and stalls the trainer."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=log_dir, prefix="train-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen([sys.executable, str(TRAIN), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                text=True, **popen)
    proc.log = Path(log.name)
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text()


def finish(proc: subprocess.Popen, timeout: int = 300, returncode: int = 0) -> str:
    proc.wait(timeout=timeout)
    assert proc.returncode == returncode, output(proc)[-3000:]
    return output(proc)


def train(args: list[str], log_dir: Path, returncode: int = 0) -> str:
    return finish(start_training(args, log_dir), returncode=returncode)


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 400) -> dict:
    """Run ``script`` on ``nproc`` local gloo ranks; returns the JSON its rank 0 printed after ``RESULT ``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=script.parent)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, (out.stdout + out.stderr)[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))
