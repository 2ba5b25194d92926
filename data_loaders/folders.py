"""ImageNet-style folders (``split/<class>/<image>``): class lists and samples, read the same way by every tool.

The converter, the DALI loader and the torchvision loader all label images through these two functions, so a
label means the same class in a .beton, a DALI file list and an ImageFolder. Labels follow the sorted class
directory names; a split whose class list differs from the one it must match is an error, never a silent shift.
"""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def find_classes(root: str | Path) -> list[str]:
    """Sorted names of the class directories under ``root`` (hidden ones ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a directory: expected <split>/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class directories: expected {root}/<class>/<image>")
    return classes


def list_samples(root: str | Path, classes: list[str] | None = None) -> list[tuple[str, int]]:
    """``[(path, label), ...]`` in a deterministic order (class, then file name).

    ``classes`` (e.g. the train split's list, applied to val) must equal the directories found; every class must
    hold at least one image.
    """
    root = Path(root)
    found = find_classes(root)
    if classes is not None and list(classes) != found:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise ValueError(f"class directories of {root} differ from the expected {len(classes)} classes "
                         f"(missing: {missing[:5]}, unexpected: {extra[:5]}): train and val must have the same classes")
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(found):
        files = sorted(e.name for e in os.scandir(root / name) if e.is_file() and _is_image(e.name))
        if not files:
            raise ValueError(f"class directory {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                             "remove it or add its images, otherwise every later label shifts")
        samples += [(str(root / name / f), label) for f in files]
    return samples
