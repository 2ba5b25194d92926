"""Counting what makes the host wait for the device: the check every change to the step comes with.

A host sync costs nothing on a CPU, so no CPU timing shows one, and on a GPU it costs the whole queue ahead of it.
``count_syncs()`` counts, by kind, while its block runs:

- ``synchronize``: DeepSpeed's ``get_accelerator().synchronize()`` (its throughput timer's, for one);
- on a CPU, every read of a tensor's value by the host (``item``, ``__bool__``, ``tolist``, ...), each of which would
  wait for the GPU queue to drain on CUDA;
- on CUDA, every synchronizing CUDA call torch sees (``torch.cuda.set_sync_debug_mode``: ``.item()``, a copy to
  pageable host memory, a stream or device synchronize), as ``cuda``.

The host reads are counted by a ``TorchFunctionMode``, which torch.compile would have to trace; CUDA's own debug
mode needs none, so a compiled model is counted as it runs.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

HOST_READS = frozenset({"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"})


class _HostReads(TorchFunctionMode):
    def __init__(self, counts: collections.Counter[str]):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_syncs(device: torch.device) -> Iterator[collections.Counter[str]]:
    """``{kind: calls}`` of the block (empty when nothing synced); ``device`` says which counters apply."""
    from deepspeed.accelerator import get_accelerator

    counts: collections.Counter[str] = collections.Counter()
    accelerator = get_accelerator()
    real, patched_before = accelerator.synchronize, vars(accelerator).get("synchronize")

    def synchronize(*args, **kwargs):
        counts["synchronize"] += 1
        return real(*args, **kwargs)

    accelerator.synchronize = synchronize
    try:
        if device.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    yield counts
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts["cuda"] += sum("synchronizing operation" in str(w.message) for w in caught)
        else:
            with _HostReads(counts):
                yield counts
    finally:
        if patched_before is None:
            del accelerator.synchronize  # the class's method shows again
        else:
            accelerator.synchronize = patched_before
    for kind in [k for k, v in counts.items() if not v]:
        del counts[kind]
