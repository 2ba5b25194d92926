"""Where a training run executes: SLURM through submitit (the default), ``--local`` on this machine, or nowhere
(``--dry-run`` prints what would be submitted).

    python launchers/submit.py --arch 19 --nodes 4 --data /datasets/imagenet-ffcv   # 32 GPU ranks on SLURM
    python launchers/submit.py --local                                              # the embedded demo
    python launchers/submit.py --arch 19 --nodes 4 --data ... --dry-run             # sbatch script + memory

Everything a user can get wrong (config, world-size arithmetic, data paths, SLURM flags, no ``sbatch``) is
checked here, before anything is submitted: a job that fails in the queue an hour later costs far more than a
one-line error now. Each SLURM task runs ``Trainer``, which calls ``launchers/train.py``'s ``run(cfg)``; on the
time-limit warning signal (``--signal``) or preemption training saves, and submitit requeues the job, which
resumes from ``latest`` in the same run directory and MLflow run.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python launchers/submit.py` without an installed package
    sys.path.insert(0, str(ROOT))

from pipeline.config import CONFIGS_DIR, CheckpointConfig, ConfigError, RunConfig, add_config_args  # noqa: E402
from pipeline.config import config_from_args as _config_from_args  # noqa: E402

DEMO_CONFIG = CONFIGS_DIR / "demo.yaml"
DEMO_DATA = Path("data/synthetic")  # relative to the working directory, like runs/ and mlflow.db
DEMO_PER_CLASS, DEMO_VAL_PER_CLASS, DEMO_IMAGE_SIZE = 200, 50, 64  # 10 classes: 2000 train, 500 val JPEGs
STOP_SIGNAL = "USR1"  # what launchers/train.py stops and saves on
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class UsageError(ValueError):
    """A bad command-line value; the message is one line naming it and the fix."""


# ------------------------------------------------------------------------------------------------ arguments


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
    res.add_argument("--cpus-per-task", type=int, default=10, help="cores per rank (data workers + 2)")
    res.add_argument("--mem", default=None, help="memory per node in SLURM syntax (e.g. 480G, 0 = all)")
    res.add_argument("--time", default="72:00:00", help="time limit, SLURM syntax (minutes, H:M:S, D-H:M:S)")
    for flag in ("partition", "account", "qos", "constraint", "exclude"):
        res.add_argument(f"--{flag}", default=None)
    res.add_argument("--job-name", default=None, help="default: sovit_<arch>")
    res.add_argument("--log-dir", default="logs/submitit", help="submitit pickles and per-task logs (shared FS)")
    res.add_argument("--signal", default="USR1@120",
                     help="USR1@SECONDS: sent this long before the time limit (and on preemption) so training "
                          "saves and the job requeues")
    res.add_argument("--max-requeues", type=int, default=30, help="give up after this many timeouts")
    run = p.add_argument_group("data, tracking, network (shortcuts for --set)")
    run.add_argument("--loader", choices=("ffcv", "dali", "torchvision"), default=None, help="data.loader")
    run.add_argument("--data", default=None,
                     help="dataset dir: train.beton/val.beton (ffcv) or train/ val/ ImageFolders (dali, torchvision)")
    run.add_argument("--run-dir", default=None,
                     help="checkpoint.run_dir; reuse one to resume; default runs/<job-name>-<timestamp>")
    run.add_argument("--mlflow-uri", default=None, help="tracking.uri (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    run.add_argument("--interface", default=None,
                     help="network interface for gloo/NCCL (sets GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)")
    return p


@dataclass(frozen=True)
class Plan:
    """The validated decision: what runs where, with how many ranks."""

    cfg: RunConfig
    nodes: int
    ranks_per_node: int
    demo: bool

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate every argument and resolve the config for the world size; raises UsageError/ConfigError."""
    demo = args.local and args.arch is None and not args.config
    if not (args.local or args.dry_run):
        _require_slurm()
    if args.arch is None and not args.config and not args.local:
        raise UsageError("no model chosen: pass --arch 7|10|14|19 (or --config FILE); the demo config runs with "
                         "--local, or add --config demo")
    _check(args.nodes >= 1, f"--nodes {args.nodes}", "an integer >= 1")
    _check(not (args.local and args.nodes != 1), f"--nodes {args.nodes} with --local",
           "--nodes 1 (--local runs on this machine only)")
    ranks = args.gpus_per_node if args.gpus_per_node is not None else _default_ranks(args.local)
    _check(ranks >= 1, f"--gpus-per-node {ranks}", "an integer >= 1 (ranks per node; add --cpu for CPU nodes)")
    _check(args.cpus_per_task >= 1, f"--cpus-per-task {args.cpus_per_task}", "an integer >= 1")
    _check(args.max_requeues >= 0, f"--max-requeues {args.max_requeues}", "an integer >= 0")
    minutes = parse_time(args.time)
    delay = parse_signal(args.signal)[1]
    _check(delay < minutes * 60, f"--signal {args.signal}", f"a warning time below the time limit ({minutes} min)")
    _check(args.mem is None or re.fullmatch(r"\d+[KMGT]?", args.mem) is not None, f"--mem {args.mem}",
           "a SLURM size such as 480G, 64000M or 0")
    _check(args.interface is None or re.fullmatch(r"[\w.:-]+", args.interface) is not None,
           f"--interface {args.interface}", "an interface name such as ib0 or eth0")

    if demo:
        args.config = [str(DEMO_CONFIG)]
    cfg = _config_from_args(argparse.Namespace(arch=args.arch, config=args.config,
                                               overrides=_shortcut_overrides(args) + args.overrides),
                            world_size=args.nodes * ranks)
    if demo and args.data is None and not cfg.data.train:
        _set_data(cfg, DEMO_DATA.resolve(), must_exist=False)  # generated by ensure_demo_data() before training
    elif args.data is not None:
        _set_data(cfg, Path(args.data).expanduser().resolve(), must_exist=True)
    _check_data(cfg)
    if args.run_dir is None and cfg.checkpoint.run_dir == CheckpointConfig.run_dir:
        name = args.job_name or _default_job_name(cfg, demo)
        cfg.checkpoint.run_dir = f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Absolute paths: SLURM tasks may start in another working directory than this shell.
    cfg.checkpoint.run_dir = str(Path(cfg.checkpoint.run_dir).expanduser().resolve())
    cfg.tracking.uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd()}/mlflow.db"
    return Plan(cfg=cfg, nodes=args.nodes, ranks_per_node=ranks, demo=demo)


def _check(ok: bool, what: str, expected: str) -> None:
    if not ok:
        raise UsageError(f"{what} is invalid: expected {expected}")


def _default_ranks(local: bool) -> int:
    if not local:
        return 8
    import torch

    return torch.cuda.device_count() or 2


def _default_job_name(cfg: RunConfig, demo: bool) -> str:
    return "sovit_demo" if demo else cfg.model.arch


def _require_slurm() -> None:
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise UsageError("sbatch/srun not found on PATH: run on a SLURM login node (or `module load slurm`), add "
                         "--local to train on this machine, or start a test cluster with "
                         "slurm/local-cluster/start.sh (docs/slurm.md)")


def parse_time(text: str) -> int:
    """SLURM time syntax -> whole minutes (SLURM rounds seconds up to minutes too)."""
    m = _TIME.fullmatch(text.strip())
    if not m:
        raise UsageError(f"--time {text!r} is invalid: expected minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    days, a, b, c = m.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = int(a), int(b or 0), int(c or 0)
        seconds = int(days) * 86400 + h * 3600 + mi * 60 + s
    elif c is not None:  # H:M:S
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # M:S
        seconds = int(a) * 60 + int(b)
    else:
        seconds = int(a) * 60
    minutes = -(-seconds // 60)
    _check(minutes >= 1, f"--time {text}", "at least one minute")
    return minutes


def parse_signal(text: str) -> tuple[str, int]:
    """``USR1@120`` -> ("USR1", 120). Only USR1: it is the signal the training loop saves on."""
    name, sep, seconds = text.upper().removeprefix("SIG").partition("@")
    if not sep or name != STOP_SIGNAL or not seconds.isdigit() or int(seconds) < 1:
        raise UsageError(f"--signal {text!r} is invalid: expected {STOP_SIGNAL}@SECONDS (the signal training saves "
                         f"on), e.g. {STOP_SIGNAL}@120")
    return name, int(seconds)


def _shortcut_overrides(args: argparse.Namespace) -> list[str]:
    """The convenience flags as ``--set`` overrides, placed before the user's own ``--set`` (which win)."""
    pairs = {"data.loader": args.loader, "checkpoint.run_dir": args.run_dir, "tracking.uri": args.mlflow_uri}
    return [f"{k}={v}" for k, v in pairs.items() if v is not None]


def _set_data(cfg: RunConfig, root: Path, must_exist: bool) -> None:
    if must_exist and not root.is_dir():
        raise UsageError(f"--data {root} is not a directory: expected a folder with train.beton/val.beton (ffcv) "
                         "or train/ and val/ ImageFolders (dali, torchvision)")
    suffix = ".beton" if cfg.data.loader == "ffcv" else ""
    cfg.data.train, cfg.data.val = str(root / f"train{suffix}"), str(root / f"val{suffix}")


def _check_data(cfg: RunConfig) -> None:
    """Data must exist now, on the submitting machine: SLURM nodes are assumed to share the file system."""
    d = cfg.data
    if not d.train:
        raise UsageError("no training data: pass --data DIR (train.beton/val.beton for ffcv, train/ val/ otherwise) "
                         "or --set data.train=... --set data.val=...")
    if Path(d.train).parent == DEMO_DATA.resolve() and not Path(d.train).exists():
        return  # the demo set is generated just before training
    want_file = d.loader == "ffcv"
    for key, path in (("data.train", d.train), ("data.val", d.val)):
        p = Path(path)
        ok = p.is_file() if want_file else p.is_dir()
        kind = "a .beton file (convert with python -m data_loaders.convert)" if want_file else "an ImageFolder dir"
        _check(ok, f"{key}={path} (loader {d.loader})", f"{kind} that exists")


# ------------------------------------------------------------------------------------------- SLURM / submitit


def slurm_parameters(args: argparse.Namespace, plan: Plan) -> dict:
    """submitit SlurmExecutor parameters: SLURM's own names, so the sbatch script says exactly what we pass."""
    sig, delay = parse_signal(args.signal)
    setup = [f"export SUBMITIT_PREEMPT_SIGNAL={sig}"]
    if args.interface:
        setup.append(f"export GLOO_SOCKET_IFNAME={args.interface} NCCL_SOCKET_IFNAME={args.interface}")
    params = {
        "job_name": args.job_name or _default_job_name(plan.cfg, plan.demo),
        "nodes": plan.nodes,
        "ntasks_per_node": plan.ranks_per_node,
        "cpus_per_task": args.cpus_per_task,
        "time": parse_time(args.time),
        "signal_delay_s": delay,
        "setup": setup,
        "stderr_to_stdout": False,
    }
    if not args.cpu:
        params["gpus_per_node"] = plan.ranks_per_node
    for key in ("partition", "account", "qos", "constraint", "exclude", "mem"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    return params


def log_folder(args: argparse.Namespace) -> Path:
    return (Path(args.log_dir).expanduser().resolve() / "%j")


def sbatch_script(args: argparse.Namespace, plan: Plan) -> str:
    """The script submitit writes for these arguments (same function and command line submitit uses)."""
    from submitit.slurm import slurm as submitit_slurm

    _use_signal(parse_signal(args.signal)[0])
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(log_folder(args)))])
    return submitit_slurm._make_sbatch_string(command=command, folder=log_folder(args),
                                             **slurm_parameters(args, plan))


def _use_signal(name: str) -> None:
    """submitit reads its preemption signal from the environment at import; make this process agree too."""
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = name
    from submitit.core.job_environment import JobEnvironment

    JobEnvironment.USR_SIG = name


def _check_partition_has_gpus(args: argparse.Namespace) -> None:
    """A GPU request on a GPU-less partition pends forever; say so now (skipped when sinfo is unavailable)."""
    import subprocess

    cmd = ["sinfo", "-h", "-o", "%G"] + (["-p", args.partition] if args.partition else [])
    try:
        gres = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return
    if gres and all("gpu" not in g for g in gres):
        where = f"partition {args.partition}" if args.partition else "the default partition"
        raise UsageError(f"--gpus-per-node {args.gpus_per_node or 8}: {where} has no GPUs (sinfo Gres={gres[0]}); "
                         "add --cpu for CPU-only nodes or pick a GPU --partition")


class Trainer:
    """One SLURM task: train; after the warning signal made training save, hand the job to submitit to requeue.

    The training loop (``launchers/train.py``) stops every rank at the same optimizer step on SIGUSR1 and saves.
    Requeueing is left to submitit (``SOVIT_NO_REQUEUE``), whose handler - replaced by the training loop's
    while it runs - is called afterwards: on rank 0 it calls ``checkpoint()``, stores the resubmission with the
    remaining timeout budget (``--max-requeues``), runs ``scontrol requeue`` and exits; on other ranks it does
    nothing. The requeued job calls this again with the same config, which resumes from ``latest``.
    """

    def __call__(self, cfg: RunConfig) -> dict:
        from launchers import train

        os.environ["SOVIT_NO_REQUEUE"] = "1"
        submitit_handler = signal.getsignal(signal.SIGUSR1)
        metrics = train.run(cfg)
        if metrics.get("status") == "KILLED" and callable(submitit_handler):
            submitit_handler(signal.SIGUSR1, None)
        return metrics

    def checkpoint(self, cfg: RunConfig):
        """submitit's hook on rank 0, called once training has saved (or before it started): the same call again."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(Trainer(), cfg)


def submit(args: argparse.Namespace, plan: Plan):
    import submitit

    _use_signal(parse_signal(args.signal)[0])
    if not args.cpu:
        _check_partition_has_gpus(args)
    executor = submitit.SlurmExecutor(folder=log_folder(args), max_num_timeout=args.max_requeues)
    executor.update_parameters(**slurm_parameters(args, plan))
    Path(plan.cfg.checkpoint.run_dir).parent.mkdir(parents=True, exist_ok=True)
    return executor.submit(Trainer(), plan.cfg)


# ------------------------------------------------------------------------------------------------- local


def ensure_demo_data(cfg: RunConfig) -> None:
    """Generate the synthetic ImageFolder and its .beton files under data/synthetic when they are missing."""
    root = Path(cfg.data.train).parent
    if Path(cfg.data.train).exists() and Path(cfg.data.val).exists():
        return
    from data_loaders.convert import ConvertOptions, convert, sidecar_path
    from data_loaders.synthetic import generate

    if not (root / "train").is_dir():
        print(f"demo: generating {cfg.model.num_classes} synthetic classes under {root} ...", flush=True)
        generate(root.parent / f".{root.name}.tmp", classes=cfg.model.num_classes, per_class=DEMO_PER_CLASS,
                 size=DEMO_IMAGE_SIZE, val_per_class=DEMO_VAL_PER_CLASS, seed=0).rename(root)
    if cfg.data.loader == "ffcv":
        opts = ConvertOptions(max_resolution=DEMO_IMAGE_SIZE)  # workers: the cores this process may use
        print(f"demo: converting to {root}/train.beton and val.beton ...", flush=True)
        convert(root / "train", root / "train.beton", options=opts, progress=False)
        convert(root / "val", root / "val.beton", classes_from=sidecar_path(root / "train.beton"), options=opts,
                progress=False)


def _local_rank_main(cfg: RunConfig) -> dict:
    from launchers import train

    return train.run(cfg)


def run_local(plan: Plan) -> dict:
    """All ranks as local processes through torch's elastic launcher (what torchrun does), rank 0's metrics back."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from pipeline.distributed import cpu_threads

    if plan.demo:
        ensure_demo_data(plan.cfg)
    n = plan.ranks_per_node
    os.environ.setdefault("OMP_NUM_THREADS", str(cpu_threads(n)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"sovit-local-{port}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0,
                          monitor_interval=1)
    return elastic_launch(config, _local_rank_main)(plan.cfg)[0]


# -------------------------------------------------------------------------------------------------- dry run


def memory_estimate(cfg: RunConfig, world_size: int) -> str:
    """Per-GPU bytes: params/grads/optimizer as in the ZeRO paper, activations measured on one sample."""
    import timm
    import torch

    import pipeline.models  # noqa: F401  (registers sovit_* with timm)

    model = timm.create_model(cfg.model.arch, num_classes=cfg.model.num_classes, img_size=cfg.model.img_size)
    n = sum(p.numel() for p in model.parameters())
    half = cfg.train.precision in ("bf16", "fp16")
    p_b, g_b, o_b = (2, 2, 12) if half else (4, 4, 8)  # 16-bit weights+grads, fp32 master+Adam m,v (K=12)
    stage = cfg.train.zero_stage
    params = n * p_b / (world_size if stage >= 3 else 1)
    grads = n * g_b / (world_size if stage >= 2 else 1)
    optim = n * o_b / (world_size if stage >= 1 else 1)
    act = _activation_bytes(model, cfg.model.img_size) * cfg.data.micro_batch_size * (0.5 if half else 1.0)
    del model
    torch.cuda.empty_cache()
    gib = 2**30
    total = params + grads + optim + act
    return "\n".join([
        f"# per-GPU memory ESTIMATE: {cfg.model.arch}, {n / 1e6:.1f}M params, {cfg.train.precision}, "
        f"ZeRO stage {stage}, world {world_size}, micro-batch {cfg.data.micro_batch_size}",
        f"#   parameters   {params / gib:7.2f} GiB",
        f"#   gradients    {grads / gib:7.2f} GiB",
        f"#   optimizer    {optim / gib:7.2f} GiB  (fp32 master weights + Adam moments)",
        f"#   activations  {act / gib:7.2f} GiB  (saved for backward, measured on one sample and scaled)",
        f"#   total        {total / gib:7.2f} GiB  + CUDA context, DeepSpeed buffers and fragmentation "
        "(typically 1-3 GiB more)",
    ])


def _activation_bytes(model, img_size: int) -> int:
    """Bytes autograd saves for backward for one fp32 sample, each storage counted once."""
    import torch

    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter) and t.device.type == "cpu":
            st = t.untyped_storage()
            seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return t

    model.train()
    x = torch.randn(1, 3, img_size, img_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(b for (ptr, _), b in seen.items() if ptr not in params)


# --------------------------------------------------------------------------------------------------- main


def _print_resolved(cfg: RunConfig) -> None:
    import yaml

    print("# resolved config")
    print(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False), end="")


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def _watch_hints(cfg: RunConfig) -> str:
    return f"mlflow ui --backend-store-uri {cfg.tracking.uri}   # then open http://127.0.0.1:5000"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = make_plan(args)
    except (UsageError, ConfigError) as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    cfg = plan.cfg
    if args.dry_run:
        _print_resolved(cfg)
        if not args.local:
            print("# sbatch script (submitit writes it to the log dir, with %j the job id)")
            print(sbatch_script(args, plan))
        print(memory_estimate(cfg, plan.world_size))
        return 0
    if args.local:
        t0 = time.time()
        metrics = run_local(plan)
        top1 = metrics.get("val_top1")
        print(f"done in {time.time() - t0:.0f} s on {plan.world_size} local ranks: validation top-1 "
              + (f"{top1:.2f}%" if top1 is not None else "not evaluated"))
        print(f"run dir {cfg.checkpoint.run_dir}\nwatch: {_watch_hints(cfg)}")
        return 0
    job = submit(args, plan)
    folder = Path(str(log_folder(args)).replace("%j", str(job.job_id)))
    print(f"submitted job {job.job_id}: {plan.nodes} node(s) x {plan.ranks_per_node} rank(s), {cfg.model.arch}")
    print(f"  logs     {folder}/{job.job_id}_<rank>_log.out (.err)")
    print(f"  run dir  {cfg.checkpoint.run_dir}")
    print(f"  watch    squeue -j {job.job_id}; tail -f {folder}/{job.job_id}_0_log.out")
    print(f"           {_watch_hints(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
