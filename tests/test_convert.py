"""The converter on clean and hostile data: round trip, every dirty-ImageNet case, class lists, atomicity."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from data_loaders.convert import ConvertOptions, convert, load_rgb

OPTS = ConvertOptions(max_resolution=64, workers=2, write_mode="raw")


def beton_index(path):
    """[(height, width, label)] of every sample, from the .beton's own metadata table."""
    from ffcv.reader import Reader

    return [(int(img["height"]), int(img["width"]), int(lab)) for img, lab in Reader(str(path)).metadata]


def read_beton(path):
    """All (image HxWx3 uint8, label) of a same-size-image .beton in file order, through FFCV's CPU loader."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=1, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    return [(img[0].copy(), int(lab[0, 0])) for img, lab in loader]


def _jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def hostile_folder(root):
    """One class of every kind of file a real ImageNet copy holds. Returns (kept names, skipped names)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    good = {
        "cmyk.JPEG": _jpeg(rgb.convert("CMYK")),
        "gray.JPEG": _jpeg(rgb.convert("L")),
        "palette.png": _png(rgb.convert("P")),
        "rgba.png": _png(rgb.convert("RGBA")),
        "sixteen.png": _png(Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16))),
        "png_bytes.JPEG": _png(rgb),
        "progressive.JPEG": _jpeg(rgb, progressive=True),
        "one_pixel.JPEG": _jpeg(Image.new("RGB", (1, 1), (200, 10, 10))),
        "sliver.JPEG": _jpeg(Image.new("RGB", (4000, 8), (10, 200, 10))),
        "giant.JPEG": _jpeg(Image.new("RGB", (5000, 3500), (10, 10, 200)), quality=50),
    }
    bad = {
        "truncated.JPEG": _jpeg(rgb.resize((400, 300)))[:3000],
        "empty.JPEG": b"",
        "html.JPEG": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "random.JPEG": rng.bytes(5000),
    }
    ignored = {".hidden.JPEG": _jpeg(rgb), "README.txt": b"not an image"}
    d = root / "n01440764"
    d.mkdir(parents=True)
    for name, data in {**good, **bad, **ignored}.items():
        (d / name).write_bytes(data)
    other = root / "n01443537"
    other.mkdir()
    (other / "ok.JPEG").write_bytes(_jpeg(rgb))
    return sorted(good), sorted(bad)


def test_hostile_files_are_kept_or_skipped_never_hang(tmp_path):
    good, bad = hostile_folder(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "out.beton", options=OPTS, progress=False)
    assert report["num_samples"] == len(good) + 1
    assert sorted(os.path.basename(s["path"]) for s in report["skipped"]) == bad
    reasons = {os.path.basename(s["path"]): s["reason"] for s in report["skipped"]}
    assert "empty" in reasons["empty.JPEG"] and "HTML" in reasons["html.JPEG"]
    index = beton_index(tmp_path / "out.beton")
    assert [label for *_, label in index] == [0] * len(good) + [1]
    sizes = dict(zip(good, index, strict=False))
    assert sizes["giant.JPEG"][:2] == (45, 64) and sizes["sliver.JPEG"][:2] == (1, 64)  # resized, aspect kept
    assert sizes["one_pixel.JPEG"][:2] == (1, 1) and all(max(h, w) <= 64 for h, w, _ in index)
    sidecar = json.loads((tmp_path / "out.beton.json").read_text())
    assert sidecar["classes"] == ["n01440764", "n01443537"] and sidecar["counts"]["n01440764"] == len(good)
    assert len(sidecar["skipped"]) == len(bad)


def test_normalisation_keeps_content():
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[..., 0] = 200
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("RGBA").save(buf, "PNG")
    buf.seek(0)
    assert np.abs(load_rgb(buf, 64).astype(int) - rgb).max() <= 1
    sixteen = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    buf = io.BytesIO()
    sixteen.save(buf, "PNG")
    buf.seek(0)
    assert load_rgb(buf, 64).min() == 255  # 16-bit white stays white, not clipped garbage


def test_round_trip_decodes_close_to_source_with_exact_labels(synthetic_root, synthetic_betons):
    from data_loaders.folders import list_samples

    samples = list_samples(synthetic_root / "val")
    decoded = read_beton(synthetic_betons["val"])
    assert [lab for _, lab in decoded] == [lab for _, lab in samples]
    for (path, _), (img, _) in zip(samples, decoded, strict=True):
        src = np.asarray(Image.open(path).convert("RGB"), np.float32)
        assert img.shape == src.shape and np.abs(img.astype(np.float32) - src).mean() < 6  # JPEG re-encode


def test_train_and_val_must_agree_on_classes(tmp_path, synthetic_root, synthetic_betons):
    val = tmp_path / "val"
    (val / "class_00").mkdir(parents=True)
    (val / "class_00" / "a.JPEG").write_bytes((synthetic_root / "val" / "class_00").glob("*.JPEG").__next__()
                                               .read_bytes())
    with pytest.raises(ValueError, match="differ from the expected 4 classes"):
        convert(val, tmp_path / "v.beton", classes_from=synthetic_betons["train"], options=OPTS, progress=False)
    (val / "class_01").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        convert(val, tmp_path / "v.beton", options=OPTS, progress=False)
    assert not list(tmp_path.glob("*.beton*"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_resolution": 4}, "--max-resolution 4"),
    ({"write_mode": "png"}, "--write-mode 'png'"),
    ({"jpeg_quality": 0}, "--jpeg-quality 0"),
])
def test_bad_options_are_one_line(tmp_path, synthetic_root, kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert(synthetic_root / "train", tmp_path / "x.beton", options=ConvertOptions(**kwargs), progress=False)


def test_missing_source_is_clear(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "x.beton", options=OPTS, progress=False)


def test_killed_conversion_leaves_old_output_intact_and_nothing_complete_looking(tmp_path):
    src = tmp_path / "src"
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    for c in range(2):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(600):
            (src / f"c{c}" / f"{i}.JPEG").write_bytes(_jpeg(big))
    out = tmp_path / "out.beton"
    out.write_bytes(b"previous good output")
    (tmp_path / "out.beton.json").write_text("{}")
    cmd = [sys.executable, "-m", "data_loaders.convert", "--src", str(src), "--out", str(out), "--workers", "1",
           "--max-resolution", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.beton.*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.beton.*.tmp")), "the converter never started writing"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert out.read_bytes() == b"previous good output"
    assert (tmp_path / "out.beton.json").read_text() == "{}"
