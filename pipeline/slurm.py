"""SLURM for ``launchers/submit.py``: time and signal syntax, what a partition's nodes have, the flags and
environment of the job, and the submitit glue (the executor, and ``SlurmTask``, the callable each SLURM task runs).

Requeue has one path, described in docs/slurm.md: ``pipeline.trainer.run`` saves on SIGUSR1 at a step boundary and
returns STOPPED; under submitit ``SlurmTask`` then hands the signal to submitit's own handler, which requeues the job
with the resubmission ``SlurmTask.checkpoint`` returns; under a plain sbatch ``launchers/train.py`` requeues itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

from submitit.helpers import Checkpointable

from data_loaders.errors import SovitError

STOP_SIGNAL = "USR1"  # what pipeline.trainer saves and stops on; submitit's own default (USR2) is never sent
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class SlurmError(SovitError):
    """A SLURM value or cluster state the user must fix; the message is one line naming it and the fix."""


class SlurmUnreachable(SlurmError):
    """No SLURM to ask: no sbatch/sinfo, or no readable configuration."""


def parse_time(text: str) -> int:
    """SLURM time syntax -> whole minutes (SLURM rounds seconds up to minutes too)."""
    m = _TIME.fullmatch(text.strip())
    if not m:
        raise SlurmError(f"--time {text!r} is invalid: expected minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    days, a, b, c = (int(g) if g else 0 for g in m.groups())
    if m.group(1) is not None:  # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + a * 3600 + b * 60 + c
    elif m.group(4) is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    else:  # M or M:S
        seconds = a * 60 + b
    if seconds == 0:
        raise SlurmError(f"--time {text} is invalid: expected at least one minute")
    return -(-seconds // 60)


def parse_signal(text: str) -> int:
    """``USR1@120`` -> 120, the seconds before the time limit. Only USR1: it is the signal training saves on."""
    name, sep, seconds = text.upper().removeprefix("SIG").partition("@")
    if not sep or name != STOP_SIGNAL or not seconds.isdigit() or int(seconds) < 1:
        raise SlurmError(f"--signal {text!r} is invalid: expected {STOP_SIGNAL}@SECONDS (the signal training saves "
                         f"on), e.g. {STOP_SIGNAL}@120")
    return int(seconds)


def node_resources(partition: str | None) -> list[tuple[int, str]]:
    """(CPUs, gres) of every node of ``partition`` (all partitions' nodes if None), as sinfo reports them.

    Without a readable slurm.conf, SLURM's commands retry for 60 s before failing (sbatch too, which submitit then
    reports as a traceback); sinfo's first retry message is enough to say so at once."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise SlurmUnreachable("sbatch/sinfo not found on PATH: run on a SLURM login node (or `module load slurm`), "
                               "add --local to train on this machine, or start a test cluster with "
                               "slurm/local-cluster/start.sh (docs/slurm.md)")
    cmd = ["sinfo", "--noheader", "--Node", "--format=%c %G", *(["--partition", partition] if partition else [])]
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("sinfo: ") and "retrying" in line:
                proc.kill()
    errors = [line.removeprefix("sinfo: ") for line in lines if line.startswith("sinfo: ")]
    if proc.returncode != 0 or errors:
        raise SlurmUnreachable(f"SLURM is not reachable (sinfo: {(errors or lines or ['no message'])[0]}): point "
                               "SLURM_CONF at the cluster's slurm.conf (docs/slurm.md), or add --local to train here")
    rows = [line.split(maxsplit=1) for line in lines if line]
    if not rows:
        raise SlurmError(f"--partition {partition} is invalid: sinfo lists no nodes in it (`sinfo -s` lists them)")
    return [(int(row[0].rstrip("+")), row[-1] if len(row) > 1 else "") for row in rows]


def size_tasks(partition: str | None, ranks_per_node: int, requested: int | None, gpus: bool,
               dry_run: bool) -> tuple[int, str]:
    """(cores per task, note). ``requested``, or the smallest node's CPUs shared by its ranks. A request no node can
    hold is refused, since SLURM would keep such a job pending forever. A dry run without a reachable SLURM sizes
    the tasks for this machine and says so in the note."""
    try:
        nodes = node_resources(partition)
    except SlurmUnreachable as e:
        if not dry_run:
            raise
        return requested or max(1, len(os.sched_getaffinity(0)) // ranks_per_node), f"# not checked: {e}"
    where = f"partition {partition}" if partition else "the cluster"
    if gpus and all("gpu" not in gres for _, gres in nodes):
        raise SlurmError(f"--gpus-per-node {ranks_per_node}: {where} has no GPUs (sinfo Gres={nodes[0][1]}): add "
                         "--cpu for CPU-only nodes or pick a GPU --partition")
    cpus = requested or max(1, min(c for c, _ in nodes) // ranks_per_node)
    most = max(c for c, _ in nodes)
    if cpus * ranks_per_node > most:
        raise SlurmError(f"--cpus-per-task {cpus} x {ranks_per_node} ranks per node needs {cpus * ranks_per_node} "
                         f"CPUs but the nodes of {where} have at most {most}: lower --cpus-per-task "
                         f"(at most {most // ranks_per_node}) or --gpus-per-node")
    return cpus, ""


def check_flags(time: str, signal: str, mem: str | None, interface: str | None, **script_text: str | None) -> None:
    """What goes into the sbatch script, in SLURM's syntax; no newline or control character in any text flag: in an
    ``#SBATCH`` line a newline would start a new command of the job's script."""
    for flag, value in script_text.items():
        if value is not None and not value.isprintable():
            raise SlurmError(f"--{flag.replace('_', '-')} {value!r} is invalid: expected printable text (no newline "
                             "or control character)")
    minutes = parse_time(time)
    if parse_signal(signal) >= minutes * 60:
        raise SlurmError(f"--signal {signal} is invalid: expected a warning time below the time limit ({minutes} min)")
    if mem is not None and not re.fullmatch(r"\d+[KMGT]?", mem):
        raise SlurmError(f"--mem {mem} is invalid: expected a SLURM size such as 480G, 64000M or 0")
    if interface is not None and not re.fullmatch(r"[\w.:-]+", interface):
        raise SlurmError(f"--interface {interface} is invalid: expected an interface name such as ib0 or eth0")


def interface_env(interface: str | None) -> dict[str, str]:
    """The variables that make gloo and NCCL use ``interface`` (none: they pick one themselves)."""
    return {"GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface} if interface else {}


def executor(log_dir: Path, max_requeues: int, *, job_name: str, nodes: int, ranks_per_node: int,
             cpus_per_task: int, gpus: bool, time: str, signal: str, interface: str | None, **sbatch: str | None):
    """A submitit SlurmExecutor for one task per rank. Parameters keep SLURM's own names, so the sbatch script says
    exactly what was asked; ``sbatch`` holds optional flags (partition, account, qos, constraint, exclude, mem).
    The job exports SUBMITIT_PREEMPT_SIGNAL, submitit's documented switch, so its handler listens on USR1 too."""
    import submitit

    env = {"SUBMITIT_PREEMPT_SIGNAL": STOP_SIGNAL, **interface_env(interface)}
    ex = submitit.SlurmExecutor(folder=log_dir / "%j", max_num_timeout=max_requeues)
    ex.update_parameters(job_name=job_name, nodes=nodes, ntasks_per_node=ranks_per_node, cpus_per_task=cpus_per_task,
                         time=parse_time(time), setup=[f"export {k}={shlex.quote(v)}" for k, v in env.items()],
                         stderr_to_stdout=False,
                         additional_parameters={"signal": f"{STOP_SIGNAL}@{parse_signal(signal)}"},
                         **({"gpus_per_node": ranks_per_node} if gpus else {}),
                         **{k: v for k, v in sbatch.items() if v is not None})
    return ex


def sbatch_script(ex) -> str:
    """The script ``ex.submit`` writes: submitit's own text for its own command line."""
    return ex._make_submission_file_text(ex._submitit_command_str, uid="dry-run")


def submit(ex, cfg):
    """Submit ``SlurmTask()(cfg)``. When sbatch refuses, submitit prints sbatch's stderr and raises; this makes it the
    one line of a SlurmError instead."""
    from submitit.core.utils import FailedJobError

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return ex.submit(SlurmTask(), cfg)
    except FailedJobError as e:
        said = [line.removeprefix("sbatch: ").removeprefix("error: ") for line in str(e).splitlines() if line.strip()]
        raise SlurmError(f"sbatch refused the job ({said[-1] if said else 'no message'}): fix what it names, "
                         "see docs/slurm.md") from None


class SlurmTask(Checkpointable):
    """One SLURM task of a submitit job: ``pipeline.trainer.run`` on this rank.

    When SIGUSR1 (time limit or preemption) made run() save and return STOPPED, run() has put submitit's handler
    back; raising the signal again lets it requeue as it would for any checkpointable callable: on rank 0 it calls
    ``checkpoint()`` (Checkpointable's: this same call again, resuming from ``latest``), counts a time-out against
    ``--max-requeues``, runs ``scontrol requeue`` and exits; the other ranks return. A signal outside run() (during
    imports, say) reaches submitit's handler directly and takes the same path from the last periodic checkpoint.
    """

    def __call__(self, cfg) -> dict:
        from pipeline.trainer import run

        result = run(cfg)
        if result.requeue:
            signal.raise_signal(getattr(signal, f"SIG{STOP_SIGNAL}"))
        return result.to_json()

