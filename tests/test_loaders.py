"""One contract, three loaders: sharding, shapes and ranges, exact resume, clear errors, FFCV's CPU hang guard."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import data_loaders
from data_loaders import DataError, sidecar_path
from data_loaders.base import rank_indices
from data_loaders.folders import list_samples
from pipeline.config import ConfigError, DataConfig

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
    """Identity, not just labels: each val image (its eval-transformed pixels) is seen exactly once across the
    ranks, as in a single-rank pass."""
    cfg = cfg_for(loader, synthetic_root, synthetic_betons)

    def samples(rank: int, world: int) -> list[tuple[int, bytes]]:
        val = data_loaders.build(cfg, "val", rank, world, CPU, num_classes=4)
        got = [(x.clone(), y.clone()) for x, y in val]  # FFCV cycles through a few output buffers
        assert len(got) == len(val)
        return [(int(y), x.numpy().tobytes()) for xs, ys in got for x, y in zip(xs, ys, strict=True)]

    everything = sorted(samples(0, 1))
    assert len(everything) == 20 and len({x for _, x in everything}) == 20  # 20 distinct val images
    assert sorted(s for rank in range(world) for s in samples(rank, world)) == everything
    lengths = [len(data_loaders.build(cfg, "train", rank, world, CPU, num_classes=4)) for rank in range(world)]
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
        assert (first[loader][0] - first["torchvision"][0]).abs().mean() < 0.12  # ffcv: a .beton of resized images


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


@pytest.mark.parametrize(("world", "rank"), [(1, 0), (2, 1)])
def test_every_loader_visits_the_same_samples_per_rank_and_epoch(world, rank, synthetic_root, synthetic_betons):
    """base.rank_indices is the one shard: every backend yields its samples, in its order, and skips by it."""
    labels = [label for _, label in list_samples(synthetic_root / "train")]
    want = [labels[i] for i in rank_indices(len(labels), "train", rank, world, 4, 0, 3)]
    for loader in LOADERS:
        dl = data_loaders.build(cfg_for(loader, synthetic_root, synthetic_betons), "train", rank, world, CPU)
        dl.set_epoch(3)
        assert [label for _, y in dl for label in y.tolist()] == want, loader
        dl.set_epoch(3, start_batch=2)
        assert [label for _, y in dl for label in y.tolist()] == want[8:], loader


@pytest.mark.parametrize("loader", LOADERS)
def test_state_dict_resumes_exactly_where_it_was(loader, synthetic_root, synthetic_betons):
    """The trainer's resume: state_dict() mid-epoch, through a checkpoint file, load_state_dict() and the
    set_epoch() it always calls, in a fresh loader; the rest of the epoch and the next one must match."""
    def copies(batches):  # FFCV cycles through a few output buffers
        return [(x.clone(), y.clone()) for x, y in batches]

    cfg = cfg_for(loader, synthetic_root, synthetic_betons)
    a = data_loaders.build(cfg, "train", 1, 2, CPU)  # 24 images on this rank: 6 batches
    a.set_epoch(1)
    it = iter(a)
    next(it), next(it)
    state = pickle.loads(pickle.dumps(a.state_dict()))
    rest = copies(it) + copies(a)
    b = data_loaders.build(cfg, "train", 1, 2, CPU)
    b.load_state_dict(state)
    b.set_epoch(state["epoch"], start_batch=state["batch"])
    resumed = copies(b) + copies(b)
    assert (state["epoch"], state["batch"]) == (1, 2) and len(resumed) == len(rest) == 4 + 6
    for (x, y), (x2, y2) in zip(rest, resumed, strict=True):
        assert torch.equal(y, y2)
        assert loader == "ffcv" or torch.equal(x, x2)  # FFCV draws crops and flips from an unseeded numba RNG


@pytest.mark.parametrize("loader", LOADERS)
def test_val_must_name_the_train_classes_not_just_count_them(loader, synthetic_root, synthetic_betons):
    cfg = cfg_for(loader, synthetic_root, synthetic_betons)
    train = data_loaders.build(cfg, "train", 0, 1, CPU, num_classes=4)
    assert data_loaders.build(cfg, "val", 0, 1, CPU, num_classes=4, classes=train.classes).classes == train.classes
    other = [*train.classes[:2], "dog", "cat"]
    with pytest.raises(DataError, match="has class 'class_02' at index 2 where the train split has class 'dog'"):
        data_loaders.build(cfg, "val", 0, 1, CPU, num_classes=4, classes=other)


@pytest.mark.parametrize("damage", ["empty", "random bytes", "cut in half", "last table entry cut"])
def test_damaged_beton_is_one_data_error_naming_it(damage, tmp_path, synthetic_betons):
    good = synthetic_betons["train"].read_bytes()
    bad = tmp_path / "train.beton"
    bad.write_bytes({"empty": b"", "random bytes": np.random.default_rng(0).bytes(4096),
                     "cut in half": good[:len(good) // 2], "last table entry cut": good[:-24]}[damage])
    sidecar_path(bad).write_bytes(sidecar_path(synthetic_betons["train"]).read_bytes())
    with pytest.raises(DataError, match=re.escape(str(bad))):
        data_loaders.build(DataConfig(loader="ffcv", train=str(bad), micro_batch_size=4), "train", 0, 1, CPU)


@pytest.mark.parametrize("loader", LOADERS)
def test_workers_above_the_usable_cores_warn_once_and_load(loader, synthetic_root, synthetic_betons):
    cores = len(os.sched_getaffinity(0))
    cfg = cfg_for(loader, synthetic_root, synthetic_betons, workers=cores + 3)
    with pytest.warns(UserWarning, match=rf"data\.workers={cores + 3} exceeds the {cores} cores") as warned:
        dl = data_loaders.build(cfg, "train", 0, 1, CPU)
        x, _ = next(iter(dl))
    assert sum("data.workers" in str(w.message) for w in warned) == 1 and x.shape == (4, 3, 32, 32)


@pytest.mark.parametrize("loader", LOADERS)
def test_bad_inputs_are_one_clear_line(loader, synthetic_root, synthetic_betons, tmp_path):
    cfg = cfg_for(loader, synthetic_root, synthetic_betons)
    with pytest.raises(DataError, match=r"model\.num_classes=10"):
        data_loaders.build(cfg, "train", 0, 1, CPU, num_classes=10)
    missing = cfg_for(loader, tmp_path / "nope", {"train": tmp_path / "no.beton", "val": tmp_path / "no.beton"})
    with pytest.raises(DataError, match="does not exist"):
        data_loaders.build(missing, "train", 0, 1, CPU)
    with pytest.raises(ConfigError, match=r"data\.val is not set"):
        data_loaders.build(DataConfig(loader=loader, train=cfg.train), "val", 0, 1, CPU)
    with pytest.raises(ConfigError, match=r"data\.loader='jpeg'"):
        data_loaders.build(DataConfig(loader="jpeg", train=cfg.train), "train", 0, 1, CPU)


def test_beton_without_fields_or_sidecar_is_rejected(tmp_path, synthetic_betons):
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    odd = tmp_path / "odd.beton"
    DatasetWriter(str(odd), {"y": IntField()}, num_workers=1).from_indexed_dataset([(1,), (2,)])
    cfg = DataConfig(loader="ffcv", train=str(odd), val=str(odd))
    with pytest.raises(DataError, match="expected 'image'"):
        data_loaders.build(cfg, "train", 0, 1, CPU)
    lone = tmp_path / "lone.beton"
    lone.write_bytes(synthetic_betons["train"].read_bytes())
    with pytest.raises(DataError, match=r"\.json is missing"):
        data_loaders.build(DataConfig(loader="ffcv", train=str(lone)), "train", 0, 1, CPU)
    with pytest.raises(DataError, match="not a directory"):
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


@pytest.mark.parametrize("channels_last", [True, False])
def test_ffcv_device_normalisation_matches_the_cpu_pipeline(channels_last):
    """On a GPU the FFCV loader normalises in torch (no cupy), from FFCV's uint8 NHWC batch seen as NCHW, into the
    configured memory format: values as FFCV's CPU table, (x - 255 mean) / (255 std), to fp32 rounding (measured
    3.3e-7)."""
    from data_loaders.ffcv_loader import DeviceNormalize

    cfg = DataConfig()
    nhwc = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = DeviceNormalize(cfg.mean, cfg.std, channels_last, CPU)(nhwc.permute(0, 3, 1, 2))
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) * 255 for v in (cfg.mean, cfg.std))
    expected = (nhwc.permute(0, 3, 1, 2).double() - mean) / std
    assert out.dtype == torch.float32 and out.shape == (4, 3, 16, 16)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert (out.double() - expected).abs().max().item() < 1e-6


def test_ffcv_batch_thread_starts_on_the_ranks_gpu(synthetic_betons, monkeypatch):
    """FFCV's batch thread makes the rank's GPU current before its first batch (a new thread starts on GPU 0, where
    FFCV's per-batch stream context would create a context for every rank): checked on a CPU pipeline, with
    torch.cuda.set_device recording where it was called."""
    import threading

    import ffcv.loader.loader as ffcv_loader
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import ToTensor

    from data_loaders.ffcv_loader import _resumable_loader_class

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append((d, threading.current_thread().name)))
    original = ffcv_loader.EpochIterator
    loader = _resumable_loader_class()(str(synthetic_betons["train"]), batch_size=4, num_workers=1,
                                       pipelines={"image": None, "label": [IntDecoder(), ToTensor()]},
                                       cuda_device=torch.device("cuda", 1))
    labels = [y for (y,) in loader]
    assert len(labels) == len(loader) and calls[0][0] == torch.device("cuda", 1)
    assert len(calls) == 1 and calls[0][1] != threading.current_thread().name  # once, in FFCV's thread
    assert ffcv_loader.EpochIterator is original  # FFCV's own class again for any other loader


def test_importing_the_torchvision_loader_changes_nothing_in_timm():
    script = ("import data_loaders.torchvision_loader; from timm.data import auto_augment as a; "
              "print(a.NAME_TO_OP['PosterizeIncreasing'] is a.posterize)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_randaugment_posterize_at_full_magnitude_is_black_not_an_error():
    """timm's 'inc1' posterize keeps 0 bits at magnitude 10; Pillow 13 rejects that, which killed training."""
    from PIL import Image
    from timm.data import auto_augment

    from data_loaders.torchvision_loader import _posterize, fix_timm_posterize

    fix_timm_posterize()
    fix_timm_posterize()  # idempotent: every loader calls it
    assert auto_augment.NAME_TO_OP["PosterizeIncreasing"] is _posterize
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    out = op(Image.fromarray(np.full((8, 8, 3), 200, np.uint8)))
    assert np.asarray(out).max() == 0


@pytest.fixture(scope="module")
def timm_standard_val(synthetic_root):
    """A So-ViT, timm's resolved eval config for it, the val samples, and what timm's standard evaluation feeds
    it: resolve_data_config + create_transform (shorter side to img_size / crop_pct, bicubic, centre crop) on the
    original images."""
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    import pipeline.models  # noqa: F401  (registers So-ViT)

    torch.manual_seed(0)
    model = timm.create_model("sovit_7", num_classes=4, img_size=32).eval()
    config = resolve_data_config({"input_size": (3, 32, 32)}, model=model)
    samples = list_samples(synthetic_root / "val")
    standard = torch.stack([create_transform(**config)(Image.open(p).convert("RGB")) for p, _ in samples])
    return model, config, samples, standard


@pytest.fixture(scope="module")
def eval_crop_beton(timm_standard_val, synthetic_root, tmp_path_factory):
    """A val .beton of timm's eval crops, as ``convert --eval-size 32`` writes it."""
    from data_loaders.convert import ConvertOptions, convert

    config = timm_standard_val[1]
    val = tmp_path_factory.mktemp("eval_crops") / "val.beton"
    convert(synthetic_root / "val", val, progress=False, options=ConvertOptions(
        eval_size=32, crop_pct=config["crop_pct"], interpolation=config["interpolation"], workers=1))
    return val


@pytest.mark.parametrize("loader", LOADERS)
def test_val_scores_what_timms_standard_transform_scores(loader, timm_standard_val, eval_crop_beton, synthetic_root):
    """The val top-1 a run reports is timm's standard one, on the original images. torchvision applies that
    transform; dali reads val through the torchvision loader (its own cubic resize was close, not the same);
    ffcv decodes a .beton of that transform's crops (one of resized images was not the same). The same input
    tensors: any model scores the same."""
    model, config, samples, standard = timm_standard_val
    cfg = DataConfig(loader=loader, val=str(eval_crop_beton if loader == "ffcv" else synthetic_root / "val"),
                     img_size=32, crop_pct=config["crop_pct"], micro_batch_size=4, workers=1,
                     eval_interpolation=config["interpolation"], mean=config["mean"], std=config["std"])
    batches = [(x.clone(), y.clone()) for x, y in data_loaders.build(cfg, "val", 0, 1, CPU)]
    images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert labels.tolist() == [label for _, label in samples]
    assert (images - standard).abs().max() < 1e-5  # float rounding of the normalisation only
    with torch.no_grad():
        ours, timms = (100 * (model(x).argmax(1) == labels).float().mean().item() for x in (images, standard))
        assert abs(ours - timms) <= 0.1 and torch.equal(model(images).argmax(1), model(standard).argmax(1))


def test_ffcv_eval_crops_of_another_size_or_as_train_are_refused(eval_crop_beton):
    val = eval_crop_beton
    with pytest.raises(DataError, match=rf"{val} holds timm's eval crops for .*'img_size': 32.*, but this run "
                                        r"evaluates .*'img_size': 48.*: convert val again with --eval-size 48"):
        data_loaders.build(DataConfig(loader="ffcv", val=str(val), img_size=48), "val", 0, 1, CPU)
    with pytest.raises(DataError, match="holds eval crops"):
        data_loaders.build(DataConfig(loader="ffcv", train=str(val), img_size=32), "train", 0, 1, CPU)
