"""What a process knows about where it runs: the SLURM job it belongs to, the commands installed beside its
interpreter, and how it prints paths. Only the standard library is imported here: the launchers' ``--help``, the
trainer, the run lock and tracking all read these.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def slurm_job_id() -> str | None:
    """The job as SLURM's commands (squeue, scontrol, sacct) name it: ``JOB_TASK`` for a task of a job array, else
    the job id; None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def command(name: str | None = None) -> str:
    """This interpreter, or the command ``name`` installed beside it (setup.sh puts none of them on PATH), as a user
    types it: relative to the working directory when below it, else absolute."""
    path = Path(sys.executable) if name is None else Path(sys.executable).parent / name
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def paths_as_bytes() -> None:
    """A path that is not UTF-8 reaches Python (argv, directory listings) as surrogates, which stdout refuses in most
    UTF-8 locales: print them as the bytes they were, as ``ls`` does, instead of crashing on the first such line."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
