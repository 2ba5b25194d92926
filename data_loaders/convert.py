"""ImageFolder split -> FFCV ``.beton`` (fields ``image``, ``label``) plus a JSON sidecar ``<out>.json``.

    python -m data_loaders.convert --src imagenet/train --out betons/train.beton --max-resolution 256
    python -m data_loaders.convert --src imagenet/val --out betons/val.beton --classes-from betons/train.beton.json \
        --eval-size 224

One pass: worker processes read each file once and decode it once (``encode``), and that decode is the check:
undecodable files, and images too small for the loaders' crops, are skipped and named, with the reason, on the
console and in the sidecar, as are files the folder scan does not read; entries outside the class folders are
listed there as ignored, so the sidecar accounts for every entry of the source tree. This process lays the
images out in the .beton in sample order, so the same folder gives the same bytes whatever the worker count (FFCV's
own writer hands each page to whichever worker asks first, and draws its JPEG/raw choice from an unseeded RNG). A
worker that dies is an error, not a hang. Output appears atomically: a temporary file is renamed at the end, the
sidecar last, so an interrupted run leaves nothing that looks complete and never damages an earlier output; the
next run removes the temporaries a killed one left. An existing output is replaced only with ``--overwrite``.
Every problem with the input or the destination is a ``DataError`` (on the command line: one ``error:`` line,
exit code 2); those with the destination are raised before anything is written.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import psutil
from PIL import Image
from tqdm import tqdm

from .encode import EvalCrop, Stored, encode
from .errors import DataError, SovitError
from .folders import find_classes, scan
from .splits import read_sidecar, sidecar_path

# Giants (e.g. 5000x3500 scans, and larger) are legitimate ImageNet images; PIL refuses above 2 x 89M pixels.
# Raised only in convert()'s own worker processes.
GIANT_IMAGE_PIXELS = 300_000_000
MAX_RESOLUTION = 16384  # a raw image of this side fills a 2 GiB FFCV page; FFCV stores sides as uint16


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
    # a shorter side below this (as stored) is skipped: the eval centre crop of a 1-pixel line is empty
    min_side: int = 8
    # val: store timm's eval crop at this size (raw) instead of the resized image; None for train
    eval_size: int | None = None
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def check(self) -> None:
        problems = [
            (16 <= self.max_resolution <= MAX_RESOLUTION, f"--max-resolution {self.max_resolution}",
             f"an integer in [16, {MAX_RESOLUTION}]"),
            (self.write_mode in ("jpg", "raw", "proportion"), f"--write-mode {self.write_mode!r}",
             "jpg, raw or proportion"),
            (0 <= self.compress_probability <= 1, f"--compress-probability {self.compress_probability}",
             "a probability in [0, 1]"),
            (1 <= self.jpeg_quality <= 100, f"--jpeg-quality {self.jpeg_quality}", "an integer in [1, 100]"),
            (self.chunk_size >= 1, f"--chunk-size {self.chunk_size}", "an integer >= 1"),
            (self.workers >= 1, f"--workers {self.workers}", "an integer >= 1"),
            (self.limit_per_class is None or self.limit_per_class >= 1, f"--limit-per-class {self.limit_per_class}",
             "an integer >= 1"),
            (1 <= self.min_side <= self.max_resolution, f"--min-side {self.min_side}",
             f"an integer in [1, --max-resolution {self.max_resolution}]"),
            (self.eval_size is None or 16 <= self.eval_size <= MAX_RESOLUTION, f"--eval-size {self.eval_size}",
             f"an integer in [16, {MAX_RESOLUTION}]"),
            (0 < self.crop_pct <= 1, f"--crop-pct {self.crop_pct}", "a fraction in (0, 1]"),
        ]
        for ok, what, expected in problems:
            if not ok:
                raise DataError(f"{what} is invalid: expected {expected}")
        names = _timm_interpolations() if self.eval_size else ()  # importing timm takes seconds: only where it is used
        if self.eval_size and self.interpolation not in names:
            raise DataError(f"--interpolation {self.interpolation!r} is invalid: expected one of timm's "
                            f"{', '.join(names)}")

    def eval_crop(self) -> EvalCrop | None:
        return None if self.eval_size is None else EvalCrop(self.eval_size, self.crop_pct, self.interpolation)


def _timm_interpolations() -> tuple[str, ...]:
    from timm.data.transforms import _str_to_pil_interpolation

    return tuple(_str_to_pil_interpolation)


def convert(src: str | Path, out: str | Path, *, classes_from: str | Path | None = None,
            options: ConvertOptions | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Convert one ImageFolder split; returns the report that is also written to ``<out>.json``."""
    opts = options or ConvertOptions()
    opts.check()
    src, out = Path(src), Path(out)
    _check_destination(out, overwrite)
    _remove_stale_temporaries(out)
    classes = _classes_from(Path(classes_from)) if classes_from is not None else find_classes(src)
    samples, unread, ignored = scan(src, classes)
    if opts.limit_per_class:  # samples are sorted by class, then name: keep the first N of each class
        samples = [s for i, s in enumerate(samples)
                   if i < opts.limit_per_class or samples[i - opts.limit_per_class][1] != s[1]]
    for s in unread:
        print(f"skipped {s['path']}: {s['reason']}")
    if ignored:
        print(f"ignored {len(ignored)} entries outside the class folders (hidden, nested or at the root of {src}): "
              f"listed in {sidecar_path(out)}")

    import ffcv.writer  # noqa: F401  (numba compiles on import, seconds that are not conversion time)

    t0 = time.perf_counter()
    tmp, sidecar_tmp = _temporary(out), _temporary(sidecar_path(out))
    try:
        kept, undecodable = _write(src, samples, tmp, opts, progress)
        elapsed = time.perf_counter() - t0
        empty = sorted(set(range(len(classes))) - set(kept))
        if empty:
            raise DataError(f"no usable images for class(es) {[classes[i] for i in empty][:5]} in {src}: "
                            "every class needs at least one image")
        report = {
            "format": "ffcv", "fields": {"image": "RGBImageField", "label": "IntField"},
            "source": str(src.resolve()), "num_samples": len(kept), "num_classes": len(classes),
            "classes": classes, "counts": dict(zip(classes, np.bincount(kept, minlength=len(classes)).tolist(),
                                                   strict=True)),
            "skipped": unread + undecodable, "ignored": ignored, "options": asdict(opts),
            "eval_crop": asdict(opts.eval_crop()) if opts.eval_crop() else None,
            "bytes": tmp.stat().st_size, "seconds": round(elapsed, 2),
            "images_per_second": round(len(samples) / elapsed, 1),
            "images_per_second_per_worker": round(len(samples) / elapsed / opts.workers, 1),
        }
        sidecar_tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out)
        sidecar_tmp.replace(sidecar_path(out))  # last: a sidecar names a complete .beton
    finally:
        for f in (tmp, sidecar_tmp):
            f.unlink(missing_ok=True)
    return report


def _write(src: Path, samples: list[tuple[str, int]], tmp: Path, opts: ConvertOptions,
           progress: bool) -> tuple[list[int], list[dict]]:
    """Write the .beton of ``samples`` to ``tmp`` with FFCV's own header, page and table layout: the labels of
    the kept images, and ``{"path", "reason"}`` of the others."""
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField

    fields = {"image": RGBImageField(write_mode=opts.write_mode, max_resolution=opts.max_resolution,
                                     compress_probability=opts.compress_probability, jpeg_quality=opts.jpeg_quality),
              "label": IntField()}
    writer = ffcv.writer.DatasetWriter(str(tmp), fields, page_size=_page_size(opts))
    writer.num_samples = len(samples)  # room for every candidate; the header counts the ones kept
    writer.prepare()
    try:
        metadata = np.zeros(len(samples), writer.metadata_type)
        with closing(_encoded(src, samples, opts, progress)) as encoded:  # an error here stops the workers now
            kept, skipped, allocations = _lay_out(tmp, writer, metadata, samples, encoded)
        np.frombuffer(writer.metadata_sm.buf, writer.metadata_type)[:] = metadata  # the view dies here
        writer.header["num_samples"] = len(kept)
        writer.finalize(allocations)
    finally:
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()
    return kept, skipped


def _lay_out(tmp: Path, writer, metadata: np.ndarray, samples: list[tuple[str, int]],
             encoded: Iterator[Stored | str]) -> tuple[list[int], list[dict], list]:
    """Append each kept image, in sample order, to FFCV pages as one writer process would."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.memory_allocator import MemoryAllocator

    images, labels = (metadata[name] for name in writer.metadata_type.names)
    modes = {mode: int(IMAGE_MODES[mode]) for mode in ("jpg", "raw")}  # FFCV's is a numba dict: slow from Python
    allocator = MemoryAllocator(str(tmp), writer.data_region_start, writer.page_size)
    kept, skipped = [], []
    with allocator:
        for (path, label), stored in zip(samples, encoded, strict=True):
            if isinstance(stored, str):
                skipped.append({"path": path, "reason": stored})
                tqdm.write(f"skipped {path}: {stored}")
                continue
            allocator.set_current_sample(len(kept))
            ptr, page = allocator.malloc(len(stored.payload))
            page[:] = np.frombuffer(stored.payload, np.uint8)
            images[len(kept)] = (modes[stored.mode], stored.width, stored.height, ptr)
            labels[len(kept)] = label
            kept.append(label)
    return kept, skipped, allocator.allocations


def _encoded(src: Path, samples: list[tuple[str, int]], opts: ConvertOptions, progress: bool
             ) -> Iterator[Stored | str]:
    """``encode`` of every sample, in order, from ``opts.workers`` processes; a worker that dies is a DataError."""
    work = partial(encode, max_resolution=opts.max_resolution, write_mode=opts.write_mode,
                   compress_probability=opts.compress_probability, jpeg_quality=opts.jpeg_quality,
                   min_side=opts.min_side, eval_crop=opts.eval_crop())
    paths = [p for p, _ in samples]
    keys = [Path(p).relative_to(src).as_posix() for p in paths]  # the proportion draw's seed: stable anywhere
    pool = ProcessPoolExecutor(opts.workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_init_worker)
    done = 0
    try:
        for stored in tqdm(pool.map(work, paths, keys, chunksize=opts.chunk_size), total=len(paths),
                           desc="converting", unit="img", smoothing=0.1, disable=not progress):
            yield stored
            done += 1
    except BrokenProcessPool as e:
        first = done // opts.chunk_size * opts.chunk_size
        raise DataError(f"a conversion worker died ({e}) on one of images {first}-"
                        f"{min(first + opts.chunk_size, len(paths)) - 1}, the first {paths[first]}: the output was "
                        "not written") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker() -> None:
    Image.MAX_IMAGE_PIXELS = GIANT_IMAGE_PIXELS
    cv2.setNumThreads(1)  # one worker per core already
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool


def _page_size(opts: ConvertOptions) -> int:
    """FFCV's default 8 MiB page, or the power of two that holds twice the largest raw image (a JPEG of noise at
    quality 100 can outgrow its raw pixels): FFCV cannot split an image across pages."""
    import ffcv.writer

    side = opts.eval_size or opts.max_resolution
    return max(4 * ffcv.writer.MIN_PAGE_SIZE, 1 << (2 * 3 * side * side - 1).bit_length())


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
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="images per worker task")
    p.add_argument("--workers", type=int, default=d.workers, help="processes (all cores this one may use)")
    p.add_argument("--limit-per-class", type=int, default=None, help="quick subsets: at most N images per class")
    p.add_argument("--min-side", type=int, default=d.min_side,
                   help="skip (and name) images whose shorter side, as stored, is below this")
    p.add_argument("--eval-size", type=int, default=None,
                   help="val: store timm's eval crop at this size (the run's img_size), so FFCV evaluation scores "
                        "what timm's standard transform scores on the original images; --max-resolution, "
                        "--write-mode and --min-side then do not apply")
    p.add_argument("--crop-pct", type=float, default=d.crop_pct, help="with --eval-size: the run's data.crop_pct")
    p.add_argument("--interpolation", default=d.interpolation,
                   help="with --eval-size: the run's data.eval_interpolation")
    a = p.parse_args(argv)
    opts = ConvertOptions(**{f.name: getattr(a, f.name) for f in fields(ConvertOptions)})
    try:
        r = convert(a.src, a.out, classes_from=a.classes_from, options=opts, overwrite=a.overwrite)
    except SovitError as e:
        p.exit(e.exit_code, f"error: {e}\n")
    print(f"wrote {a.out}: {r['num_samples']} images, {r['num_classes']} classes, {len(r['skipped'])} skipped, "
          f"{r['bytes'] / 2**20:.1f} MiB in {r['seconds']:.1f} s ({r['images_per_second']:.0f} img/s, "
          f"{r['images_per_second_per_worker']:.0f} img/s per worker); report: {sidecar_path(a.out)}")


if __name__ == "__main__":
    main()
