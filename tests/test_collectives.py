"""Collectives run on the rank's device: NCCL rejects a CPU tensor where gloo accepts it, so CPU tests cannot see
the bug by running. Instead: no library module calls torch.distributed collectives itself (they all go through
``pipeline.distributed``), and that helper places every tensor on the rank's device. MFU is per device."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import torchrun

from pipeline import distributed, metrics

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
               "gather_object", "scatter_object_list", "all_to_all", "barrier", "send", "recv"}


def _direct_collective_calls(path: Path) -> list[str]:
    """``dist.all_reduce(...)`` / ``torch.distributed.barrier(...)`` / ``from torch.distributed import ...``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            target = ast.unparse(node.func.value)
            if target in ("dist", "torch.distributed", "td"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.func)}")
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name}" for a in node.names
                      if a.name in COLLECTIVES]
    return found


def test_no_library_module_calls_a_collective_directly():
    files = [p for d in ("pipeline", "data_loaders", "launchers") for p in (ROOT / d).rglob("*.py")]
    offenders = [hit for p in files if p != ROOT / "pipeline" / "distributed.py" for hit in _direct_collective_calls(p)]
    assert offenders == [], "use pipeline.distributed's helpers, which put tensors on the rank's device"


def test_the_helper_moves_values_to_the_rank_device(monkeypatch):
    """With a rank device that is not the CPU (``meta`` stands in for ``cuda:N``), a CPU tensor and a list of
    Python numbers both reach the collective on that device."""
    seen = []
    monkeypatch.setattr(distributed, "_DEVICE", torch.device("meta"))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, op=None: seen.append((t.device, op)))
    assert distributed.all_reduce(torch.tensor([1.0, 2.0])).device == torch.device("meta")
    distributed.all_reduce([1], "max")
    assert seen == [(torch.device("meta"), distributed.dist.ReduceOp.SUM),
                    (torch.device("meta"), distributed.dist.ReduceOp.MAX)]


def test_mfu_is_per_device(monkeypatch):
    """8 ranks, global batch 256, 10 steps in 1 s: 2560 img/s for the job, 320 per device. At 1 GFLOP forward per
    image (3 GFLOP for training) and a 100 TFLOP/s peak, one device does 0.96 TFLOP/s: MFU 0.96%."""
    now = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    meter = metrics.StepMeter(256, 8, 10**9, 100.0, torch.device("cpu"))
    for _ in range(10):
        meter.step()
    now[0] = 101.0
    report = meter.report()
    assert report["images_per_s"] == pytest.approx(2560)
    assert report["mfu"] == pytest.approx(0.0096)


def test_a_lone_process_leaves_no_rank_environment_behind():
    """The rank variables of a lone run would be inherited by every subprocess and sbatch it starts afterwards
    (an in-process evaluate once made later SLURM jobs train as independent 1-rank runs)."""
    code = ("import os; from pipeline import distributed; info = distributed.init(); distributed.shutdown(); "
            "print(info.world_size, sorted(k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', "
            "'LOCAL_RANK') if k in os.environ))")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "1 []"


@pytest.mark.multiproc
def test_no_process_builds_deepspeeds_cpu_communication_op(tmp_path, monkeypatch):
    """DeepSpeed's CPU backend JIT-compiles a shared-memory op when it starts (minutes on a fresh venv or a venv
    reached by another path: 179 of a lone evaluate.py's 199 s) that only DeepSpeed-inference uses. Neither a lone
    process nor two gloo ranks build it: the extension directory stays empty and no backend holds the op."""
    ext = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    script = tmp_path / "init.py"
    script.write_text("import json, deepspeed\nfrom pipeline import distributed\ninfo = distributed.init()\n"
                      "op = deepspeed.comm.comm.cdb.shm_comm_op\ndistributed.shutdown()\n"
                      "if info.rank == 0:  # one line: two ranks' prints can interleave on one\n"
                      "    print('RESULT ' + json.dumps([info.world_size, repr(op)]))\n")
    lone = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert lone.returncode == 0, lone.stderr[-2000:]
    assert lone.stdout.splitlines()[-1] == "RESULT [1, \"None\"]"
    assert torchrun(script, timeout=120) == [2, "None"]
    assert not ext.exists() or not any(ext.iterdir())
