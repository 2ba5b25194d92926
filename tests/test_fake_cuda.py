"""The GPU step path on a fake CUDA device (torch's FakeTensorMode), on a CPU-only machine.

Fake tensors carry a device and shapes but no data: an op mixing a fake CUDA tensor with a CPU one raises
(FakeTensorDeviceMismatchError), and reading a value on the host (``.item()``, ``bool()``) raises too, since there is
no value. On top of that, ``OnDevice`` fails on the first op that returns a tensor off the device, so a tensor the
step creates on the CPU fails here even where a real GPU would have copied it silently.

What runs: the FFCV loader's device normalisation, mixup, the model's forward in channels_last under autocast, the
criterion and loss, fp16 loss scaling, the gradient norm and clip, the fused AdamW update, the EMA update and the
eval step. The backward cannot run: torch's autograd engine asks the CUDA driver for the device before it runs
any backward node, fake or not (``hasPrimaryContext expects a valid device index``), so the update runs on fake
gradients of the parameters' shapes and strides. The model has no custom autograd function: its backward is
torch's derivatives of the forward's ops, on the forward's devices.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.utils import ModelEmaV3
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pipeline.models  # noqa: F401  (registers sovit_* with timm)
from data_loaders.ffcv_loader import DeviceNormalize
from pipeline import engine
from pipeline.config import load_config

CUDA = torch.device("cuda", 0)


class OnDevice(TorchDispatchMode):
    """Fails on the first op whose output is not on the CUDA device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "cuda":
                raise AssertionError(f"{func} made a tensor on {t.device}")
        return out


@pytest.fixture
def fake_cuda() -> FakeTensorMode:
    return FakeTensorMode()


def cuda_amp(monkeypatch) -> tuple:
    """fp16 and bf16 autocast and a GradScaler for CUDA: their constructors ask whether CUDA (and bf16) is there and
    switch themselves off if not, so torch is told yes while they are built, and only then (ops that see
    ``is_available()`` true would try the real driver)."""
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        return (torch.autocast("cuda", dtype=torch.float16), torch.autocast("cuda", dtype=torch.bfloat16),
                torch.amp.GradScaler("cuda"))


def to_fake_cuda(modules: list[torch.nn.Module], mode: FakeTensorMode) -> None:
    """Replace every parameter and buffer by a fake CUDA copy, 4-D ones channels_last (as the trainer's model is)."""

    def fake(t: torch.Tensor) -> torch.Tensor:
        f = mode.from_tensor(t.detach())
        with mode:
            return f.to(CUDA, memory_format=torch.channels_last if f.dim() == 4 else torch.preserve_format)

    for m in (sub for module in modules for sub in module.modules()):
        for name, p in list(m.named_parameters(recurse=False)):
            setattr(m, name, torch.nn.Parameter(fake(p), requires_grad=p.requires_grad))
        for name, b in list(m.named_buffers(recurse=False)):
            m._buffers[name] = fake(b)


def tiny_cfg(*overrides: str):
    return load_config(overrides=["model.arch=sovit_7", "model.img_size=32", "data.img_size=32",
                                  "model.num_classes=4", "data.micro_batch_size=4", "train.global_batch_size=4",
                                  "optim.clip_grad=1.0", *overrides])


def test_the_training_and_eval_step_stay_on_the_gpu(fake_cuda, monkeypatch):
    """Two steps: mixup with NCHW loader output, then cutmix with channels_last output."""
    cfg = tiny_cfg()
    model = timm.create_model("sovit_7", num_classes=4, img_size=32)
    ema = ModelEmaV3(model, decay=0.9)  # built on the CPU: it makes a CUDA generator, which a fake device lacks
    to_fake_cuda([model, ema.module], fake_cuda)
    fp16, bf16, scaler = cuda_amp(monkeypatch)
    with fake_cuda:
        optimizer = engine.build_optimizer(cfg, model)
        criterion = engine.build_criterion(cfg, engine.build_mixup(cfg))
        uint8 = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, device=CUDA).permute(0, 3, 1, 2)
        labels = torch.randint(0, 4, (4,), device=CUDA)
        for step, (channels_last, only) in enumerate([(False, "mixup.cutmix=0"), (True, "mixup.mixup=0")], 1):
            normalize = DeviceNormalize(cfg.data.mean, cfg.data.std, channels_last, CUDA)
            mixup = engine.build_mixup(tiny_cfg(only))
            with OnDevice():
                images = normalize(uint8)  # what the FFCV loader yields on a GPU
                mixed, targets = mixup(images, labels)
                with fp16:
                    logits = model(mixed.contiguous(memory_format=torch.channels_last))
                loss = scaler.scale(criterion(logits.float(), targets))
                for p in model.parameters():  # the backward's place (see the module docstring)
                    p.grad = torch.randn_like(p)
                scaler.unscale_(optimizer)
                norm = engine.grad_norm_(list(model.parameters()), cfg.optim.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                ema.update(model, step=step)
                model.eval()
                sums = engine.eval_step(model, images, labels, bf16)
                model.train()
            layout = torch.channels_last if channels_last else torch.contiguous_format
            assert images.dtype == torch.float32 and images.is_contiguous(memory_format=layout)
            assert logits.dtype == torch.float16 and loss.shape == () and norm.device == CUDA
            assert sums.device == CUDA and sums.shape == (3,)
    assert scaler.is_enabled()


def test_a_cpu_tensor_in_the_step_fails(fake_cuda):
    """The guards are live: CPU labels in the eval step, or a CPU tensor created on the way, fail."""
    model = timm.create_model("sovit_7", num_classes=4, img_size=32)
    to_fake_cuda([model], fake_cuda)
    with fake_cuda:
        images = torch.randn(2, 3, 32, 32, device=CUDA)
        cpu_labels = torch.zeros(2, dtype=torch.long)
        with pytest.raises(FakeTensorDeviceMismatchError):
            engine.eval_step(model.eval(), images, cpu_labels, torch.autocast("cuda", enabled=False))
        with OnDevice(), pytest.raises(AssertionError, match="made a tensor on cpu"):
            images + torch.ones(())
