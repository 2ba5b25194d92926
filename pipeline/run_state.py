"""What a checkpoint restores beside DeepSpeed's own model, optimizer and scheduler state, defined in one place:
``RunState`` names the parts, each ``Stateful`` (``state_dict`` / ``load_state_dict``, as torchtitan's checkpointer
takes them) and saved under its field's name by ``checkpoint.save``, restored by ``checkpoint.resume``.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class RunState:
    """The parts of a run a checkpoint restores beside DeepSpeed's own state, each saved under its field's name.

    ``SHARED`` parts are alike on every rank and go into DeepSpeed's client state (the top level of its model-states
    file, where ``pipeline.export`` finds the EMA); ``PER_RANK`` parts are this rank's own (``rank{N:05d}.pt``),
    which a resume on another world size cannot use: it restores the shared ones only."""

    SHARED: ClassVar = ("train_state", "ema")
    PER_RANK: ClassVar = ("rng", "loader")

    train_state: Stateful  # where the run is: epoch, step, best result, MLflow run id
    ema: Stateful | None  # the EMA weights, when ema.enabled
    rng: Stateful  # every RNG a step draws from
    loader: Stateful  # the train loader's position (and its augmentation state, where it has one)

    def shared(self) -> dict[str, Any]:
        return {key: _state(getattr(self, key)) for key in self.SHARED}

    def per_rank(self) -> dict[str, Any]:
        return {key: _state(getattr(self, key)) for key in self.PER_RANK}

    def load(self, shared: dict[str, Any], per_rank: dict[str, Any] | None) -> None:
        """Every part found in the saved states; ``per_rank`` is None after a resume on another world size."""
        saved = {**shared, **(per_rank or {})}
        for key in (*self.SHARED, *(self.PER_RANK if per_rank is not None else ())):
            part = getattr(self, key)
            if part is not None and saved.get(key) is not None:
                part.load_state_dict(saved[key])


def _state(part: Stateful | None) -> dict[str, Any] | None:
    return part.state_dict() if part is not None else None


def saved_ema(model_states: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The EMA model's weights in a tag's DeepSpeed model states, keyed as the model's own (timm's ModelEmaV3 holds
    them as its ``module``); None when ema.enabled was false."""
    ema = model_states.get("ema")
    return {k.removeprefix("module."): v for k, v in ema.items()} if ema is not None else None


class RNGState:
    """Every RNG a step draws from, as a part of ``RunState``: drop-path (torch), mixup (numpy), Python's own, and
    this rank's CUDA device."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        # this rank's own device only (distributed.init made it current): a resume where a node shows fewer GPUs, at
        # the same world size, has no state for the others to restore
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if torch.is_tensor(state["cuda"]) and torch.cuda.is_available():  # CPU checkpoints hold none ([] before)
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint, restored on resume."""

    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch this rank has consumed
    step: int = 0  # optimizer steps
    accum: int = 1  # micro-batches per optimizer step when saved (elastic resume converts positions)
    best_top1: float | None = None  # what picks best.safetensors: the EMA's top-1 when there is an EMA
    best_epoch: int | None = None
    best_eval: dict[str, float] = field(default_factory=dict)  # that evaluation: top1, top5, ema_top1, ...
    mlflow_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])
