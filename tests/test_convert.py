"""The converter on clean and hostile data: round trip, every dirty-ImageNet case, class lists, atomicity, and
the command line's one-line errors (exit code 2, nothing written)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from data_loaders import DataError, sidecar_path
from data_loaders.convert import ConvertOptions, convert, load_rgb, main

OPTS = ConvertOptions(max_resolution=64, workers=2, write_mode="raw")
CLI_OPTS = ["--max-resolution", "64", "--workers", "2", "--write-mode", "raw"]


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
    gif = io.BytesIO()
    rgb.save(gif, "GIF")
    unread = {"README.txt": b"not an image", "animation.gif": gif.getvalue()}  # listed, with the reason
    ignored = {".hidden.JPEG": _jpeg(rgb), **unread}
    d = root / "n01440764"
    d.mkdir(parents=True)
    for name, data in {**good, **bad, **ignored}.items():
        (d / name).write_bytes(data)
    other = root / "n01443537"
    other.mkdir()
    (other / "ok.JPEG").write_bytes(_jpeg(rgb))
    return sorted(good), sorted(bad), sorted(unread)


def test_hostile_files_are_kept_or_skipped_never_hang(tmp_path):
    good, bad, unread = hostile_folder(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "out.beton", options=OPTS, progress=False)
    assert report["num_samples"] == len(good) + 1
    assert sorted(os.path.basename(s["path"]) for s in report["skipped"]) == sorted(bad + unread)
    reasons = {os.path.basename(s["path"]): s["reason"] for s in report["skipped"]}
    assert "empty" in reasons["empty.JPEG"] and "HTML" in reasons["html.JPEG"]
    assert all(reasons[name].startswith("not an image extension") for name in unread)
    index = beton_index(tmp_path / "out.beton")
    assert [label for *_, label in index] == [0] * len(good) + [1]
    sizes = dict(zip(good, index, strict=False))
    assert sizes["giant.JPEG"][:2] == (45, 64) and sizes["sliver.JPEG"][:2] == (1, 64)  # resized, aspect kept
    assert sizes["one_pixel.JPEG"][:2] == (1, 1) and all(max(h, w) <= 64 for h, w, _ in index)
    sidecar = json.loads((tmp_path / "out.beton.json").read_text())
    assert sidecar["classes"] == ["n01440764", "n01443537"] and sidecar["counts"]["n01440764"] == len(good)
    assert len(sidecar["skipped"]) == len(bad + unread)


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
    with pytest.raises(DataError, match="has no class at index 1 where the train split has class 'class_01'"):
        convert(val, tmp_path / "v.beton", classes_from=synthetic_betons["train"], options=OPTS, progress=False)
    (val / "class_01").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        convert(val, tmp_path / "v.beton", options=OPTS, progress=False)
    assert not list(tmp_path.glob("*.beton*"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_resolution": 4}, "--max-resolution 4"),
    ({"write_mode": "png"}, "--write-mode 'png'"),
    ({"jpeg_quality": 0}, "--jpeg-quality 0"),
])
def test_bad_options_are_one_line(tmp_path, synthetic_root, kwargs, message):
    with pytest.raises(DataError, match=message):
        convert(synthetic_root / "train", tmp_path / "x.beton", options=ConvertOptions(**kwargs), progress=False)


def test_missing_source_is_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "x.beton", options=OPTS, progress=False)


def test_killed_conversion_leaves_old_output_intact_and_the_next_run_cleans_up(tmp_path, synthetic_root, capsys):
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
           "--max-resolution", "256", "--overwrite"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.beton.*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.beton.*.tmp")), "the converter never started writing"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert out.read_bytes() == b"previous good output"
    assert (tmp_path / "out.beton.json").read_text() == "{}"

    left = list(tmp_path.glob(".out.beton.*.tmp"))
    with subprocess.Popen(["sleep", "60"]) as live:  # a running conversion's temporary must survive
        running = tmp_path / f".out.beton.{live.pid}@{socket.gethostname()}.tmp"
        running.write_bytes(b"being written")
        main(["--src", str(synthetic_root / "val"), "--out", str(out), "--overwrite", *CLI_OPTS])
        live.kill()
    assert all(str(f) in capsys.readouterr().out for f in left)
    assert list(tmp_path.glob(".out.beton.*.tmp")) == [running]
    assert json.loads((tmp_path / "out.beton.json").read_text())["num_samples"] == 20


def cli_error(capsys, *args) -> str:
    """stderr of ``python -m data_loaders.convert ARGS`` (run in this process), which must fail: exit code 2 and
    one ``error:`` line."""
    with pytest.raises(SystemExit) as exit_:
        main([*map(str, args), *CLI_OPTS])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def src(tmp_path, synthetic_root):
    """A writable copy of the synthetic val split: 4 classes x 5 JPEGs."""
    return shutil.copytree(synthetic_root / "val", tmp_path / "src")


@pytest.mark.parametrize("where", ["class_00/loop.JPEG", "looping_class"])
def test_symlink_loop_is_one_error_line(where, src, tmp_path, capsys):
    link = src / where
    link.symlink_to(link.name)
    out = tmp_path / "out"
    out.mkdir()
    err = cli_error(capsys, "--src", src, "--out", out / "x.beton")
    assert f"{link} is a symlink loop" in err and "remove the link" in err
    assert not list(out.iterdir())


def test_read_only_output_directory_is_one_error_line(src, tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    cmd = [sys.executable, "-m", "data_loaders.convert", "--src", str(src), "--out", str(read_only / "x.beton"),
           *CLI_OPTS]
    if os.geteuid() == 0:  # root writes anywhere: drop the capability that lets it
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: a read-only directory cannot be made")
        drop = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert done.stderr.startswith(f"error: --out {read_only / 'x.beton'}: directory {read_only} is not writable")
    assert not list(read_only.iterdir())


@pytest.mark.parametrize("name", ["x.beton", "betons"])
def test_out_that_is_a_directory_is_one_error_line(name, src, tmp_path, capsys):
    out = tmp_path / name
    out.mkdir()
    assert f"--out {out} is a directory" in cli_error(capsys, "--src", src, "--out", out)
    assert not list(out.iterdir()) and not list(tmp_path.glob(".*"))


def test_existing_output_is_replaced_only_with_overwrite(src, tmp_path, capsys):
    out = tmp_path / "x.beton"
    main(["--src", str(src), "--out", str(out), "--limit-per-class", "1", *CLI_OPTS])
    before = out.read_bytes(), sidecar_path(out).read_bytes()
    capsys.readouterr()
    err = cli_error(capsys, "--src", src, "--out", out)
    assert f"--out {out} already exists: pass --overwrite" in err
    assert (out.read_bytes(), sidecar_path(out).read_bytes()) == before
    main(["--src", str(src), "--out", str(out), "--overwrite", *CLI_OPTS])
    assert json.loads(sidecar_path(out).read_text())["num_samples"] == 20


def test_dangling_class_symlink_is_an_error_not_a_label_shift(src, tmp_path, capsys):
    (src / "class_01b").symlink_to(tmp_path / "moved_away")  # sorts between class_01 and class_02
    err = cli_error(capsys, "--src", src, "--out", tmp_path / "x.beton")
    assert f"class directory {src / 'class_01b'} (dangling symlink to {tmp_path / 'moved_away'}) is broken" in err
    assert not list(tmp_path.glob("*.beton*"))


def test_dangling_image_symlink_is_skipped_and_named(src, tmp_path, capsys):
    (src / "class_00" / "gone.JPEG").symlink_to(tmp_path / "gone.JPEG")
    main(["--src", str(src), "--out", str(tmp_path / "x.beton"), *CLI_OPTS])
    skipped = json.loads(sidecar_path(tmp_path / "x.beton").read_text())["skipped"]
    assert skipped == [{"path": str(src / "class_00" / "gone.JPEG"),
                        "reason": f"dangling symlink to {tmp_path / 'gone.JPEG'}"}]
    assert f"skipped {src / 'class_00' / 'gone.JPEG'}: dangling symlink" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["[1, 2]", '{"classes": "abcd"}', '{"classes": ["a"]}', "not json"])
def test_classes_from_a_json_that_is_no_sidecar_is_one_error_line(content, src, tmp_path, capsys):
    bad = tmp_path / "classes.json"
    bad.write_text(content)
    err = cli_error(capsys, "--src", src, "--out", tmp_path / "x.beton", "--classes-from", bad)
    assert err.startswith(f"error: --classes-from {bad} is ") and "python -m data_loaders.convert" in err
    assert not list(tmp_path.glob("*.beton*"))


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "(default: 256)" in out and "(default: proportion)" in out


def test_progress_bars_are_labelled_and_progress_false_is_silent(src, tmp_path, capsys):
    convert(src, tmp_path / "quiet.beton", options=OPTS, progress=False)
    assert "%|" not in capsys.readouterr().err
    convert(src, tmp_path / "loud.beton", options=OPTS)
    err = capsys.readouterr().err
    assert "checking: 100%" in err and "writing: 100%" in err


def test_import_leaves_pil_alone_and_convert_still_reads_giants(tmp_path):
    script = ("from PIL import Image; default = Image.MAX_IMAGE_PIXELS; import data_loaders.convert; "
              "print(Image.MAX_IMAGE_PIXELS == default)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.stdout.strip() == "True", done.stderr[-2000:]
    for name, size in (("giant", (13500, 13500)), ("small", (30, 20))):  # 182M pixels: PIL alone refuses it
        (tmp_path / "src" / name).mkdir(parents=True)
        Image.new("L", size, 128).save(tmp_path / "src" / name / "a.JPEG", quality=10)
    default = Image.MAX_IMAGE_PIXELS
    report = convert(tmp_path / "src", tmp_path / "x.beton", options=OPTS, progress=False)
    assert report["num_samples"] == 2 and not report["skipped"] and default == Image.MAX_IMAGE_PIXELS
    assert beton_index(tmp_path / "x.beton")[0][:2] == (64, 64)
