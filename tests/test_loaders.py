"""One contract, three loaders: sharding, shapes and ranges, exact skipping, clear errors, FFCV's CPU hang guard."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import data_loaders
from data_loaders.base import rank_indices
from pipeline.config import DataConfig

CPU = torch.device("cpu")
LOADERS = ["torchvision", "dali", "ffcv"]


def cfg_for(loader, root, betons, **kw):
    paths = ({"train": str(betons["train"]), "val": str(betons["val"])} if loader == "ffcv" else
             {"train": str(root / "train"), "val": str(root / "val")})
    base = {"micro_batch_size": 4, "workers": 1, "img_size": 32, "auto_augment": None, "reprob": 0.0,
            "color_jitter": 0.0}
    return DataConfig(loader=loader, **paths, **{**base, **kw})


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [20, 48, 7])
def test_rank_indices_are_disjoint_complete_and_equal(world, n):
    val = [rank_indices(n, "val", r, world, 4, 0, 0) for r in range(world)]
    assert sorted(i for v in val for i in v) == list(range(n))
    train = [set(rank_indices(n, "train", r, world, 2, 0, 3).tolist()) for r in range(world)]
    assert len({len(t) for t in train}) == 1 and all(not (a & b) for a in train for b in train if a is not b)
    assert list(rank_indices(n, "train", 0, world, 2, 0, 3)) != list(rank_indices(n, "train", 0, world, 2, 0, 4))


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("world", [2, 3])
def test_val_shards_cover_every_sample_once_and_train_lengths_match(loader, world, synthetic_root, synthetic_betons):
    cfg = cfg_for(loader, synthetic_root, synthetic_betons)
    labels, lengths = [], []
    for rank in range(world):
        val = data_loaders.build(cfg, "val", rank, world, CPU, num_classes=4)
        got = [y for _, y in val]
        assert len(got) == len(val)
        labels += torch.cat(got).tolist()
        lengths.append(len(data_loaders.build(cfg, "train", rank, world, CPU, num_classes=4)))
    assert sorted(labels) == sorted([c for c in range(4) for _ in range(5)])  # 20 val images, each once
    assert len(set(lengths)) == 1 and lengths[0] == (48 // world) // 4


@pytest.mark.parametrize("loader", LOADERS)
def test_batches_have_the_contract_shape_dtype_and_range(loader, synthetic_root, synthetic_betons):
    cfg = cfg_for(loader, synthetic_root, synthetic_betons)
    for split in ("train", "val"):
        dl = data_loaders.build(cfg, split, 0, 1, CPU, num_classes=4)
        dl.set_epoch(0)
        batches = list(dl)
        assert len(batches) == len(dl) == (12 if split == "train" else 5)
        x, y = batches[0]
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert -2.2 < x.min() < 0 < x.max() < 2.7  # ImageNet-normalised 0..255 pixels
        assert dl.classes == ["class_00", "class_01", "class_02", "class_03"]


def test_eval_transforms_agree_across_loaders(synthetic_root, synthetic_betons):
    first = {}
    for loader in LOADERS:
        dl = data_loaders.build(cfg_for(loader, synthetic_root, synthetic_betons, img_size=48), "val", 0, 1, CPU)
        first[loader] = next(iter(dl))
    for loader in ("dali", "ffcv"):
        assert torch.equal(first[loader][1], first["torchvision"][1])
        assert (first[loader][0] - first["torchvision"][0]).abs().mean() < 0.12  # resize kernels differ slightly


def test_torchvision_start_batch_resumes_the_epoch_exactly(synthetic_root, synthetic_betons):
    cfg = cfg_for("torchvision", synthetic_root, synthetic_betons, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    dl = data_loaders.build(cfg, "train", 1, 2, CPU)
    dl.set_epoch(3)
    full = list(dl)
    dl.set_epoch(3, start_batch=2)
    tail = list(dl)
    assert len(tail) == len(full) - 2
    for (a, la), (b, lb) in zip(full[2:], tail, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_ffcv_start_batch_skips_the_same_samples(synthetic_root, synthetic_betons):
    dl = data_loaders.build(cfg_for("ffcv", synthetic_root, synthetic_betons), "train", 0, 2, CPU)
    dl.set_epoch(1)
    full = [y for _, y in dl]
    dl.set_epoch(1, start_batch=3)
    assert [y.tolist() for _, y in dl] == [y.tolist() for y in full[3:]]


def test_dali_resumes_from_its_checkpoint(synthetic_root, synthetic_betons):
    cfg = cfg_for("dali", synthetic_root, synthetic_betons)
    a = data_loaders.build(cfg, "train", 0, 1, CPU)
    it = iter(a)
    for _ in range(4):
        next(it)
    state = a.state_dict()
    rest = list(it)
    b = data_loaders.build(cfg, "train", 0, 1, CPU)
    b.load_state_dict(state)
    b.set_epoch(0, start_batch=4)
    resumed = list(b)
    assert len(resumed) == len(rest) == 8
    for (x, y), (x2, y2) in zip(rest, resumed, strict=True):
        assert torch.equal(y, y2) and torch.equal(x, x2)
    with pytest.raises(ValueError, match="load_state_dict"):
        b.set_epoch(5, start_batch=2)


@pytest.mark.parametrize("loader", LOADERS)
def test_bad_inputs_are_one_clear_line(loader, synthetic_root, synthetic_betons, tmp_path):
    cfg = cfg_for(loader, synthetic_root, synthetic_betons)
    with pytest.raises(ValueError, match=r"model\.num_classes=10"):
        data_loaders.build(cfg, "train", 0, 1, CPU, num_classes=10)
    missing = cfg_for(loader, tmp_path / "nope", {"train": tmp_path / "no.beton", "val": tmp_path / "no.beton"})
    with pytest.raises(ValueError, match="does not exist"):
        data_loaders.build(missing, "train", 0, 1, CPU)


def test_beton_without_fields_or_sidecar_is_rejected(tmp_path, synthetic_betons):
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    odd = tmp_path / "odd.beton"
    DatasetWriter(str(odd), {"y": IntField()}, num_workers=1).from_indexed_dataset([(1,), (2,)])
    cfg = DataConfig(loader="ffcv", train=str(odd), val=str(odd))
    with pytest.raises(ValueError, match="expected 'image'"):
        data_loaders.build(cfg, "train", 0, 1, CPU)
    lone = tmp_path / "lone.beton"
    lone.write_bytes(synthetic_betons["train"].read_bytes())
    with pytest.raises(ValueError, match=r"\.json is missing"):
        data_loaders.build(DataConfig(loader="ffcv", train=str(lone)), "train", 0, 1, CPU)
    with pytest.raises(ValueError, match="not a directory"):
        data_loaders.build(DataConfig(loader="torchvision", train=str(lone)), "train", 0, 1, CPU)


def test_ffcv_cpu_pipeline_order_does_not_hang(synthetic_betons):
    """FFCV's GPU order without ToDevice hangs inside Loader.__init__; ours must build and yield in seconds."""
    script = textwrap.dedent(f"""
        import torch, data_loaders
        from pipeline.config import DataConfig
        cfg = DataConfig(loader="ffcv", train="{synthetic_betons['train']}", val="{synthetic_betons['val']}",
                         micro_batch_size=4, workers=1, img_size=32)
        x, y = next(iter(data_loaders.build(cfg, "train", 0, 1, torch.device("cpu"))))
        print("ok", tuple(x.shape))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert "ok (4, 3, 32, 32)" in out.stdout, out.stderr[-2000:]


def test_randaugment_posterize_at_full_magnitude_is_black_not_an_error():
    """timm's 'inc1' posterize keeps 0 bits at magnitude 10; Pillow 13 rejects that, which killed training."""
    import numpy as np
    from PIL import Image
    from timm.data import auto_augment

    import data_loaders.torchvision_loader  # noqa: F401  (installs the fix)

    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    out = op(Image.fromarray(np.full((8, 8, 3), 200, np.uint8)))
    assert np.asarray(out).max() == 0
