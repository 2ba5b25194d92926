"""Rank, world and device for this process, from torchrun, SLURM (srun or submitit) or nothing (one process).

``deepspeed.init_distributed`` reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT but not SLURM's variables, so a
SLURM task exports them first (submitit's TorchDistributedEnvironment does the parsing). The backend is chosen
at run time: NCCL on CUDA devices, gloo on the CPU (with DeepSpeed's CPU accelerator).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


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
    """Fill RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT unless a launcher (torchrun) already did."""
    if "RANK" in os.environ:
        return
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) >= 1:
        from submitit.helpers import TorchDistributedEnvironment

        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")  # under a plain srun submitit cannot tell by itself
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return
    with socket.socket() as s:  # a lone process: a private rendezvous on a free local port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


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
    export_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(cpu_threads(local_world))
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistInfo(rank, local_rank, world, local_world, device, backend)


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
