"""ImageFolder split -> FFCV ``.beton`` (fields ``image``, ``label``) plus a JSON sidecar ``<out>.json``.

    python -m data_loaders.convert --src imagenet/train --out betons/train.beton --max-resolution 256
    python -m data_loaders.convert --src imagenet/val --out betons/val.beton --classes-from betons/train.beton.json

Real ImageNet copies are dirty, and FFCV's writer waits forever once one of its workers dies on a bad image.
So every file is checked first, in parallel and cheaply (JPEGs are decoded at reduced DCT scale, which still
reads the whole entropy-coded stream and so catches truncation): undecodable files are skipped and named, with
the reason, on the console and in the sidecar, as are files the folder scan does not read (other extensions,
dangling image symlinks). What FFCV's workers then read is normalised to 8-bit RGB (CMYK, grayscale, palette,
alpha, 16-bit, PNG bytes under a .JPEG name, ...), and a watchdog turns a worker that dies anyway into an error
instead of a hang. Output appears atomically: a temporary file is renamed at the end, the sidecar last, so an
interrupted run leaves nothing that looks complete and never damages an earlier output; the next run removes the
temporaries a killed one left. An existing output is replaced only with ``--overwrite``. Every problem with the
input or the destination is a ``DataError`` (on the command line: one ``error:`` line, exit code 2), raised
before anything is written.
"""

from __future__ import annotations

import _thread
import argparse
import json
import multiprocessing
import os
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import psutil
from PIL import Image
from tqdm import tqdm

from .base import DataError, read_sidecar, sidecar_path
from .folders import find_classes, scan

# Giants (e.g. 5000x3500 scans, and larger) are legitimate ImageNet images; PIL refuses above 2 x 89M pixels.
# Raised only while convert() runs, for its own worker processes.
GIANT_IMAGE_PIXELS = 300_000_000


@dataclass(frozen=True)
class ConvertOptions:
    max_resolution: int = 256
    # FFCV's ImageNet recipe: half the images stored raw. FFCV decodes on the CPU even on GPU nodes; this
    # costs 3-4x the bytes of all-jpg and buys 10-20% loader throughput on 2 cores (docs/loaders.md).
    write_mode: str = "proportion"  # jpg | raw | proportion (as FFCV's RGBImageField)
    compress_probability: float = 0.5
    jpeg_quality: int = 90
    chunk_size: int = 100
    workers: int = len(os.sched_getaffinity(0))  # the cores this process may use
    limit_per_class: int | None = None

    def check(self) -> None:
        problems = [
            (self.max_resolution >= 16, f"--max-resolution {self.max_resolution}", "an integer >= 16"),
            (self.write_mode in ("jpg", "raw", "proportion"), f"--write-mode {self.write_mode!r}",
             "jpg, raw or proportion"),
            (0 <= self.compress_probability <= 1, f"--compress-probability {self.compress_probability}",
             "a probability in [0, 1]"),
            (1 <= self.jpeg_quality <= 100, f"--jpeg-quality {self.jpeg_quality}", "an integer in [1, 100]"),
            (self.chunk_size >= 1, f"--chunk-size {self.chunk_size}", "an integer >= 1"),
            (self.workers >= 1, f"--workers {self.workers}", "an integer >= 1"),
            (self.limit_per_class is None or self.limit_per_class >= 1, f"--limit-per-class {self.limit_per_class}",
             "an integer >= 1"),
        ]
        for ok, what, expected in problems:
            if not ok:
                raise DataError(f"{what} is invalid: expected {expected}")


def load_rgb(path: str, max_resolution: int) -> np.ndarray:
    """Decode any PIL-readable image to HxWx3 uint8 RGB with its longer side at most ``max_resolution``."""
    with Image.open(path) as im:
        scale = min(1.0, max_resolution / max(im.size))
        target = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        if im.format == "JPEG" and scale < 1:
            im.draft("RGB", target)  # decode giants at reduced DCT scale: same result, a fraction of the work
        im.load()
        im = _to_rgb(im)
        if im.size != target:
            im = im.resize(target, Image.Resampling.BOX if scale < 0.5 else Image.Resampling.BILINEAR,
                           reducing_gap=None)
        return np.asarray(im, dtype=np.uint8).copy()


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grayscale: rescale, don't clip to white
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray((a / hi * 255).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def check_image(path: str) -> str | None:
    """Why ``path`` cannot be used (None if it decodes), checked as cheaply as a full decode allows."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(64).lstrip().lower()
        if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
            return "HTML/XML text, not an image (a failed download?)"
        with Image.open(path) as im:
            if im.width < 1 or im.height < 1:
                return f"degenerate size {im.size}"
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return None
    except Exception as e:  # PIL raises many types for corrupt data; each one means: skip this file
        return f"undecodable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


class _CleanImages:
    """The indexable dataset FFCV's writer reads: already-validated files, normalised to RGB uint8."""

    def __init__(self, samples: list[tuple[str, int]], max_resolution: int):
        self.samples, self.max_resolution = samples, max_resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        try:
            return load_rgb(path, self.max_resolution), label
        except Exception as e:
            raise DataError(f"{path} passed the check but failed to load: {e}") from e


def _watch_workers(stop: threading.Event, failed: list[int]) -> None:
    """Interrupt the main thread when an FFCV writer worker dies: FFCV itself would wait for it forever."""
    seen: set[multiprocessing.Process] = set()
    while not stop.wait(0.5):
        seen.update(multiprocessing.active_children())
        bad = [p.exitcode for p in seen if p.exitcode not in (None, 0)]
        if bad:
            failed.extend(bad)
            _thread.interrupt_main()
            return


def convert(src: str | Path, out: str | Path, *, classes_from: str | Path | None = None,
            options: ConvertOptions | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Convert one ImageFolder split; returns the report that is also written to ``<out>.json``."""
    opts = options or ConvertOptions()
    opts.check()
    src, out = Path(src), Path(out)
    _check_destination(out, overwrite)
    _remove_stale_temporaries(out)
    classes = _classes_from(Path(classes_from)) if classes_from is not None else find_classes(src)
    samples, unread = scan(src, classes)
    if opts.limit_per_class:  # samples are sorted by class, then name: keep the first N of each class
        samples = [s for i, s in enumerate(samples)
                   if i < opts.limit_per_class or samples[i - opts.limit_per_class][1] != s[1]]
    bar = partial(tqdm, unit="img", smoothing=0.1, disable=not progress)

    with mock.patch.object(Image, "MAX_IMAGE_PIXELS", GIANT_IMAGE_PIXELS):
        t0 = time.perf_counter()
        kept, undecodable = _check_files(samples, opts.workers, bar)
        skipped = unread + undecodable
        for s in skipped:
            print(f"skipped {s['path']}: {s['reason']}")
        empty = sorted(set(range(len(classes))) - {label for _, label in kept})
        if empty:
            raise DataError(f"no decodable images for class(es) {[classes[i] for i in empty][:5]} in {src}: "
                            "every class needs at least one image")
        t_check = time.perf_counter() - t0

        tmp, sidecar_tmp = _temporary(out), _temporary(sidecar_path(out))
        try:
            _write(kept, tmp, opts, bar)
            elapsed = time.perf_counter() - t0
            per_class = {c: 0 for c in classes}
            for _, label in kept:
                per_class[classes[label]] += 1
            report = {
                "format": "ffcv", "fields": {"image": "RGBImageField", "label": "IntField"},
                "source": str(src.resolve()), "num_samples": len(kept), "num_classes": len(classes),
                "classes": classes, "counts": per_class, "skipped": skipped, "options": asdict(opts),
                "bytes": tmp.stat().st_size, "seconds": round(elapsed, 2), "check_seconds": round(t_check, 2),
                "images_per_second": round(len(kept) / elapsed, 1),
                "images_per_second_per_worker": round(len(kept) / elapsed / opts.workers, 1),
            }
            sidecar_tmp.write_text(json.dumps(report, indent=1))
            tmp.replace(out)
            sidecar_tmp.replace(sidecar_path(out))  # last: a sidecar names a complete .beton
        finally:
            for f in (tmp, sidecar_tmp):
                f.unlink(missing_ok=True)
    return report


def _check_files(samples: list[tuple[str, int]], workers: int, bar) -> tuple[list[tuple[str, int]], list[dict]]:
    """Pass 1, in parallel: the samples that decode, and ``{"path", "reason"}`` of those that do not."""
    with multiprocessing.Pool(workers) as pool:
        problems = list(bar(pool.imap(check_image, [p for p, _ in samples], chunksize=64), total=len(samples),
                            desc="checking"))
    return ([s for s, why in zip(samples, problems, strict=True) if not why],
            [{"path": p, "reason": why} for (p, _), why in zip(samples, problems, strict=True) if why])


def _write(kept: list[tuple[str, int]], tmp: Path, opts: ConvertOptions, bar) -> None:
    """FFCV's writer over the checked files, watched: FFCV itself waits forever for a worker that died."""
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField

    writer = ffcv.writer.DatasetWriter(str(tmp), {
        "image": RGBImageField(write_mode=opts.write_mode, max_resolution=opts.max_resolution,
                               compress_probability=opts.compress_probability, jpeg_quality=opts.jpeg_quality),
        "label": IntField(),
    }, num_workers=opts.workers)
    stop, failed = threading.Event(), []
    threading.Thread(target=_watch_workers, args=(stop, failed), daemon=True).start()
    # FFCV's writer makes its own progress bar, without a label and deaf to progress=False: it gets ours
    with mock.patch.object(ffcv.writer, "tqdm", partial(bar, desc="writing")):
        try:
            writer.from_indexed_dataset(_CleanImages(kept, opts.max_resolution), chunksize=opts.chunk_size)
        except KeyboardInterrupt:
            if failed:
                raise DataError(f"an FFCV writer worker died (exit codes {failed}) on a file that passed the check; "
                                "see its traceback above; the output was not written") from None
            raise
        finally:
            stop.set()


def _check_destination(out: Path, overwrite: bool) -> None:
    """Every reason the output cannot be written, before any work: a conversion of ImageNet takes hours."""
    if out.is_dir():
        raise DataError(f"--out {out} is a directory: expected a .beton file name, e.g. {out / 'train.beton'}")
    if out.suffix != ".beton":
        raise DataError(f"--out {out} is invalid: expected a file name ending in .beton")
    try:  # a missing folder is made, as the README's /data/betons/ may be on a fresh machine
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create its folder {out.parent} ({e.strerror}): choose another --out"
                        ) from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise DataError(f"--out {out}: directory {out.parent} is not writable: fix its permissions or choose another "
                        "--out")
    existing = [p for p in (out, sidecar_path(out)) if p.exists()]
    if existing and not overwrite:
        raise DataError(f"--out {existing[0]} already exists: pass --overwrite to replace it (it stays intact until "
                        "the new output is complete) or choose another --out")


def _temporary(path: Path) -> Path:
    """Hidden, and named after this process and host, so a later run can tell a killed run's leftovers."""
    return path.with_name(f".{path.name}.{os.getpid()}@{socket.gethostname()}.tmp")


def _remove_stale_temporaries(out: Path) -> None:
    """Remove what a killed run (kill -9, out of memory) left beside ``out``: the temporaries of processes on this
    host that no longer exist. A live run's stay, so two runs never delete each other's files."""
    pattern = re.compile(rf"\.{re.escape(out.name)}(?:\.json)?\.(\d+)@(.+)\.tmp")
    for f in out.parent.iterdir():
        m = pattern.fullmatch(f.name)
        if m and m[2] == socket.gethostname() and not psutil.pid_exists(int(m[1])):
            f.unlink()
            print(f"removed {f}, left by a killed conversion")


def _classes_from(path: Path) -> list[str]:
    try:
        return read_sidecar(path)["classes"]
    except DataError as e:
        raise DataError(f"--classes-from {e}") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_loaders.convert", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ConvertOptions()
    required = {"required": True, "default": argparse.SUPPRESS}  # no "(default: None)" in --help
    p.add_argument("--src", **required, help="one split of an ImageFolder: SRC/<class>/<image>")
    p.add_argument("--out", **required, help="output .beton (a <out>.json sidecar is written beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its sidecar")
    p.add_argument("--classes-from", help="sidecar (or .beton) of the train split: val must use its class list")
    p.add_argument("--max-resolution", type=int, default=d.max_resolution, help="longer side, pixels")
    p.add_argument("--write-mode", default=d.write_mode, choices=["jpg", "raw", "proportion"],
                   help="proportion: a --compress-probability share as JPEG, the rest raw")
    p.add_argument("--compress-probability", type=float, default=d.compress_probability,
                   help="share of JPEG images in --write-mode proportion")
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality, help="JPEG quality of re-encoded images")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="images per FFCV writer task")
    p.add_argument("--workers", type=int, default=d.workers, help="processes (all cores this one may use)")
    p.add_argument("--limit-per-class", type=int, default=None, help="quick subsets: at most N images per class")
    a = p.parse_args(argv)
    opts = ConvertOptions(a.max_resolution, a.write_mode, a.compress_probability, a.jpeg_quality, a.chunk_size,
                          a.workers, a.limit_per_class)
    try:
        r = convert(a.src, a.out, classes_from=a.classes_from, options=opts, overwrite=a.overwrite)
    except DataError as e:
        p.exit(2, f"error: {e}\n")
    print(f"wrote {a.out}: {r['num_samples']} images, {r['num_classes']} classes, {len(r['skipped'])} skipped, "
          f"{r['bytes'] / 2**20:.1f} MiB in {r['seconds']:.1f} s ({r['images_per_second']:.0f} img/s, "
          f"{r['images_per_second_per_worker']:.0f} img/s per worker); report: {sidecar_path(a.out)}")


if __name__ == "__main__":
    main()
