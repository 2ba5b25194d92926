"""Where and how a training run executes: the validated launch plan (ranks, cores, data, class count) that
``launchers/submit.py`` builds from its arguments, and the local launcher that runs every rank on this machine.

Everything a user can get wrong is checked in ``make_plan``, before anything is submitted: a job that fails or pends
in the queue an hour later costs far more than a one-line error now.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from data_loaders import class_names
from data_loaders.errors import SovitError
from data_loaders.splits import check_classes
from pipeline import slurm
from pipeline.config import CONFIGS_DIR, RunConfig, config_from_args
from pipeline.distributed import cpu_threads
from pipeline.runtime import command, paths_as_bytes
from pipeline.tracking import hide_credentials, tracking_uri

DEMO_DATA = Path("data/synthetic").resolve()  # relative to the working directory, like runs/ and mlflow.db
SBATCH_FLAGS = ("partition", "account", "qos", "constraint", "exclude")  # passed to sbatch when given
PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent dies


class UsageError(SovitError):
    """A bad command-line value; the message is one line naming it and the fix."""


class RankFailed(SovitError):
    """A local rank failed; the message is its error's first line and where its traceback is. A rank ends with its
    error's exit code (``_rank``), so the launcher's is the rank's: 2 for an error the user must act on, else 1."""

    def __init__(self, message: str, rank_exit_code: int):
        super().__init__(message)
        self.exit_code = rank_exit_code if rank_exit_code == SovitError.exit_code else 1


class Terminated(BaseException):
    """The local launcher got SIGTERM (or SIGHUP, SIGQUIT): its ranks were stopped; ``code`` is the shell's 128 + N.
    Like KeyboardInterrupt, a request to stop rather than an error: no ``except Exception`` takes it for one."""

    def __init__(self, sig: signal.Signals):
        super().__init__(f"{sig.name}: the ranks were stopped (SIGTERM: after saving)")
        self.code = 128 + sig


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
    cfg.tracking.uri = hide_credentials(tracking_uri(cfg))  # the secret travels in the environment, not in files
    if args.local:
        return Plan(cfg, 1, ranks, args.cpus_per_task or cpu_threads(ranks), demo)
    cpus, note = slurm.size_tasks(args.partition, ranks, args.cpus_per_task, not args.cpu, args.dry_run)
    return Plan(cfg, args.nodes, ranks, cpus, demo, note)


def _check(ok, what: str, expected: str) -> None:
    if not ok:
        raise UsageError(f"{what} is invalid: expected {expected}")


def _check_data(cfg: RunConfig) -> None:
    """Data must exist now, on the submitting machine (SLURM nodes share its file system), with the class count the
    model has (by default, the count the data has): the .beton sidecars and the ImageFolders name their classes, so
    a mismatch is an error here rather than in the queue."""
    d = cfg.data
    _check(d.train, "no training data", "--data DIR (train.beton/val.beton for ffcv, train/ val/ otherwise) or --set "
           "data.train=... --set data.val=...")
    if Path(d.train).parent == DEMO_DATA and not Path(d.train).exists():
        return  # the demo set is generated just before training
    ffcv = d.loader == "ffcv"
    kind = f"a .beton file (convert with {command()} -m data_loaders.convert)" if ffcv else "an ImageFolder dir"
    for key, path in (("data.train", d.train), ("data.val", d.val)):
        _check(Path(path).is_file() if ffcv else Path(path).is_dir(), f"{key}={path} (loader {d.loader})",
               f"{kind} that exists")
    train = class_names(d, "train")
    cfg.model.num_classes = cfg.model.num_classes or len(train)
    check_classes(train, d.train, cfg.model.num_classes)
    check_classes(class_names(d, "val"), d.val, cfg.model.num_classes, train)


def run_local(plan: Plan, log_dir: str, interface: str | None):
    """All ranks as local processes through torch's elastic launcher (as torchrun); returns rank 0's RunResult.

    This is what torchrun cannot be: torchrun ends every failure and signal in its own traceback and exit 1 after
    one error line per rank, its agent listens on every interface, and its ranks outlive a ``kill -9`` of it.
    Nothing listens beyond this machine: torch's TCPStore binds every interface, so this process serves the store
    from a socket bound to 127.0.0.1 (the static rendezvous and the ranks share it), and gloo/NCCL use the loopback.
    Rank 0 writes to this terminal, the other ranks into ``log_dir``. A failing rank raises RankFailed (one line,
    rank 0's error when it has one). Ctrl-C reaches every rank from the terminal and SIGTERM is passed on by the
    agent: the ranks save and stop, and this raises KeyboardInterrupt or Terminated. Each rank gets SIGTERM when
    this process dies, however it dies."""
    from torch.distributed import TCPStore
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from data_loaders.synthetic import ensure_demo_data

    if plan.demo:
        ensure_demo_data(plan.cfg.data, plan.cfg.model.num_classes)
    env = {**slurm.interface_env(interface or "lo"), **os.environ, "OMP_NUM_THREADS": str(plan.cpus_per_task)}
    os.environ.update(env)  # the user's own variables win, except OMP_NUM_THREADS: cpus_per_task already honours it
    for name in [*logging.root.manager.loggerDict, "torch.multiprocessing"]:  # a failure is one line, below
        if name.startswith(("torch.distributed.elastic", "torch.multiprocessing")):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # each elastic module sets its own level
    n = plan.ranks_per_node
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
        _store = TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, master_listen_fd=sock.fileno(),
                          wait_for_workers=False)
        logs = DefaultLogsSpecs(log_dir=log_dir, redirects={rank: Std.ALL for rank in range(1, n)})
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"local-{port}", max_restarts=0,
                              rdzv_backend="static", rdzv_endpoint=f"127.0.0.1:{port}", rdzv_configs={"rank": 0},
                              monitor_interval=1, logs_specs=logs)
        try:
            return elastic_launch(config, _rank)(plan.cfg, os.getpid())[0]
        except ChildFailedError as e:
            raise _rank_failed(e) from None
        except SignalException as e:
            if e.sigval != signal.SIGINT:
                raise Terminated(e.sigval) from None
            raise KeyboardInterrupt from None


def _rank_failed(e) -> RankFailed:
    """One line for torch's ChildFailedError: rank 0's error when it has one, else the first rank's."""
    rank, failure = (0, e.failures[0]) if 0 in e.failures else e.get_first_failure()
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
    message = (message or "no message").splitlines()[0]
    return RankFailed(f"rank {rank} failed: {message} (its log and traceback: {Path(failure.error_file).parent})",
                      failure.exitcode)


def _rank(cfg: RunConfig, launcher: int):
    """One local rank: ``pipeline.trainer.run``, stopped with SIGTERM (it saves, then exits) when the launcher dies.

    A run stopped by SIGTERM or Ctrl-C exits here with 143 or 130: the elastic wrapper would otherwise hand its
    result to a launcher that is shutting down (or dead) and wait for it to be read, until SIGKILL 30 s later. An
    error of ours is recorded as the elastic wrapper records any (the launcher reads its line from the error file),
    and the rank exits with its exit code, which is how the launcher tells a user's error from a bug."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    from pipeline.trainer import run

    paths_as_bytes()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != launcher:  # it died before the prctl: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)
    try:
        result = run(cfg)
    except SovitError as e:
        get_error_handler().record_exception(e)
        raise SystemExit(e.exit_code) from None
    if result.signal in ("SIGTERM", "SIGINT"):
        raise SystemExit(128 + signal.Signals[result.signal])
    return result
