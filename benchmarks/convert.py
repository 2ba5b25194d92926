"""ImageFolder -> .beton speed: this project's converter against a plain FFCV writer, same images, interleaved.

    python benchmarks/convert.py [--images 2000] [--classes 20] [--workers 2] [--rounds 2] [--cores 32] [--data DIR]

The plain writer is ffcv-imagenet's ``write_imagenet.py``: torchvision's ``ImageFolder`` -> ``DatasetWriter`` with
``RGBImageField(write_mode='proportion', max_resolution=256, compress_probability=0.5, jpeg_quality=90)``,
chunksize 100, the same number of workers. The project converts with the same settings, and also checks every
file, writes its sidecar and lays the .beton out in a reproducible order. Data: ``synthetic.generate_photos``,
photo-like JPEGs at quality 90 with ImageNet's sizes (kept in --data DIR across runs; a temporary one otherwise).
Each conversion runs in a fresh process forked after the imports (numba compiles FFCV on import); rounds
alternate the two writers, so load from other jobs on a shared machine falls on both. Printed per conversion:
images/s, CPU ms per image (the process and its workers, user + system: steadier than wall time on a busy
machine), and the time ImageNet-1k train (1,281,167 images) would take on --cores cores at that CPU cost, if the
cores and not the disk are the limit (reading ImageNet's 140 GB takes 23 min at 100 MB/s).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

from data_loaders.convert import ConvertOptions, convert
from data_loaders.synthetic import generate_photos

IMAGENET_TRAIN = 1_281_167


def plain_ffcv(src: Path, out: Path, workers: int) -> None:
    """write_imagenet.py's conversion of one split."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    writer = DatasetWriter(str(out), {
        "image": RGBImageField(write_mode="proportion", max_resolution=256, compress_probability=0.5,
                               jpeg_quality=90),
        "label": IntField(),
    }, num_workers=workers)
    writer.from_indexed_dataset(ImageFolder(str(src)), chunksize=100)


def project(src: Path, out: Path, workers: int) -> None:
    convert(src, out, options=ConvertOptions(workers=workers), progress=False)


WRITERS = {"plain FFCV writer (write_imagenet.py)": plain_ffcv, "data_loaders.convert": project}


def _cpu_seconds() -> float:
    """User + system time of this process and of its children that have been waited for."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _timed(write, src: Path, out: Path, workers: int, results) -> None:
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # FFCV's own progress bar
        write(src, out, workers)
    for child in multiprocessing.active_children():  # FFCV does not join its workers: their CPU counts once joined
        child.join()
    results.put((time.perf_counter() - t0, _cpu_seconds() - cpu0, out.stat().st_size))


def measure(write, src: Path, out: Path, workers: int) -> tuple[float, float, int]:
    """(seconds, CPU seconds, bytes) of ``write`` in a fresh forked process."""
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    proc = fork.Process(target=_timed, args=(write, src, out, workers, results))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the {write.__name__} conversion failed (exit code {proc.exitcode}): see above")
    for f in out.parent.glob(f"{out.name}*"):  # the .beton and the project's sidecar
        f.unlink()
    return results.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cores", type=int, default=32, help="cores of the machine the ImageNet-1k projection is for")
    p.add_argument("--data", type=Path, help="keep the generated JPEGs here (made if missing)")
    a = p.parse_args()
    import ffcv.writer  # noqa: F401  (imported once here, not timed: numba compiles FFCV on import, seconds)
    import torchvision.datasets  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        src = a.data or Path(tmp) / "photos"
        if not src.exists():
            generate_photos(src, a.images, a.classes, workers=a.workers)
        n = sum(1 for _ in src.rglob("*.JPEG"))
        print(f"{n} photo-like JPEGs of ImageNet's sizes (quality 90) in {a.classes} classes, {a.workers} workers, "
              f"{a.rounds} interleaved rounds; max side 256, proportion 0.5, JPEG quality 90")
        print(f"{'round':<6}{'writer':<40}{'img/s':>8}{'CPU ms/img':>12}{'MiB':>8}"
              f"{f'ImageNet-1k, {a.cores} cores':>26}")
        totals = {name: [0.0, 0.0] for name in WRITERS}
        for r in range(a.rounds):
            for name, write in WRITERS.items():
                seconds, cpu, size = measure(write, src, Path(tmp) / "out.beton", a.workers)
                totals[name][0] += seconds
                totals[name][1] += cpu
                minutes = IMAGENET_TRAIN * cpu / n / a.cores / 60
                print(f"{r:<6}{name:<40}{n / seconds:>8.0f}{cpu / n * 1e3:>12.2f}{size / 2**20:>8.1f}"
                      f"{f'{minutes:.1f} min':>26}")
    (base_s, base_cpu), (ours_s, ours_cpu) = totals.values()
    print(f"data_loaders.convert vs plain FFCV writer, all rounds: {base_s / ours_s:.2f}x images/s, "
          f"{base_cpu / ours_cpu:.2f}x less CPU per image")


if __name__ == "__main__":
    main()
