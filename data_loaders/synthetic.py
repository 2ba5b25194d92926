"""A small, learnable JPEG ImageFolder: the embedded data of the demo and the tests (no download needed).

    python -m data_loaders.synthetic --out data/synthetic --classes 10 --per-class 200 --size 160

Each class is a shape (disc, square, triangle, cross, ring, diamond) filled with a texture (flat, stripes,
checks, dots) in a class hue; position, scale, rotation of the texture, background and pixel noise are random.
So a model has to look at the object, yet a small So-ViT separates 10 classes well within minutes. The output
is a pure function of the arguments (byte-identical files for a seed) and appears atomically.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import multiprocessing
import shutil
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond")
TEXTURES = ("flat", "stripes", "checks", "dots")


def _rgb(hue: float, sat: float, val: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)


def _texture(size: int, kind: str, color: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    """A size x size RGB texture of the class colour; the pattern's period and phase are random."""
    base = np.empty((size, size, 3), np.float32)
    base[:] = color
    if kind != "flat":
        period = rng.uniform(size / 12, size / 5)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        phase = rng.uniform(0, period, 2)
        if kind == "stripes":
            mask = ((xx + yy + phase[0]) // (period / 2)) % 2 == 0
        elif kind == "checks":
            mask = (((xx + phase[0]) // period + (yy + phase[1]) // period) % 2) == 0
        else:  # dots
            mask = ((xx + phase[0]) % period - period / 2) ** 2 + ((yy + phase[1]) % period - period / 2) ** 2 < (
                period / 4) ** 2
        base[mask] *= 0.35
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def _shape_mask(size: int, shape: str, box: tuple[float, float, float, float]) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    cx, cy, w = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
    if shape == "disc":
        d.ellipse(box, fill=255)
    elif shape == "square":
        d.rectangle(box, fill=255)
    elif shape == "triangle":
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "cross":
        t = w / 6
        d.rectangle((cx - t, y0, cx + t, y1), fill=255)
        d.rectangle((x0, cy - t, x1, cy + t), fill=255)
    elif shape == "ring":
        d.ellipse(box, fill=255)
        d.ellipse((x0 + w / 4, y0 + w / 4, x1 - w / 4, y1 - w / 4), fill=0)
    else:  # diamond
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    return mask


def render(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of class ``label``."""
    shape, texture = SHAPES[label % len(SHAPES)], TEXTURES[(label // len(SHAPES)) % len(TEXTURES)]
    hue = label * 0.618034 + rng.normal(0, 0.02)
    bg = np.empty((size, size, 3), np.float32)
    bg[:] = _rgb(rng.uniform(), rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.9))
    bg += np.linspace(-30, 30, size, dtype=np.float32)[:, None, None] * rng.choice([-1, 1])
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8))
    w = rng.uniform(0.35, 0.75) * size
    x0, y0 = rng.uniform(0, size - w, 2)
    fg = _texture(size, texture, _rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)), rng)
    img.paste(fg, (0, 0), _shape_mask(size, shape, (x0, y0, x0 + w, y0 + w)))
    noisy = np.asarray(img, np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def generate(out: str | Path, classes: int = 10, per_class: int = 200, size: int = 160,
             val_per_class: int | None = None, seed: int = 0, quality: int = 90) -> Path:
    """Write ``out/{train,val}/class_XX/*.JPEG``; refuses to touch an existing ``out``."""
    if classes < 2 or per_class < 1 or size < 16:
        raise ValueError(f"synthetic data needs classes >= 2, per_class >= 1, size >= 16; got classes={classes}, "
                         f"per_class={per_class}, size={size}")
    val_per_class = max(1, per_class // 4) if val_per_class is None else val_per_class

    def write(tmp: Path) -> None:
        for split_id, (split, n) in enumerate((("train", per_class), ("val", val_per_class))):
            for label in range(classes):
                d = tmp / split / f"class_{label:02d}"
                d.mkdir(parents=True)
                for i in range(n):
                    rng = np.random.default_rng([seed, split_id, label, i])
                    buf = io.BytesIO()
                    render(label, size, rng).save(buf, "JPEG", quality=quality)
                    (d / f"{split}_{label:02d}_{i:05d}.JPEG").write_bytes(buf.getvalue())

    return _atomic_dir(out, write)


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A photo-like image, for measuring codecs rather than training: dead leaves (overlapping discs whose radius
    falls as r^-3, the scale-invariant edges of natural images) in related colours, over a 1/f texture, lightly
    blurred and with sensor noise. At JPEG quality 90 it takes 2.5-3 bits per pixel, as photos do."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1
    spectrum = (rng.standard_normal((3, *f.shape)) + 1j * rng.standard_normal((3, *f.shape))) / f ** 1.2
    texture = np.fft.irfft2(spectrum, s=(height, width), axes=(1, 2)).transpose(1, 2, 0).astype(np.float32)
    texture *= 18 / texture.std()
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    n, r_min, r_max = width * height // 60, 4, max(width, height) / 3
    radii = (r_min ** -2 - rng.random(n) * (r_min ** -2 - r_max ** -2)) ** -0.5  # density ~ r^-3
    colours = (rng.uniform(40, 210, 3) + rng.normal(0, 45, (n, 3))).clip(0, 255).astype(int).tolist()
    for r, x, y, c in zip(radii.tolist(), (rng.random(n) * width).tolist(), (rng.random(n) * height).tolist(),
                          colours, strict=True):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(c))
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(0.7)), np.float32) + texture
    pixels += rng.standard_normal(pixels.shape, np.float32) * 2
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def imagenet_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) drawn from an approximation of ImageNet-1k train: most images 500 px on the longer side
    (4:3, then 3:2, then other ratios), some smaller, a few large ones; a mean of about 470x390 and landscape three
    times in four."""
    kind = rng.choice(5, p=[0.60, 0.15, 0.10, 0.12, 0.03])
    long_side = (500, 500, 500, int(rng.integers(120, 500)), int(rng.integers(600, 1600)))[kind]
    short_side = (375, 333, int(rng.integers(250, 500)), long_side * 3 // 4, long_side * 3 // 4)[kind]
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def generate_photos(out: str | Path, images: int, classes: int = 10, seed: int = 0, quality: int = 90,
                    workers: int = 1) -> Path:
    """Write ``out/class_XX/*.JPEG``: ``images`` photo-like JPEGs of ImageNet's sizes in one split, for measuring
    conversion and decoding, in ``workers`` processes. Refuses an existing ``out``; appears atomically."""
    def write(tmp: Path) -> None:
        for c in range(classes):
            (tmp / f"class_{c:02d}").mkdir()
        with multiprocessing.Pool(workers) as pool:
            pool.map(partial(_write_photo, tmp, classes, seed, quality), range(images), chunksize=8)

    return _atomic_dir(out, write)


def _write_photo(root: Path, classes: int, seed: int, quality: int, i: int) -> None:
    rng = np.random.default_rng([seed, i])
    photo(*imagenet_size(rng), rng).save(root / f"class_{i % classes:02d}" / f"img_{i:06d}.JPEG", quality=quality)


def _atomic_dir(out: str | Path, write) -> Path:
    """``write(tmp)`` fills a temporary directory beside ``out``, which is then renamed to ``out``."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_loaders.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=200, help="train images per class")
    p.add_argument("--val-per-class", type=int, default=None, help="default: per-class / 4")
    p.add_argument("--size", type=int, default=160, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        out = generate(a.out, a.classes, a.per_class, a.size, a.val_per_class, a.seed)
    except (ValueError, FileExistsError) as e:
        p.exit(2, f"error: {e}\n")
    print(f"wrote {out} ({a.classes} classes)")


def ensure_demo_data(data, classes: int, per_class: int = 200, val_per_class: int = 50, size: int = 64) -> None:
    """Make what ``data`` (a DataConfig) names, when missing: the synthetic ImageFolder beside it, and for the ffcv
    loader its .beton files. ``launchers/submit.py --local`` calls it, so the demo needs no download."""
    root = Path(data.train).parent
    if not (root / "train").is_dir():
        print(f"demo: generating {classes} synthetic classes under {root} ...", flush=True)
        generate(root, classes=classes, per_class=per_class, size=size, val_per_class=val_per_class, seed=0)
    if data.loader != "ffcv" or (Path(data.train).exists() and Path(data.val).exists()):
        return
    from .convert import ConvertOptions, convert
    from .splits import sidecar_path

    print(f"demo: converting to {data.train} and {data.val} ...", flush=True)
    options = {"train": ConvertOptions(max_resolution=size),  # val: timm's eval crops, so top-1 is the standard one
               "val": ConvertOptions(eval_size=data.img_size, crop_pct=data.crop_pct,
                                     interpolation=data.eval_interpolation)}
    for split, path, classes_from in (("train", data.train, None), ("val", data.val, sidecar_path(data.train))):
        if not Path(path).exists():
            convert(root / split, path, classes_from=classes_from, options=options[split], progress=False)

if __name__ == "__main__":
    main()
