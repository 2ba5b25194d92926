"""ImageNet-style folders (``split/<class>/<image>``): class lists and samples, read the same way by every tool.

The converter, the DALI loader and the torchvision loader all label images through these functions, so a label
means the same class in a .beton, a DALI file list and an ImageFolder. Labels follow the sorted class directory
names; a split whose class list differs from the one it must match is an error, never a silent shift. So is a
class directory that is a broken symlink (dropping it would shift every later label) and a symlink loop anywhere.
A file that is not read - a name without an image extension, or a dangling image symlink - does not move labels:
``scan`` names it with the reason (the converter reports them), ``list_samples`` leaves it out. So does every
entry outside the layout (hidden, a folder inside a class folder and what it holds, a file at the root): ``scan``
names it as ignored, so a report can account for each entry of the tree.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import DataConfig
from .errors import DataError
from .splits import Split, check_classes, split_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _kind(entry: os.DirEntry) -> str:
    """'dir' or 'file' (symlinks followed), or why a symlink cannot be followed."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError as e:  # ELOOP: DirEntry only swallows a missing target
        raise DataError(f"{entry.path} is a symlink loop ({e.strerror}): remove the link or point it at a real "
                        "file or directory") from None
    return f"dangling symlink to {os.readlink(entry.path)}" if entry.is_symlink() else "not a regular file"


def _entries(directory: Path) -> list[tuple[os.DirEntry, str]]:
    return [(e, _kind(e)) for e in os.scandir(directory) if not e.name.startswith(".")]


def find_classes(root: str | Path) -> list[str]:
    """Sorted names of the class directories under ``root`` (hidden ones ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory: expected <split>/<class>/<image>")
    entries = _entries(root)
    broken = [f"{e.path} ({kind})" for e, kind in entries if kind.startswith("dangling")]
    if broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise DataError(f"class directory {broken[0]}{more} is broken: restore its target or remove the link, "
                        "otherwise every later class's label shifts")
    classes = sorted(e.name for e, kind in entries if kind == "dir")
    if not classes:
        raise DataError(f"image folder {root} has no class directories: expected {root}/<class>/<image>")
    return classes


def scan(root: str | Path, classes: list[str] | None = None
         ) -> tuple[list[tuple[str, int]], list[dict], list[dict]]:
    """``(samples, unread, ignored)``: ``[(path, label), ...]``, the images in a deterministic order (class, then
    file name); ``[{"path", "reason"}, ...]`` of the files in class folders that are not read; and the same of every
    other entry under ``root`` (hidden, nested in a class folder, at the root, and all those hold). Together they
    name each entry of the tree once.

    ``classes`` (e.g. the train split's list, applied to val) must equal the directories found; every class must
    hold at least one image.
    """
    root = Path(root)
    found = find_classes(root)
    check_classes(found, root, expected=classes)
    return _scan(root, found)


def _scan(root: Path, found: list[str]) -> tuple[list[tuple[str, int]], list[dict], list[dict]]:
    """``scan`` of a root whose class folders ``found`` were listed and checked already."""
    samples: list[tuple[str, int]] = []
    unread: list[dict] = []
    ignored: list[dict] = []
    for e in sorted(os.scandir(root), key=lambda entry: entry.name):
        if e.name.startswith("."):
            ignored += _ignore(e, "hidden (its name starts with '.'): not a class")
        elif e.name not in found:
            ignored += _ignore(e, "at the split's root, not in a class folder")
    for label, name in enumerate(found):
        images = []
        for e in sorted(os.scandir(root / name), key=lambda entry: entry.name):
            kind = "hidden" if e.name.startswith(".") else _kind(e)
            if kind == "hidden":
                ignored += _ignore(e, "hidden (its name starts with '.')")
            elif kind == "dir":
                ignored += _ignore(e, "a folder inside a class folder: only the class folder's own files are read")
            elif kind != "file":
                unread.append({"path": e.path, "reason": kind})
            elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(e.path)
            else:
                unread.append({"path": e.path, "reason": f"not an image extension ({', '.join(IMAGE_EXTENSIONS)})"})
        if not images:
            raise DataError(f"class directory {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                            "remove it or add its images, otherwise every later label shifts")
        samples += [(path, label) for path in images]
    return samples, unread, ignored


def _ignore(entry: os.DirEntry, reason: str) -> list[dict]:
    """``entry`` with ``reason`` and, for a directory, everything beneath it (symlinks not followed)."""
    out = [{"path": entry.path, "reason": reason}]
    if entry.is_dir(follow_symlinks=False):
        for top, dirs, files in os.walk(entry.path):
            dirs.sort()  # os.walk descends in this list's order
            out += [{"path": os.path.join(top, name), "reason": f"inside {entry.path}, which is ignored"}
                    for name in sorted(dirs + files)]
    return out


def list_samples(root: str | Path, classes: list[str] | None = None) -> list[tuple[str, int]]:
    """The images of ``scan``: what the folder loaders read."""
    return scan(root, classes)[0]


def read_split(cfg: DataConfig, split: Split, num_classes: int | None = None,
               classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """The ImageFolder a dali or torchvision loader reads: its class names, checked against the model's class count
    and the train split's names, and its ``(path, label)`` samples."""
    root = split_path(cfg, split)
    if not root.is_dir():
        raise DataError(f"data.{split}={str(root)!r} is not a directory: the {cfg.loader} loader reads an "
                        "ImageFolder (<split>/<class>/<image>)")
    found = find_classes(root)
    check_classes(found, root, num_classes, classes)
    return found, _scan(root, found)[0]  # the class folders are listed once
