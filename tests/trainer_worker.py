"""Run under torchrun by tests/test_engine.py and tests/test_resume_elastic.py, with ``pipeline.trainer`` on every
rank. ``train ROOT RUN_DIR``: a short training with every ``torch.distributed`` collective watched; prints (rank 0)
whether the ranks hold identical BatchNorm statistics after the final eval, and every collective call that broke
the device contract. ``resumed RUN_DIR OVERRIDES_JSON``: builds the trainer (which resumes, elastically when the
world size changed) and prints how far its weights are from the consolidated weights of the tag it resumed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import checkpoint, distributed, export, trainer
from pipeline.config import load_config

LIBRARY = Path(trainer.__file__).resolve().parent.parent
WATCHED = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter", "barrier",
           "broadcast_object_list", "all_gather_object")


def watch_collectives() -> list[str]:
    """Wrap torch.distributed's collectives: a tensor off the rank's device, or a call from a library module other
    than pipeline/distributed.py, is recorded (and the call still runs)."""
    violations: list[str] = []
    for name in WATCHED:
        real = getattr(dist, name)

        def guard(*args, _real=real, _name=name, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if tensor is not None and tensor.device != distributed.device():
                violations.append(f"{_name} got a tensor on {tensor.device} from {caller}")
            ours = caller.is_relative_to(LIBRARY) and not {"tests", "site-packages"} & set(caller.parts)
            if ours and caller.name != "distributed.py":
                violations.append(f"{_name} called directly from {caller.relative_to(LIBRARY)}")
            return _real(*args, **kwargs)

        setattr(dist, name, guard)
    return violations


def train(root: Path, run_dir: Path) -> dict:
    cfg = load_config(overrides=[
        "model.arch=sovit_7", "model.img_size=32", "data.img_size=32", "model.num_classes=4",
        "data.loader=torchvision", f"data.train={root / 'train'}", f"data.val={root / 'val'}",
        "data.micro_batch_size=2", "data.workers=0", "data.auto_augment=null", "train.global_batch_size=4",
        "train.precision=fp32", "train.max_steps=4", "train.log_every_steps=2", "train.stop_check_every_steps=1",
        "schedule.epochs=3", "schedule.warmup_epochs=0", "schedule.cooldown_epochs=0", "mixup.mixup=0",
        "mixup.cutmix=0", "ema.enabled=true", "ema.decay=0.5", f"checkpoint.run_dir={run_dir}",
        "checkpoint.every_steps=2", "tracking.enabled=false"])
    violations = watch_collectives()
    info = distributed.init()
    run_dir.mkdir(parents=True, exist_ok=True)
    t = trainer.Trainer(cfg, info, run_dir)
    with trainer.StopSignals() as stop:
        result = t.train(stop)
    stats = {f"{prefix}{k}": v.clone() for prefix, module in (("", t.engine.module), ("ema.", t.ema.module))
             for k, v in module.state_dict().items() if "running_" in k}
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, stats)
    identical = all(torch.equal(gathered[0][k], other[k]) for other in gathered[1:] for k in stats)
    return {"status": result.status, "bn_identical": identical, "bn_buffers": len(stats), "violations": violations}


def resumed(run_dir: Path, overrides: list[str]) -> dict:
    """ZeRO-1 keeps whole parameters on every rank, so rank 0's module holds the resumed weights."""
    cfg = load_config(overrides=overrides)
    info = distributed.init()
    tag = checkpoint.ordered_tags(run_dir)[0]
    t = trainer.Trainer(cfg, info, run_dir)
    saved = export.consolidated_state_dict(run_dir, tag=tag)
    now = {k: v.detach().float() for k, v in t.engine.module.state_dict().items()}
    return {"tag": tag, "step": t.state.step, "keys_equal": saved.keys() == now.keys(),
            "max_abs_diff": max((saved[k] - now[k]).abs().max().item() for k in saved)}


def main() -> None:
    mode = sys.argv[1]
    out = train(Path(sys.argv[2]), Path(sys.argv[3])) if mode == "train" else \
        resumed(Path(sys.argv[2]), json.loads(sys.argv[3]))
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
