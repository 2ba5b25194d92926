"""Where a training run executes: SLURM through submitit (the default), ``--local`` on this machine, or nowhere
(``--dry-run`` prints what would be submitted). Installed as ``sovit-submit`` too.

    python launchers/submit.py --arch 19 --nodes 4 --data /datasets/imagenet-ffcv   # 32 GPU ranks on SLURM
    python launchers/submit.py --local                                              # the embedded demo
    python launchers/submit.py --arch 19 --nodes 4 --data ... --dry-run             # sbatch script + memory

Everything a user can get wrong (config, world-size arithmetic, data and class count, SLURM flags and what the
nodes have) is checked here, before anything is submitted: a job that fails or pends in the queue an hour later
costs far more than a one-line error now. Requeue on time limits and preemption: docs/slurm.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from data_loaders import DataError
from data_loaders.base import check_classes, read_sidecar
from launchers.train import EXIT_CODES
from pipeline import slurm
from pipeline.config import CONFIGS_DIR, ConfigError, RunConfig, add_config_args, config_from_args, plain
from pipeline.distributed import cpu_threads
from pipeline.tracking import tracking_uri

DEMO_DATA = Path("data/synthetic").resolve()  # relative to the working directory, like runs/ and mlflow.db
SBATCH_FLAGS = ("partition", "account", "qos", "constraint", "exclude")  # passed to sbatch when given


class UsageError(ValueError):
    """A bad command-line value; the message is one line naming it and the fix."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launchers/submit.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(p)
    where = p.add_argument_group("where")
    where.add_argument("--local", action="store_true",
                       help="run all ranks on this machine, no SLURM; with no --arch/--config: the embedded demo")
    where.add_argument("--dry-run", action="store_true",
                       help="print the resolved config, sbatch script and per-GPU memory estimate; submit nothing")
    res = p.add_argument_group("SLURM resources (one task per GPU)")
    res.add_argument("--nodes", type=int, default=1)
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


@dataclass(frozen=True)
class Plan:
    """The validated decision: what runs where, with how many ranks and cores."""

    cfg: RunConfig
    nodes: int
    ranks_per_node: int
    cpus_per_task: int
    demo: bool
    note: str = ""  # why a dry run's sbatch script could not be checked against the cluster


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate every argument, resolve the config for the world size and size the tasks; raises one-line errors."""
    demo = args.local and args.arch is None and not args.config
    _check(args.local or args.arch is not None or args.config, "no model chosen", "--arch 7|10|14|19 (or --config "
           "FILE); the demo config runs with --local, or add --config demo")
    _check(args.nodes >= 1, f"--nodes {args.nodes}", "an integer >= 1")
    _check(not (args.local and args.nodes != 1), f"--nodes {args.nodes} with --local", "--nodes 1 (this machine)")
    default = (torch.cuda.device_count() or 2) if args.local else 8
    ranks = args.gpus_per_node if args.gpus_per_node is not None else default
    _check(ranks >= 1, f"--gpus-per-node {ranks}", "an integer >= 1 (ranks per node; add --cpu for CPU nodes)")
    _check(args.cpus_per_task is None or args.cpus_per_task >= 1, f"--cpus-per-task {args.cpus_per_task}",
           "an integer >= 1")
    _check(args.max_requeues >= 0, f"--max-requeues {args.max_requeues}", "an integer >= 0")
    slurm.check_flags(args.time, args.signal, args.mem, args.interface,
                      **{k: getattr(args, k) for k in ("job_name", "log_dir", *SBATCH_FLAGS)})

    shortcuts = {"data.loader": args.loader, "checkpoint.run_dir": args.run_dir, "tracking.uri": args.mlflow_uri}
    overrides = [f"{k}={v}" for k, v in shortcuts.items() if v is not None] + args.overrides  # the user's --set wins
    cfg = config_from_args(argparse.Namespace(arch=args.arch, config=[CONFIGS_DIR / "demo.yaml"] if demo else
                                              args.config, overrides=overrides), world_size=args.nodes * ranks)
    if args.data is not None or (demo and not cfg.data.train):
        root = Path(args.data).expanduser().resolve() if args.data is not None else DEMO_DATA
        _check(root.is_dir() or root == DEMO_DATA, f"--data {root}", "a folder with train.beton/val.beton (ffcv) "
               "or train/ and val/ ImageFolders (dali, torchvision)")
        suffix = ".beton" if cfg.data.loader == "ffcv" else ""
        cfg.data.train, cfg.data.val = str(root / f"train{suffix}"), str(root / f"val{suffix}")
    _check_data(cfg)
    if cfg.checkpoint.run_dir:  # absolute: SLURM tasks may start in another working directory than this shell
        cfg.checkpoint.run_dir = str(Path(cfg.checkpoint.run_dir).expanduser().resolve())
    cfg.tracking.uri = tracking_uri(cfg)
    if args.local:
        return Plan(cfg, 1, ranks, args.cpus_per_task or cpu_threads(ranks), demo)
    cpus, note = slurm.size_tasks(args.partition, ranks, args.cpus_per_task, not args.cpu, args.dry_run)
    return Plan(cfg, args.nodes, ranks, cpus, demo, note)


def _check(ok, what: str, expected: str) -> None:
    if not ok:
        raise UsageError(f"{what} is invalid: expected {expected}")


def _check_data(cfg: RunConfig) -> None:
    """Data must exist now, on the submitting machine (SLURM nodes share its file system), with the class count the
    model has: the .beton sidecars hold the class names, so a mismatch is an error here rather than in the queue."""
    d = cfg.data
    _check(d.train, "no training data", "--data DIR (train.beton/val.beton for ffcv, train/ val/ otherwise) or --set "
           "data.train=... --set data.val=...")
    if Path(d.train).parent == DEMO_DATA and not Path(d.train).exists():
        return  # the demo set is generated just before training
    ffcv = d.loader == "ffcv"
    kind = f"a .beton file (convert with {_tool('python')} -m data_loaders.convert)" if ffcv else "an ImageFolder dir"
    for key, path in (("data.train", d.train), ("data.val", d.val)):
        _check(Path(path).is_file() if ffcv else Path(path).is_dir(), f"{key}={path} (loader {d.loader})",
               f"{kind} that exists")
    if ffcv:
        train = read_sidecar(d.train)["classes"]
        check_classes(train, d.train, cfg.model.num_classes)
        check_classes(read_sidecar(d.val)["classes"], d.val, cfg.model.num_classes, train)


def _tool(name: str) -> str:
    """A command installed beside this Python (setup.sh puts none of them on PATH), relative to here when below."""
    path = Path(sys.executable).parent / name
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def slurm_executor(args: argparse.Namespace, plan: Plan):
    return slurm.executor(Path(args.log_dir).expanduser().resolve(), args.max_requeues, nodes=plan.nodes,
                          job_name=args.job_name or ("sovit_demo" if plan.demo else plan.cfg.model.arch),
                          ranks_per_node=plan.ranks_per_node, cpus_per_task=plan.cpus_per_task, gpus=not args.cpu,
                          time=args.time, signal=args.signal, interface=args.interface,
                          mem=args.mem, **{k: getattr(args, k) for k in SBATCH_FLAGS})


def run_local(args: argparse.Namespace, plan: Plan) -> int:
    """All ranks as local processes through torch's elastic launcher (as torchrun); prints rank 0's result.

    Nothing listens beyond this machine: torch's TCPStore binds every interface, so this process serves the store
    from a socket bound to 127.0.0.1 (the static rendezvous and the ranks share it), and gloo/NCCL use the loopback.
    Rank 0 writes here, the other ranks into --log-dir."""
    from torch.distributed import TCPStore
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from data_loaders.synthetic import ensure_demo_data
    from pipeline.trainer import run

    if plan.demo:
        ensure_demo_data(plan.cfg.data, plan.cfg.model.num_classes)
    env = {**slurm.interface_env(args.interface or "lo"), **os.environ, "OMP_NUM_THREADS": str(plan.cpus_per_task)}
    os.environ.update(env)  # the user's own variables win, except OMP_NUM_THREADS: cpus_per_task already honours it
    for logger in ("torch.distributed.elastic", "torch.multiprocessing"):  # a failure is main()'s one line
        logging.getLogger(logger).setLevel(logging.CRITICAL)
    t0, n = time.time(), plan.ranks_per_node
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
        _store = TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, master_listen_fd=sock.fileno(),
                          wait_for_workers=False)
        logs = DefaultLogsSpecs(log_dir=args.log_dir, redirects={rank: Std.ALL for rank in range(1, n)})
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"local-{port}", max_restarts=0,
                              rdzv_backend="static", rdzv_endpoint=f"127.0.0.1:{port}", rdzv_configs={"rank": 0},
                              monitor_interval=1, logs_specs=logs)
        result = elastic_launch(config, run)(plan.cfg)[0]
    top1 = result.val.get("top1")
    print(f"{'done' if result.status == 'FINISHED' else result.status} in {time.time() - t0:.0f} s on {n} local "
          f"ranks: validation top-1 {f'{top1:.2f}%' if top1 is not None else 'not evaluated'}")
    print(f"run dir {result.run_dir}\nwatch: {_mlflow_ui(plan.cfg)}")
    return EXIT_CODES[result.status]


def submit(args: argparse.Namespace, plan: Plan) -> int:
    job = slurm.submit(slurm_executor(args, plan), plan.cfg)
    cfg = plan.cfg
    print(f"submitted job {job.job_id}: {plan.nodes} node(s) x {plan.ranks_per_node} rank(s), {cfg.model.arch}")
    print(f"  logs     {job.paths.folder}/{job.job_id}_<rank>_log.out (.err)")
    # the name pipeline.trainer.default_run_dir gives a run in this job, when --run-dir is not set
    print(f"  run dir  {cfg.checkpoint.run_dir or Path.cwd() / 'runs' / f'{cfg.model.arch}-{job.job_id}'}")
    print(f"  watch    squeue -j {job.job_id}; tail -f {job.paths.stderr}   # rank 0's progress bar")
    print(f"           {_mlflow_ui(cfg)}")
    return 0


def _mlflow_ui(cfg: RunConfig) -> str:
    return f"{_tool('mlflow')} ui --backend-store-uri {cfg.tracking.uri}   # then open http://127.0.0.1:5000"


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
    try:
        plan = make_plan(args)
        return (_print_dry_run if args.dry_run else run_local if args.local else submit)(args, plan)
    except (UsageError, ConfigError, DataError, slurm.SlurmError) as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        print(f"submit.py: error: rank {rank} failed: {(message or 'no message').splitlines()[0]} (its log and "
              f"traceback: {Path(failure.error_file).parent})", file=sys.stderr)
        return 2 if message.split(":")[0] in ("ConfigError", "DataError", "CheckpointError") else 1


if __name__ == "__main__":
    sys.exit(main())
