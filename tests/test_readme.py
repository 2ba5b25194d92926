"""The README's commands run as written, on small data: every command of README.md's ``bash`` blocks, and each
``python`` block, in order, from an empty working directory (README's paths are relative to it).

Only the data and the scale change: ``/data/imagenet`` is the synthetic ImageFolder, ``/data/betons`` a folder that
does not exist yet, ``.venv/bin/`` this interpreter's folder, 8 ranks become 2 CPU ranks, val's eval crops are 32 px,
and the training commands get the ``--set`` overrides (the README's own way to change a setting) of a 32 px, 2-step
run. Nothing else is added: no ``model.num_classes`` (the data says it), no folder made beforehand. What CI cannot
run has a reason in ``why_not_run``, and the test fails if a README command is skipped for a reason that is not one
of the four expected.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SMALL_RUN = ["model.img_size=32", "data.img_size=32", "data.micro_batch_size=4", "train.global_batch_size=8",
             "train.max_steps=2", "data.workers=1", "train.precision=fp32", "tracking.system_metrics=false"]


def readme_commands() -> list[list[str]]:
    """The argv of each command of the README's bash blocks (continuations joined, comments dropped) and of each
    python block (as ``python -c``), in README order."""
    commands = []
    for lang, block in re.findall(r"```(bash|python)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        if lang == "python":
            commands.append([".venv/bin/python", "-c", block])
            continue
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(shlex.split(command))
    return commands


def why_not_run(argv: list[str]) -> str | None:
    if argv[:2] == ["bash", "setup.sh"]:
        return "installs system packages"
    if argv[0].endswith("mlflow") and argv[1] == "ui":
        return "a server that runs until stopped"
    if argv[0] == "srun":
        return "needs a GPU node (tests/test_benchmarks.py runs both scripts on the CPU)"
    if argv[1:2] == ["launchers/submit.py"] and not {"--dry-run", "--local"} & set(argv):
        return "submits to a SLURM cluster (tests/test_slurm.py)"
    return None


def small(argv: list[str], imagenet: Path) -> list[str]:
    """The command on the small data, at the small scale, with absolute paths to this checkout's scripts."""
    prefixes = {".venv/bin/": f"{Path(sys.executable).parent}/", "launchers/": f"{ROOT}/launchers/"}
    out = []
    for i, arg in enumerate(argv):
        if arg == "[--ema]":  # an optional flag
            continue
        arg = "2" if argv[i - 1] in ("--nproc_per_node", "--gpus-per-node") else "32" if argv[i - 1] == "--eval-size" \
            else arg
        for old, new in prefixes.items():
            arg = new + arg[len(old):] if arg.startswith(old) else arg
        out.append(arg.replace("/data/imagenet", str(imagenet)).replace("/data/betons", "betons"))
    if "--local" in out:
        out += [arg for s in SMALL_RUN for arg in ("--set", s)]
    return out


@pytest.mark.slow
@pytest.mark.multiproc
def test_every_readme_command_runs_as_written(synthetic_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # the checkout's packages from any working directory
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    outputs, skipped = {}, set()
    for argv in readme_commands():
        if why_not_run(argv):
            skipped.add(why_not_run(argv))
            continue
        out = subprocess.run(small(argv, synthetic_root), cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
        outputs[shlex.join(argv)] = out.stdout
    assert len(skipped) == 4, skipped

    def printed(script: str) -> str:
        return next(out for command, out in outputs.items() if script in command)

    assert "  num_classes: 4\n" in printed("--dry-run")  # the sidecar's class count, with no --set
    assert (tmp_path / "betons" / "val.beton").is_file() and (tmp_path / "runs" / "my-run" / "latest").is_file()
    assert sorted(p.name for p in (tmp_path / "exports" / "sovit19").iterdir()) == ["config.json",
                                                                                  "model.safetensors"]
    assert re.search(r"^top-1 [\d.]+  top-5 [\d.]+  loss [\d.]+  \(20 images\)$", printed("evaluate.py"), flags=re.M)
