"""Rank, world and device for this process, from torchrun, SLURM (srun or submitit) or nothing (one process), and
the few collectives the pipeline itself needs.

``deepspeed.init_distributed`` reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT but not SLURM's variables, so a
SLURM task exports them first (submitit's TorchDistributedEnvironment does the parsing). The backend is chosen
at run time: NCCL on CUDA devices, gloo on the CPU (with DeepSpeed's CPU accelerator).

Collectives: NCCL rejects a CPU tensor ("No backend type associated with device type cpu") where gloo accepts it,
so a test suite on gloo cannot see that bug. Every collective of this project's own code therefore goes through
``all_reduce``/``broadcast_object``/``barrier`` below, which put the values on this rank's device themselves;
``tests/test_collectives.py`` fails if any other module calls ``torch.distributed`` collectives directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from pipeline.config import ConfigError

_DEVICE = torch.device("cpu")  # this rank's device, set by init()
_STORE_FILE: Path | None = None  # a lone rank's file store, removed by shutdown()
_EXPORTED: dict[str, str] = {}  # the rank variables export_env() invented for a lone process, removed by shutdown()


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def export_env() -> None:
    """Fill RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT unless a launcher (torchrun) already did.

    A lone process's variables are removed again by ``shutdown()``: left in the environment they would be inherited
    by every subprocess and sbatch started afterwards, making later trainers wait for ranks that never come."""
    if "RANK" in os.environ:
        return
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) >= 1:
        from submitit.helpers import TorchDistributedEnvironment

        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")  # under a plain srun submitit cannot tell by itself
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return
    # a lone process: init() gives it a file store; MASTER_* and LOCAL_RANK only satisfy DeepSpeed's checks
    lone = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}
    os.environ.update(lone)
    _EXPORTED.update(lone)


def free_port() -> int:
    """A free TCP port on the loopback interface (for a local rendezvous or a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_threads(local_world: int) -> int:
    """Intra-op threads for one CPU rank: OMP_NUM_THREADS if the user or launcher set it, else SLURM's
    cpus-per-task, else this process's usable cores shared by the ranks on the node. More threads than cores
    is not a little slower but many times slower: idle OpenMP threads spin while the other rank needs the core.
    """
    for var in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_world))


def init() -> DistInfo:
    check_gpu_expected()
    export_env()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(cpu_threads(local_world))
        _quiet_cpu_deepspeed()
    global _DEVICE
    _DEVICE = device
    import deepspeed

    # one rank needs no TCP store, which would listen on every interface: a file store listens on nothing
    global _STORE_FILE
    _STORE_FILE = _new_store_file() if world == 1 else None
    lone = {"init_method": f"file://{_STORE_FILE}", "rank": 0, "world_size": 1} if _STORE_FILE else {}
    deepspeed.init_distributed(dist_backend=backend, verbose=False, **lone)
    return DistInfo(rank, local_rank, world, local_world, device, backend)


def _new_store_file() -> Path:
    """A lone rank's file store, named after this host and process; this host's stores of processes that died
    without ``shutdown()`` (a kill -9) are removed first, so they do not pile up in the temporary directory. (The
    host in the name keeps a container that shares /tmp but not the process table from judging others' stores.)"""
    tmp, host = Path(tempfile.gettempdir()), socket.gethostname()
    for old in tmp.glob(f"sovit-store-{host}.*"):
        pid = old.name.rsplit(".", 2)[1]
        with contextlib.suppress(OSError):
            if pid.isdigit() and old.stat().st_uid == os.getuid() and not psutil.pid_exists(int(pid)):
                old.unlink()
    return tmp / f"sovit-store-{host}.{os.getpid()}.{uuid.uuid4().hex}"


# the oldest NVIDIA driver branch each CUDA major version runs on (NVIDIA's CUDA toolkit release notes)
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
SLURM_GPU_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS",
                  "SLURM_GPUS_PER_TASK")


def check_gpu_expected() -> None:
    """Refuse to start on the CPU where a GPU was asked for. A driver older than torch's CUDA build makes
    ``torch.cuda.is_available()`` False, and the run would otherwise train on the CPU with gloo, quietly and ~100x
    slower."""
    asked = gpu_requests()
    if torch.cuda.is_available() or not asked:
        return
    try:
        torch.cuda.init()
        why = "no CUDA device is visible"
    except (RuntimeError, AssertionError) as e:  # torch's own reason: no driver, a driver too old, no CUDA build
        why = str(e).split(". ")[0].splitlines()[0].rstrip(".")
    cuda = torch.version.cuda or ""
    need = MIN_DRIVER.get(int(cuda.split(".")[0] or 0))
    need = f", CUDA {cuda} needs {need} or newer" if need else ""
    raise ConfigError(f"a GPU was expected ({', '.join(f'{k}={v}' for k, v in asked.items())}) but torch "
                      f"{torch.__version__} cannot use one: {why}; NVIDIA driver {_driver_version() or 'not found'}"
                      f"{need}: update the driver or install a torch build for it (not training on the CPU)")


def gpu_requests() -> dict[str, str]:
    """The variables that ask for a GPU: SLURM's GPU allocation (``--gpus*``, ``--gres=gpu``), or
    CUDA_VISIBLE_DEVICES naming a device (not "", "-1" or SLURM's "NoDevFiles", which hide them all)."""
    asked = {k: v for k in SLURM_GPU_VARS if (v := os.environ.get(k, "")) not in ("", "0")}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible and not visible.startswith(("-", "NoDevFiles")):
        asked["CUDA_VISIBLE_DEVICES"] = visible
    return asked


def _driver_version() -> str | None:
    """The loaded NVIDIA kernel module's version (``/proc/driver/nvidia/version``), without CUDA."""
    with contextlib.suppress(OSError, IndexError, StopIteration):
        line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        return next(w for w in line.split() if w[:1].isdigit() and "." in w)
    return None


def _quiet_cpu_deepspeed() -> None:
    """Name DeepSpeed's accelerator instead of letting every rank warn that it fell back to the CPU, keep torch's
    "No CUDA runtime is found" to itself, and build no C++ op.

    DeepSpeed's CPU backend JIT-compiles a shared-memory op (deepspeed_shm_comm) when it starts: minutes of C++ on a
    fresh venv, and again, silently, whenever torch's ninja file changes (the venv reached by another path). Its one
    user is DeepSpeed-inference's tensor-parallel ``inference_all_reduce`` (deepspeed/comm/torch.py); training
    all-reduces through torch.distributed's gloo. Marking the op incompatible in DeepSpeed's own table, the one its
    builder consults, means no process builds it: not evaluate, export or a lone rank, and not a multi-rank run."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    if _STORE_FILE is not None:
        _STORE_FILE.unlink(missing_ok=True)
    for key in _EXPORTED:
        os.environ.pop(key, None)
    _EXPORTED.clear()


def device() -> torch.device:
    """This rank's device: where every tensor handed to a collective must live."""
    return _DEVICE


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(values: torch.Tensor | list[float], op: str = "sum") -> torch.Tensor:
    """Reduce ``values`` over all ranks ("sum", "min" or "max") and return them on this rank's device.

    The values are moved to the rank's device first (a no-op when they are there already), so no caller can hand
    NCCL a CPU tensor. With one process (no process group) the values come back unchanged."""
    tensor = torch.as_tensor(values).to(_DEVICE)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_agree(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank (one small all-reduce; syncs with the device)."""
    return bool(all_reduce([int(flag)], "min").item())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one rank."""
    return bool(all_reduce([int(flag)], "max").item())


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (pickled; NCCL moves it through the current CUDA device)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_DEVICE)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(device_ids=[_DEVICE.index] if _DEVICE.type == "cuda" else None)
