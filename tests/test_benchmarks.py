"""The GPU node checks, run for real on the CPU: ``benchmarks/gpu_smoke.py`` passes with the packages the GPU image
has (no FFCV, DALI or MLflow), its FFCV and DALI checks and its 2-rank stop/resume pass, ``benchmarks/gpu_step.py``
prints its ratios against their targets and its ZeRO memory table; on a CUDA machine, the smoke test itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
CPU = ("--device", "cpu", "--img-size", "32")


ABSENT = """
import sys


class Absent:
    def find_spec(self, name, path=None, target=None):
        if name in ("ffcv", "nvidia.dali", "mlflow"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, Absent())
"""


@pytest.fixture
def gpu_image(tmp_path) -> dict[str, str]:
    """An environment where FFCV, DALI and MLflow do not import, as on the GPU image: a ``sitecustomize`` on the
    path makes them missing in every process started with it (torchrun's ranks and DataLoader workers too)."""
    site = tmp_path / "gpu-image"
    site.mkdir()
    (site / "sitecustomize.py").write_text(ABSENT)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def script(name: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    """Run ``benchmarks/NAME ARGS`` on one CPU thread per process; its output, asserting exit status 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    out = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return out.stdout


@pytest.mark.slow
def test_the_smoke_checks_pass_on_the_cpu_with_the_gpu_images_packages(gpu_image, tmp_path):
    out = script("gpu_smoke.py", *CPU, "--ranks", "1", "--steps", "12", env=gpu_image)
    assert re.search(r"^PASS train torchvision: 12 steps on cpu, fp32, loss [\d.]+->[\d.]+, [\d.]+ img/s, "
                     r"data wait \d+%$", out, re.M), out
    assert "SKIP train ffcv: not importable (ModuleNotFoundError: No module named 'ffcv')\n" in out
    assert "SKIP train dali: not importable (ModuleNotFoundError: No module named 'nvidia.dali')\n" in out
    assert re.search(r"^PASS stop: SIGUSR1 -> checkpoint step_0+\d \(epoch 0, batch \d of 6\), status STOPPED, exit 0$",
                     out, re.M), out
    assert re.search(r"^PASS resume: resuming at step \d, FINISHED at step 12$", out, re.M), out
    assert re.search(r"^PASS eval: top-1 [\d.]+, EMA top-1 [\d.]+ \(32 images\)$", out, re.M), out
    assert re.search(r"^PASS export: local-dir:\S+ in timm: top-1 ([\d.]+), the checkpoint's weights \1 \(eager fp32, "
                     r"32 images\); the run's own eval [\d.]+$", out, re.M), out
    assert "PASS syncs: 0 device syncs in 5 steady steps at ZeRO 0, 1 and 2 (fp32, mixup, EMA)\n" in out
    assert "FAIL" not in out and out.endswith("all checks passed\n")


@pytest.mark.slow
def test_the_ffcv_and_dali_train_checks_pass_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the train.py children
    from benchmarks import gpu_smoke

    smoke = gpu_smoke.Smoke(tmp_path, "cpu", img_size=32, batch=8, steps=12, timeout=300)
    smoke.data = gpu_smoke.make_data(tmp_path, ["ffcv", "dali"], train_images=48, val_images=16, size=32)
    assert re.fullmatch(r"12 steps on cpu, fp32, loss .*, FFCV ToDevice\(cpu\)", smoke.train("ffcv", 1))
    assert re.fullmatch(r"12 steps on cpu, fp32, loss .*, DALI cpu decoding", smoke.train("dali", 1))


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_stop_resume_evaluate_and_export(tmp_path):
    out = script("gpu_smoke.py", *CPU, "--ranks", "2", "--steps", "12", "--loaders")
    for name in ("stop", "resume", "eval", "export"):
        assert f"PASS {name} (2 ranks): " in out, out
    assert out.endswith("all checks passed\n")


def test_a_hung_run_fails_its_check_and_leaves_no_process_behind(tmp_path):
    import psutil

    out = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_smoke.py"), *CPU, "--ranks", "1", "--loaders",
                          "torchvision", "--timeout", "2", "--work-dir", str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL train torchvision: train.py (train) did not exit within 2 s\n" in out.stdout
    assert "FAIL stop: training ended or stalled before its first logged step\n" in out.stdout
    assert "SKIP the remaining checks: they need the resumed run\n" in out.stdout
    assert out.stdout.endswith("some checks FAILED\n")
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert left == []


def test_without_cuda_the_smoke_fails_in_one_line():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_smoke.py")], capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT, timeout=120)
    assert out.returncode == 1
    assert out.stdout == "FAIL device: CUDA is not available here (use --device cpu to run these checks on the CPU)\n"


@pytest.mark.slow
def test_the_step_benchmark_prints_each_ratio_beside_its_target(gpu_image):
    out = script("gpu_step.py", *CPU, "--archs", "sovit_7:8", "--parts", "step", "e2e", env=gpu_image)
    assert re.search(r"^sovit_7 +batch 8 +plain PyTorch +[\d.]+ ms/step +[\d.]+ img/s", out, re.M), out
    for zero, target in ((0, "0.90"), (1, "0.80")):
        assert re.search(rf"^sovit_7 +batch 8 +engine ZeRO-{zero} +[\d.]+ ms/step +[\d.]+ img/s +ratio \d\.\d\d "
                         rf"\(target >= {target}: (met|MISSED)\)", out, re.M), out
    assert re.search(r"^e2e train.py torchvision +sovit_7 batch 8: +[\d.]+ img/s, data wait +[\d.]+% \(18 steps\)$",
                     out, re.M), out
    assert "SKIP e2e ffcv: not importable" in out and "SKIP e2e dali: not importable" in out


@pytest.mark.multiproc
def test_the_zero_memory_table_shows_each_stage_partitioning():
    out = script("gpu_step.py", *CPU, "--parts", "memory")
    rows = {int(m[1]): [float(v) for v in m[2].split()] for m in re.finditer(r"^ZeRO-(\d) +([\d. ]+)$", out, re.M)}
    assert set(rows) == {0, 1, 2, 3}, out
    params, grads, optim = 4, 5, 6  # columns of the ratios to ZeRO-0
    assert rows[1][optim] < 1 and rows[2][grads] < 1 and rows[3][params] == pytest.approx(0.5, abs=0.02), out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: gpu_smoke.py checks a GPU node")
def test_the_smoke_checks_pass_on_this_gpu():
    out = script("gpu_smoke.py", timeout=1800)
    assert "FAIL" not in out and out.endswith("all checks passed\n")


@pytest.mark.slow
def test_the_conversion_benchmark_prints_both_writers_their_ratio_and_the_imagenet_projection():
    out = script("convert.py", "--images", "24", "--classes", "4", "--rounds", "1")
    rows = re.findall(r"^0 +(plain FFCV writer \(write_imagenet\.py\)|data_loaders\.convert) +\d+ +[\d.]+ +[\d.]+ +"
                      r"[\d.]+ min$", out, re.M)
    assert rows == ["plain FFCV writer (write_imagenet.py)", "data_loaders.convert"], out
    assert re.search(r"^data_loaders\.convert vs plain FFCV writer, all rounds: [\d.]+x images/s, [\d.]+x less CPU per "
                     r"image$", out, re.M), out
