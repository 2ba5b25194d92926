"""The engine's step on one CPU rank, in this process: what would stall a GPU, and what the numbers mean.

On a CPU nothing waits for a device, so a host sync costs nothing here and no timing can show one:
``pipeline.syncs.count_syncs`` counts them instead (DeepSpeed's synchronize calls, and every read of a tensor's value
by the host, each of which waits for the GPU queue to drain on CUDA).
"""

from __future__ import annotations

import gc

import pytest
import timm
import torch

import pipeline.models  # noqa: F401  (registers sovit_* with timm)
from pipeline import distributed, engine
from pipeline.config import ConfigError, load_config
from pipeline.syncs import count_syncs


@pytest.fixture(scope="module")
def one_rank():
    """One process group for the module: DeepSpeed caches its groups, and a second init in this process would meet
    the stale ones. Set up before each test's environment snapshot, so the rank variables live for the module."""
    info = distributed.init()
    yield info
    distributed.shutdown()


def tiny(stage: int, precision: str = "fp32", micro: int = 4, accum: int = 1, *extra: str):
    """A So-ViT-7 engine at 32 px, 4 classes, seeded weights; its criterion and config."""
    cfg = load_config(overrides=[
        "model.arch=sovit_7", "model.img_size=32", "data.img_size=32", "model.num_classes=4", "model.drop_path_rate=0",
        f"data.micro_batch_size={micro}", f"train.global_batch_size={micro * accum}", f"train.zero_stage={stage}",
        f"train.precision={precision}", "ema.enabled=false", "mixup.mixup=0", "mixup.cutmix=0",
        "mixup.label_smoothing=0", "schedule.warmup_epochs=0", "optim.base_batch_size=4", *extra])
    torch.manual_seed(0)
    eng, _ = engine.build_engine(cfg, timm.create_model("sovit_7", num_classes=4, img_size=32), 1, 100)
    return eng, engine.build_criterion(cfg, None), cfg


def batches(n: int, micro: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(micro, 3, 32, 32, generator=g), torch.randint(0, 4, (micro,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_steady_steps_never_wait_for_the_device(one_rank, stage):
    """Two dozen optimizer steps that do not log: no device synchronize, no host read (DeepSpeed's throughput timer
    alone synchronized twice per step, and ZeRO-1/2 read the gradient norm back every step). A log step computes the
    norm and leaves it on the device too. fp16's loss scaling is checked for host reads in test_fake_cuda.py (fp16
    compute on a CPU is too slow for two dozen steps here)."""
    eng, criterion, _ = tiny(stage, micro=2)
    data = batches(27, micro=2)
    for x, y in data[:3]:  # the first steps build DeepSpeed's lazy state
        engine.train_micro_step(eng, criterion, None, x, y)
    gc.collect()  # an earlier test's engine, destroyed in the window, would synchronize (DeepSpeed's destroy())
    with count_syncs(one_rank.device) as syncs:
        for x, y in data[3:]:
            engine.train_micro_step(eng, criterion, None, x, y)
        _, norm = engine.train_micro_step(eng, criterion, None, *data[0], grad_norm=True)
    assert syncs == {}
    assert torch.is_tensor(norm) and torch.isfinite(norm)
    with count_syncs(one_rank.device) as syncs:  # the counter counts
        engine.check_finite(norm, 0)
    assert syncs == {"item": 1}


def test_bf16_gradients_are_reduced_in_fp32_at_every_stage(one_rank):
    """Under autocast the weight gradients of one backward are bf16 values already; accumulating two micro-batches
    makes sums that bf16 cannot hold. DeepSpeed's default then rounded them to bf16 for the reduction at ZeRO-1
    (measured: 3.9e-3 relative), on one rank, while ZeRO-0 kept fp32. Now every stage reduces what ZeRO-0 has."""
    grads = {}
    for stage in (0, 1, 2):
        eng, criterion, _ = tiny(stage, "bf16", micro=4, accum=2)
        (x0, y0), (x1, y1) = batches(2)
        eng.backward(criterion(eng(x0).float(), y0))
        eng.step()  # not a boundary: accumulates
        eng.backward(criterion(eng(x1).float(), y1))
        assert eng.is_gradient_accumulation_boundary()
        names = {id(p): n for n, p in eng.module.named_parameters()}
        if stage == 0:
            grads[stage] = {n: p.grad for n, p in eng.module.named_parameters()}
        else:  # this rank's reduced partition (all of it on one rank), as the optimizer will read it
            o = eng.optimizer
            grads[stage] = {names[id(p)]: g for ps, gs in zip(o.params_in_partition, o.averaged_gradients.values(),
                                                             strict=True) for p, g in zip(ps, gs, strict=True)}
    exact = grads[0]["blocks.0.mlp.fc1.weight"]
    assert not torch.equal(exact, exact.bfloat16().float())  # the case that rounding would change
    for stage in (1, 2):
        assert grads[stage].keys() == grads[0].keys()
        assert all(torch.equal(grads[stage][n].view_as(g), g) for n, g in grads[0].items()), stage


def test_the_logged_gradient_norm_and_clipping_agree_across_stages(one_rank):
    """The norm the trainer logs, with and without optim.clip_grad, is the same at ZeRO 0, 1 and 2 (fp32): ZeRO-0
    clips itself, ZeRO-1/2 let DeepSpeed clip, ZeRO-1/2 without clipping compute it on log steps only. Clipping at
    0.5, below the norms of ~5-7, changes the later steps' norms, alike at every stage."""
    norms = {}
    for clip in (None, 0.5):
        for stage in (0, 1, 2):
            eng, criterion, cfg = tiny(stage, "fp32", 4, 1, f"optim.clip_grad={clip or 'null'}")
            norms[clip, stage] = [engine.train_micro_step(eng, criterion, None, x, y, grad_norm=True,
                                                          clip_grad=cfg.optim.clip_grad)[1].item()
                                  for x, y in batches(3)]
    assert min(norms[None, 0]) > 1.0
    for clip in (None, 0.5):
        for stage in (1, 2):
            assert norms[clip, stage] == pytest.approx(norms[clip, 0], rel=1e-5), (clip, stage)
    assert norms[0.5, 0][0] == norms[None, 0][0] and norms[0.5, 0][1:] != pytest.approx(norms[None, 0][1:], rel=1e-3)


def test_fp16_at_zero0_halves_the_scale_on_an_overflow_and_logs_the_true_norm(one_rank):
    """An inf in the batch: the step is skipped (weights unchanged) and the loss scale halves; the next step
    updates. The logged norm is of unscaled gradients: within 1% of fp32's at the same weights (measured 0.1%),
    where the scaled one is 65536x."""
    fp32, criterion, _ = tiny(0, "fp32")
    (x, y), = batches(1)
    _, norm32 = engine.train_micro_step(fp32, criterion, None, x, y, grad_norm=True)
    eng, criterion, _ = tiny(0, "fp16")
    _, norm16 = engine.train_micro_step(eng, criterion, None, x, y, grad_norm=True)
    assert norm16.item() == pytest.approx(norm32.item(), rel=1e-2)
    scaler = eng.torch_autocast_z0_gradscaler
    scale, before = scaler.get_scale(), [p.detach().clone() for p in eng.module.parameters()]
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    engine.train_micro_step(eng, criterion, None, bad, y)
    assert scaler.get_scale() == scale / 2
    assert all(torch.equal(a, p) for a, p in zip(before, eng.module.parameters(), strict=True))
    engine.train_micro_step(eng, criterion, None, x, y)
    assert scaler.get_scale() == scale / 2
    assert not all(torch.equal(a, p) for a, p in zip(before, eng.module.parameters(), strict=True))


def test_fp16_under_zero_is_refused_in_one_line():
    for stage in (1, 2, 3):
        with pytest.raises(ConfigError) as e:
            load_config(overrides=["train.precision=fp16", f"train.zero_stage={stage}", "ema.enabled=false"])
        assert str(e.value).startswith("train.precision='fp16' is invalid: expected bf16 or fp32 with "
                                       f"train.zero_stage={stage}, or fp16 with train.zero_stage=0")
        assert "\n" not in str(e.value)
    assert load_config(overrides=["train.precision=fp16", "train.zero_stage=0"]).train.precision == "fp16"


@pytest.mark.parametrize("stage", [0, 1])
def test_the_ema_has_the_trained_models_memory_format(one_rank, synthetic_root, tmp_path, stage):
    """With data.channels_last the engine starts (DeepSpeed's first broadcast could not view a channels_last weight
    as bytes: it crashed before) and the EMA's strides equal the model's: channels_last conv weights at ZeRO-0,
    ZeRO-1's flat contiguous buffers. Unequal strides send timm's foreach lerp to one kernel per tensor."""
    from pipeline.trainer import Trainer

    cfg = load_config(overrides=[
        "model.arch=sovit_7", "model.img_size=32", "data.img_size=32", "model.num_classes=4", "data.loader=torchvision",
        f"data.train={synthetic_root / 'train'}", f"data.val={synthetic_root / 'val'}", "data.micro_batch_size=4",
        "data.workers=0", "train.global_batch_size=4", "train.precision=fp32", "data.channels_last=true",
        f"train.zero_stage={stage}", "train.compile=false", f"checkpoint.run_dir={tmp_path}", "tracking.enabled=false"])
    t = Trainer(cfg, one_rank, tmp_path)
    pairs = list(zip(t.engine.module.parameters(), t.ema.module.parameters(), strict=True))
    convs = [p for p, _ in pairs if p.dim() == 4]
    layout = torch.channels_last if stage == 0 else torch.contiguous_format
    assert all(p.is_contiguous(memory_format=layout) for p in convs)
    assert all(p.is_contiguous() for p in convs) == (stage == 1)  # 1x1 convs are both layouts at once
    assert all(p.stride() == e.stride() for p, e in pairs)


def test_a_compiled_engine_runs_where_synchronize_is_cudas(one_rank, monkeypatch):
    """On a GPU, DeepSpeed's synchronize() is torch.cuda.synchronize(None): its throughput timer called it in the
    compiled forward pre-hook from the third step (dynamo cannot trace it in torch 2.14) and in every step. Given
    CUDA's synchronize here (which fails on this machine whenever it runs), a compiled engine takes four steps."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "synchronize", torch.cuda.synchronize)
    eng, criterion, _ = tiny(0, micro=2)
    eng.compile(backend="eager")  # dynamo's tracing without inductor's code generation
    losses = [engine.train_micro_step(eng, criterion, None, x, y)[0] for x, y in batches(4, micro=2)]
    assert torch.isfinite(torch.stack(losses)).all()
