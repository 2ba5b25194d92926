"""Where a training run executes: SLURM through submitit (the default), ``--local`` on this machine, or nowhere
(``--dry-run`` prints what would be submitted). Installed as ``sovit-submit`` too.

    python launchers/submit.py --arch 19 --nodes 4 --data /datasets/imagenet-ffcv   # 32 GPU ranks on SLURM
    python launchers/submit.py --local                                              # the embedded demo
    python launchers/submit.py --arch 19 --nodes 4 --data ... --dry-run             # sbatch script + memory

Everything a user can get wrong (config, world-size arithmetic, data and class count, SLURM flags and what the
nodes have) is checked here, before anything is submitted: a job that fails or pends in the queue an hour later
costs far more than a one-line error now (pipeline/launch.py). Requeue on time limits and preemption:
docs/slurm.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data_loaders.errors import SovitError
from launchers import next_commands, parser
from launchers.train import EXIT_CODES
from pipeline import slurm
from pipeline.config import add_config_args, plain
from pipeline.launch import SBATCH_FLAGS, Plan, Terminated, make_plan, run_local
from pipeline.result import Status
from pipeline.run_dir import default_run_dir
from pipeline.runtime import paths_as_bytes
from pipeline.tracking import ui_link


def build_parser() -> argparse.ArgumentParser:
    p = parser("launchers/submit.py", __doc__, show_defaults=True)
    add_config_args(p)
    where = p.add_argument_group("where")
    where.add_argument("--local", action="store_true",
                       help="run all ranks on this machine, no SLURM; with no --arch/--config: the embedded demo")
    where.add_argument("--dry-run", action="store_true",
                       help="print the resolved config, sbatch script and per-GPU memory estimate; submit nothing")
    res = p.add_argument_group("SLURM resources (one task per GPU)")
    res.add_argument("--nodes", type=int, default=1, help="nodes to run on")
    res.add_argument("--gpus-per-node", type=int, default=None,
                     help="ranks per node; default 8 on SLURM, the local GPU count (or 2 on a CPU) with --local")
    res.add_argument("--cpu", action="store_true",
                     help="nodes without GPUs: request no GPUs, --gpus-per-node counts CPU ranks (gloo)")
    res.add_argument("--cpus-per-task", type=int, default=None,
                     help="cores per rank; default: the node's CPUs (sinfo; this machine's with --local) / ranks")
    res.add_argument("--mem", default=None, help="memory per node in SLURM syntax (e.g. 480G, 0 = all)")
    res.add_argument("--time", default="72:00:00", help="time limit, SLURM syntax (minutes, H:M:S, D-H:M:S)")
    for flag in SBATCH_FLAGS:
        res.add_argument(f"--{flag}", default=None)
    res.add_argument("--job-name", default=None, help="default: sovit_<arch>")
    res.add_argument("--log-dir", default="logs/submitit",
                     help="per-task logs and submitit's pickles (shared FS); --local: the ranks' logs")
    res.add_argument("--signal", default="USR1@120", help="USR1@SECONDS: sent this long before the time limit (and "
                     "on preemption) so training saves and the job requeues")
    res.add_argument("--max-requeues", type=int, default=30, help="give up after this many timeouts")
    run = p.add_argument_group("data, tracking, network (shortcuts for --set)")
    run.add_argument("--loader", choices=("ffcv", "dali", "torchvision"), default=None, help="data.loader")
    run.add_argument("--data", default=None,
                     help="dataset dir: train.beton/val.beton (ffcv) or train/ val/ ImageFolders (dali, torchvision)")
    run.add_argument("--run-dir", default=None, help="checkpoint.run_dir; reuse one to resume; default "
                     "runs/<arch>-<SLURM job id or start time>")
    run.add_argument("--mlflow-uri", default=None, help="tracking.uri (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    run.add_argument("--interface", default=None,
                     help="network interface for gloo/NCCL (sets GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)")
    return p



def slurm_executor(args: argparse.Namespace, plan: Plan):
    return slurm.executor(Path(args.log_dir).expanduser().resolve(), args.max_requeues, nodes=plan.nodes,
                          job_name=args.job_name or ("sovit_demo" if plan.demo else plan.cfg.model.arch),
                          ranks_per_node=plan.ranks_per_node, cpus_per_task=plan.cpus_per_task, gpus=not args.cpu,
                          time=args.time, signal=args.signal, interface=args.interface,
                          mem=args.mem, **{k: getattr(args, k) for k in SBATCH_FLAGS})


def local(args: argparse.Namespace, plan: Plan) -> int:
    t0 = time.time()
    result = run_local(plan, args.log_dir, args.interface)
    top1 = result.val.get("top1")
    print(f"{'done' if result.status is Status.FINISHED else result.status} in {time.time() - t0:.0f} s on "
          f"{plan.ranks_per_node} local ranks: validation top-1 "
          f"{f'{top1:.2f}%' if top1 is not None else 'not evaluated'}\n{result.summary()}\n"
          f"{next_commands(result.run_dir, plan.cfg.data.val)}")
    if plan.cfg.tracking.enabled:
        print(f"watch: {result.link or ui_link(plan.cfg.tracking.uri)}")
    return EXIT_CODES[result.status]


def submit(args: argparse.Namespace, plan: Plan) -> int:
    job = slurm.submit(slurm_executor(args, plan), plan.cfg)
    cfg = plan.cfg
    print(f"submitted job {job.job_id}: {plan.nodes} node(s) x {plan.ranks_per_node} rank(s), {cfg.model.arch}")
    print(f"  logs     {job.paths.folder}/{job.job_id}_<rank>_log.out (.err)")
    print(f"  run dir  {cfg.checkpoint.run_dir or Path.cwd() / default_run_dir(cfg.model.arch, job.job_id)}")
    print(f"  watch    squeue -j {job.job_id}; tail -f {job.paths.stderr}   # rank 0's progress bar")
    if cfg.tracking.enabled:
        print(f"           {ui_link(cfg.tracking.uri)}")
    return 0


def _print_dry_run(args: argparse.Namespace, plan: Plan) -> int:
    import yaml

    from pipeline.memory import estimate

    print("# resolved config")
    print(yaml.safe_dump(plain(plan.cfg.to_dict()), sort_keys=False), end="")
    if not args.local:
        print("# sbatch script (submitit writes it to the log dir, with %j the job id)")
        print(f"{plan.note}\n" * bool(plan.note) + slurm.sbatch_script(slurm_executor(args, plan)))
    print(estimate(plan.cfg, plan.nodes, plan.ranks_per_node))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths_as_bytes()
    try:
        plan = make_plan(args)
        return (_print_dry_run if args.dry_run else local if args.local else submit)(args, plan)
    except SovitError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("submit.py: interrupted: the ranks saved what they could; rerun with --run-dir RUN to resume",
              file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"submit.py: terminated by {e}; rerun with --run-dir RUN to resume", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
