"""Per-rank training entry: ``python launchers/train.py --arch 7 --set data.train=...`` on one process, or under
torchrun or srun (one process per rank). The training story itself is ``pipeline.trainer``.

Exit codes: 0 finished (or stopped and requeued), 1 training failed (a NaN loss), 2 a bad config, data or run
directory, or a file that could not be written (a full disk), 130 Ctrl-C, 143 SIGTERM. Under a plain ``sbatch``
(slurm/sovit.sbatch), a run stopped by SIGUSR1 requeues its own job; under submitit (launchers/submit.py) submitit
requeues it.
"""

from __future__ import annotations

import os
import subprocess
import sys

from launchers import next_commands, parser
from pipeline.result import Status
from pipeline.runtime import paths_as_bytes, slurm_job_id

EXIT_CODES = {Status.FINISHED: 0, Status.STOPPED: 0, Status.FAILED: 1, Status.KILLED: 143}


def requeue_self() -> None:
    """Put this SLURM job back in the queue (rank 0 only): it resumes from ``latest`` when it starts again."""
    job = slurm_job_id()
    print(f"checkpoint saved; requeueing SLURM job {job}", flush=True)
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"error: scontrol requeue {job} failed ({(done.stderr or done.stdout).strip()[:200]}); the checkpoint "
              "is saved: resubmit the same command to resume", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import add_config_args

    p = parser("launchers/train.py", __doc__)
    add_config_args(p)
    args = p.parse_args(argv)
    paths_as_bytes()

    from data_loaders.errors import SovitError
    from pipeline.config import config_from_args
    from pipeline.trainer import run

    try:
        cfg = config_from_args(args)
        result = run(cfg)
    except SovitError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: stopped without saving; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if result.requeue and slurm_job_id() and main_rank:
        requeue_self()
    elif main_rank and result.status in (Status.FINISHED, Status.KILLED):
        print(f"{result.summary()}\n{next_commands(result.run_dir, cfg.data.val)}", flush=True)
    return 130 if result.signal == "SIGINT" else EXIT_CODES[result.status]


if __name__ == "__main__":
    sys.exit(main())
