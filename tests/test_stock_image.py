"""The training path runs on a stock CUDA image: torch, timm and DeepSpeed from a carried bundle, but no MLflow,
FFCV, DALI or submitit. Here those four are made unimportable and a tiny run trains, evaluates and saves."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, TRAIN, tiny_run

BLOCKED = ("mlflow", "ffcv", "nvidia.dali", "submitit")


def test_training_needs_no_mlflow_ffcv_dali_or_submitit(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_run(synthetic_root, run_dir, 3)
    code = (f"import sys, runpy; sys.modules.update(dict.fromkeys({BLOCKED!r})); sys.argv = {[str(TRAIN), *args]!r}; "
            f"runpy.run_path({str(TRAIN)!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert (run_dir / "step_00000003" / "COMPLETE").exists() and (run_dir / "best.safetensors").exists()
