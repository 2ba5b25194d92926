"""Per-step training metrics: throughput, data-wait fraction, step time, peak memory and MFU."""

from __future__ import annotations

import resource
import time

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, for MFU; unknown devices report no MFU.
GPU_BF16_PEAK_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0,
                        "L4": 121.0, "V100": 125.0}


def peak_tflops(configured: float | None, device: torch.device) -> float | None:
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_BF16_PEAK_TFLOPS.items() if k in name), None)
    return None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StepMeter:
    """Accumulates time spent waiting for data vs computing between two ``report`` calls.

    ``images_per_s`` is the whole job's rate (the global batch); MFU is per device: the FLOPs one device did over
    that one device's peak, which is the job's rate divided by the world size over the same peak.
    Time that is not training (eval, checkpoint saves) is excluded with ``pause``."""

    def __init__(self, global_batch: int, world_size: int, flops_per_image: int, peak: float | None,
                 device: torch.device):
        self.global_batch, self.world_size = global_batch, world_size
        self.flops, self.peak, self.device = flops_per_image, peak, device
        self._reset()

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` of non-training work (eval, a save) out of the current interval."""
        self.start += seconds

    def _reset(self) -> None:
        self.start = time.perf_counter()
        self.wait = 0.0
        self.steps = 0

    def data_wait(self, seconds: float) -> None:
        self.wait += seconds

    def step(self) -> None:
        self.steps += 1

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        images_per_s = self.steps * self.global_batch / elapsed
        out = {"images_per_s": images_per_s, "step_time_s": elapsed / max(self.steps, 1),
               "data_wait_frac": min(1.0, self.wait / elapsed), "peak_mem_gib": peak_memory_gib(self.device)}
        if self.peak:  # training FLOPs ~ 3x forward (backward is twice the forward)
            out["mfu"] = 3 * self.flops * images_per_s / self.world_size / (self.peak * 1e12)
        self._reset()
        return out
