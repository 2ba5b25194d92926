"""The converter on clean and hostile data: round trip, every dirty-ImageNet case, class lists, atomicity, and
the command line's one-line errors (exit code 2, nothing written)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from data_loaders import DataError, sidecar_path
from data_loaders.convert import ConvertOptions, convert, main
from data_loaders.encode import decode, stored_size
from data_loaders.folders import list_samples

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
        "giant.JPEG": _jpeg(Image.new("RGB", (5000, 3500), (10, 10, 200)), quality=50),
    }
    bad = {
        "truncated.JPEG": _jpeg(rgb.resize((400, 300)))[:3000],
        "empty.JPEG": b"",
        "html.JPEG": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "random.JPEG": rng.bytes(5000),
        # too small for the loaders' crops: 1x1, and a 4000x8 sliver that max side 64 makes 64x0
        "one_pixel.JPEG": _jpeg(Image.new("RGB", (1, 1), (200, 10, 10))),
        "sliver.JPEG": _jpeg(Image.new("RGB", (4000, 8), (10, 200, 10))),
    }
    gif = io.BytesIO()
    rgb.save(gif, "GIF")
    unread = {"README.txt": b"not an image", "animation.gif": gif.getvalue()}  # listed, with the reason
    d = root / "n01440764"
    d.mkdir(parents=True)
    for name, data in {**good, **bad, **unread, ".hidden.JPEG": _jpeg(rgb)}.items():
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
    assert reasons["one_pixel.JPEG"].startswith("too small: 1x1 is stored at 1x1 (max side 64), below --min-side 8")
    assert reasons["sliver.JPEG"].startswith("too small: 4000x8 is stored at 64x0")
    assert all(reasons[name].startswith("not an image extension") for name in unread)
    index = beton_index(tmp_path / "out.beton")
    assert [label for *_, label in index] == [0] * len(good) + [1]
    sizes = dict(zip(good, index, strict=False))
    assert sizes["giant.JPEG"][:2] == (44, 64) and all(max(h, w) <= 64 for h, w, _ in index)  # FFCV's floor
    sidecar = json.loads((tmp_path / "out.beton.json").read_text())
    assert sidecar["classes"] == ["n01440764", "n01443537"] and sidecar["counts"]["n01440764"] == len(good)
    assert sidecar["skipped"] == report["skipped"] and len(sidecar["skipped"]) == len(bad + unread)
    assert sidecar["ignored"] == [{"path": str(tmp_path / "src" / "n01440764" / ".hidden.JPEG"),
                                   "reason": "hidden (its name starts with '.')"}]


def test_sidecar_accounts_for_every_entry_of_the_source_tree(tmp_path, synthetic_root, capsys):
    """Kept, skipped with its reason, or ignored with its reason: each entry under --src once, hidden ones too."""
    src = shutil.copytree(synthetic_root / "val", tmp_path / "src")
    (src / "README.txt").write_text("a file at the root")
    (src / ".cache" / "deep").mkdir(parents=True)
    (src / ".cache" / "deep" / "a.JPEG").write_bytes(b"hidden tree")
    (src / "class_00" / "x.jpg").mkdir()  # a folder with an image's name, and its file
    (src / "class_00" / "x.jpg" / "inner.JPEG").write_bytes((src / "class_01" / "val_01_00000.JPEG").read_bytes())
    (src / "class_00" / ".hidden.jpg").write_bytes(b"")
    (src / "class_01" / "notes.txt").write_text("not an image")
    report = convert(src, tmp_path / "out.beton", options=OPTS, progress=False)

    entries = {os.path.join(top, name) for top, dirs, files in os.walk(src) for name in dirs + files}
    named = [s["path"] for s in report["skipped"] + report["ignored"]]
    assert len(named) == len(set(named)) and all(s["reason"] for s in report["skipped"] + report["ignored"])
    kept = {p for p, _ in list_samples(src)} - set(named)
    classes = {str(src / c) for c in report["classes"]}
    assert entries == classes | set(named) | kept and len(kept) == report["num_samples"] == 20
    ignored = {os.path.relpath(s["path"], src): s["reason"] for s in report["ignored"]}
    assert ignored == {
        ".cache": "hidden (its name starts with '.'): not a class",
        ".cache/deep": f"inside {src / '.cache'}, which is ignored",
        ".cache/deep/a.JPEG": f"inside {src / '.cache'}, which is ignored",
        "README.txt": "at the split's root, not in a class folder",
        "class_00/.hidden.jpg": "hidden (its name starts with '.')",
        "class_00/x.jpg": "a folder inside a class folder: only the class folder's own files are read",
        "class_00/x.jpg/inner.JPEG": f"inside {src / 'class_00' / 'x.jpg'}, which is ignored",
    }
    assert (f"ignored 7 entries outside the class folders (hidden, nested or at the root of {src}): listed in "
            f"{tmp_path / 'out.beton.json'}\n") in capsys.readouterr().out


def test_normalisation_keeps_content():
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[..., 0] = 200
    assert np.abs(stored_pixels(_png(Image.fromarray(rgb).convert("RGBA")), 64).astype(int) - rgb).max() <= 1
    sixteen = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert stored_pixels(_png(sixteen), 64).min() == 255  # 16-bit white stays white, not clipped garbage


def stored_pixels(data: bytes, max_resolution: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return decode(im, data, stored_size(*im.size, max_resolution))[0]


def test_round_trip_decodes_close_to_source_with_exact_labels(synthetic_root, synthetic_betons):
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
    ({"min_side": 0}, "--min-side 0 is invalid: expected an integer in \\[1, --max-resolution 256\\]"),
    ({"eval_size": 8}, "--eval-size 8"),
    ({"eval_size": 32, "interpolation": "area"}, "--interpolation 'area' is invalid: expected one of timm's"),
])
def test_bad_options_are_one_line(tmp_path, synthetic_root, kwargs, message):
    with pytest.raises(DataError, match=message):
        convert(synthetic_root / "train", tmp_path / "x.beton", options=ConvertOptions(**kwargs), progress=False)


def test_missing_source_is_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "x.beton", options=OPTS, progress=False)


@pytest.fixture(scope="module")
def many_jpegs(tmp_path_factory):
    """2 classes x 600 noisy 400x300 JPEGs: seconds of conversion, time to interrupt it."""
    src = tmp_path_factory.mktemp("many") / "src"
    big = _jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)))
    for c in range(2):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(600):
            (src / f"c{c}" / f"{i}.JPEG").write_bytes(big)
    return src


def test_killed_conversion_leaves_old_output_intact_and_the_next_run_cleans_up(many_jpegs, tmp_path, synthetic_root,
                                                                               capsys):
    src = many_jpegs
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


def test_the_progress_bar_is_labelled_and_progress_false_is_silent(src, tmp_path, capsys):
    convert(src, tmp_path / "quiet.beton", options=OPTS, progress=False)
    assert "%|" not in capsys.readouterr().err
    convert(src, tmp_path / "loud.beton", options=OPTS)
    err = capsys.readouterr().err
    assert "converting: 100%" in err and err.count("100%") == 1  # one pass, one bar


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


def test_same_folder_same_bytes_whatever_the_worker_count(tmp_path, synthetic_root):
    """FFCV's own writer gives another file each time: pages go to whichever worker asks first, and its JPEG/raw
    choice comes from an unseeded RNG."""
    digests = set()
    for workers, chunk_size in ((1, 100), (2, 5)):
        out = tmp_path / f"{workers}.beton"
        options = ConvertOptions(max_resolution=48, workers=workers, chunk_size=chunk_size)  # resized: 64 px sources
        convert(synthetic_root / "train", out, options=options, progress=False)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    from ffcv.reader import Reader

    modes = Reader(str(out)).metadata["f0"]["mode"]
    assert 0.3 < modes.mean() < 0.7  # both JPEG (0) and raw (1), about half each: the draw was made


def ffcv_plain_writer(src, out, max_resolution):
    """What ffcv-imagenet's write_imagenet.py writes, raw: torchvision's ImageFolder into FFCV's writer."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    DatasetWriter(str(out), {"image": RGBImageField(write_mode="raw", max_resolution=max_resolution),
                             "label": IntField()}, num_workers=1).from_indexed_dataset(ImageFolder(str(src)))


def stored_raw_images(path):
    """Every image of a raw-mode .beton, HxWx3, in sample order, read straight from its pages."""
    from ffcv.reader import Reader

    reader, data = Reader(str(path)), np.fromfile(path, np.uint8)
    ptr = dict(zip(reader.alloc_table["sample_id"].tolist(), reader.alloc_table["ptr"].tolist(), strict=True))
    return [data[ptr[i]:ptr[i] + 3 * int(m["height"]) * int(m["width"])].reshape(int(m["height"]), int(m["width"]), 3)
            for i, m in enumerate(reader.metadata["f0"])]


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return 10 * np.log10(255**2 / mse) if mse else float("inf")


SAMPLE_PHOTOS = [  # real photos that ship with the venv's matplotlib and scikit-learn (requirements.txt)
    "matplotlib/mpl-data/sample_data/grace_hopper.jpg",  # 512x600
    "sklearn/datasets/images/china.jpg",  # 640x427
    "sklearn/datasets/images/flower.jpg",  # 640x427
]


def test_stored_pixels_are_ffcvs_own_or_within_40_db_of_them(tmp_path):
    """FFCV's own writer is the judge. Full-size decodes give its exact bytes; DCT-scaled decodes of images far
    larger than the stored size stay >= 40 dB PSNR from them, on real photos and a large photo-like one."""
    import sysconfig

    from data_loaders.encode import dct_scale
    from data_loaders.synthetic import photo

    src = tmp_path / "src" / "photos"
    src.mkdir(parents=True)
    site = Path(sysconfig.get_paths()["purelib"])
    for i, name in enumerate(SAMPLE_PHOTOS):
        shutil.copy(site / name, src / f"{i}.jpg")
    photo(1100, 800, np.random.default_rng(0)).save(src / "9.jpg", quality=90)
    sizes = [Image.open(p).size for p in sorted(src.iterdir())]
    for max_resolution, same in ((256, True), (32, False), (16, False)):
        ours, theirs = tmp_path / f"ours{max_resolution}.beton", tmp_path / f"ffcv{max_resolution}.beton"
        convert(src.parent, ours, options=ConvertOptions(max_resolution=max_resolution, write_mode="raw", workers=1),
                progress=False)
        ffcv_plain_writer(src.parent, theirs, max_resolution)
        scales = [dct_scale(size, stored_size(*size, max_resolution)) for size in sizes]
        quality = [psnr(a, b) for a, b in zip(stored_raw_images(ours), stored_raw_images(theirs), strict=True)]
        if same:
            assert scales == [1, 1, 1, 1] and quality == [float("inf")] * 4
        else:
            assert min(quality) >= 40, (max_resolution, scales, quality)
    assert scales == [2, 2, 2, 4]  # at max side 16 every image took a DCT-scaled decode


def test_jpegs_that_fit_are_stored_as_they_are(tmp_path, synthetic_root):
    """No second generation of JPEG loss: a 64 px JPEG at max side 64, drawn for JPEG storage, keeps its bytes."""
    from ffcv.reader import Reader

    out = tmp_path / "val.beton"
    convert(synthetic_root / "val", out, options=ConvertOptions(max_resolution=64, write_mode="jpg", workers=1),
            progress=False)
    reader, data = Reader(str(out)), out.read_bytes()
    stored = {int(i): data[p:p + n] for i, p, n in reader.alloc_table.tolist()}
    assert [stored[i] for i in range(20)] == [Path(p).read_bytes() for p, _ in list_samples(synthetic_root / "val")]


LOAD_VAL = """
import sys, torch, data_loaders
from pipeline.config import DataConfig
for beton in sys.argv[1:]:
    cfg = DataConfig(loader="ffcv", train=beton, val=beton, img_size=32, micro_batch_size=4, workers=1)
    try:
        print(beton, sum(len(y) for _, y in data_loaders.build(cfg, "val", 0, 1, torch.device("cpu"))), flush=True)
    except data_loaders.DataError as e:
        print(f"error: {e}", flush=True)
"""


def test_the_val_loader_never_aborts_on_a_tiny_image(tmp_path, synthetic_root):
    """A 1-pixel val image made OpenCV abort the process (SIGABRT, exit 134) at the first eval. The converter now
    skips it; a .beton that holds one anyway (FFCV's own writer, an older converter) is one error line."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    src = shutil.copytree(synthetic_root / "val", tmp_path / "src")
    (src / "class_00" / "one_pixel.JPEG").write_bytes(_jpeg(Image.new("RGB", (1, 1), (200, 10, 10))))
    ours = tmp_path / "ours.beton"
    assert convert(src, ours, options=OPTS, progress=False)["skipped"][0]["reason"].startswith("too small: 1x1")
    old = tmp_path / "old.beton"
    pixel = [(np.full((1, 1, 3), 200, np.uint8), 0), (np.full((40, 50, 3), 9, np.uint8), 1)]
    DatasetWriter(str(old), {"image": RGBImageField(), "label": IntField()}, num_workers=1).from_indexed_dataset(pixel)
    sidecar_path(old).write_text(json.dumps({"num_samples": 2, "classes": ["a", "b"]}))
    done = subprocess.run([sys.executable, "-c", LOAD_VAL, str(ours), str(old)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        f"{ours} 20",
        f"error: {old} holds 1 image(s) too small for the val crop (sample 0: shorter side 1 px): convert it again "
        "with python -m data_loaders.convert, which skips such images and names them in the sidecar"]


def test_a_worker_that_dies_is_an_error_not_a_hang(many_jpegs, tmp_path):
    out = tmp_path / "out.beton"
    cmd = [sys.executable, "-m", "data_loaders.convert", "--src", str(many_jpegs), "--out", str(out), "--workers",
           "2", "--chunk-size", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent, deadline = psutil.Process(proc.pid), time.time() + 120

    def workers() -> list[psutil.Process]:  # not multiprocessing's resource tracker, also a child
        def cmdline(child: psutil.Process) -> str:
            try:
                return " ".join(child.cmdline())
            except psutil.Error:  # gone meanwhile
                return "resource_tracker"

        return [c for c in parent.children() if "resource_tracker" not in cmdline(c)]

    while len(workers()) < 2 and time.time() < deadline:
        time.sleep(0.02)
    workers()[0].kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.splitlines()[-1].startswith("error: a conversion worker died ("), err[-3000:]
    assert "the output was not written" in err and not out.exists() and not list(tmp_path.glob(".out.beton*"))
