"""Where a split's data is and what it must hold, read without opening an image: its path, the .beton sidecar (its
class list and report), and the class names checked against the model's class count and the train split's. The
launcher checks data with these before it submits, the loaders when they start; only the standard library is
imported here, so ``import data_loaders`` (and ``pipeline.config``) stays light.
"""

from __future__ import annotations

import json
from itertools import zip_longest
from pathlib import Path
from typing import Literal

from .config import DataConfig
from .errors import ConfigError, DataError

Split = Literal["train", "val"]


def split_path(cfg: DataConfig, split: Split) -> Path:
    path = cfg.train if split == "train" else cfg.val
    if not path:
        raise ConfigError(f"data.{split} is not set: expected the {split} split's path "
                          f"({'a .beton file' if cfg.loader == 'ffcv' else 'an ImageFolder directory'})")
    if not Path(path).exists():
        raise DataError(f"data.{split}={path!r} does not exist: check the path (loader {cfg.loader!r})")
    return Path(path)


def check_classes(classes: list[str], source: Path | str, num_classes: int | None = None,
                  expected: list[str] | None = None) -> None:
    """``classes`` must equal ``expected`` (the train split's names) and number ``num_classes``: val with other
    names, even as many, would score top-1 against the wrong labels."""
    if expected is not None and list(classes) != list(expected):
        i, (got, want) = next((i, pair) for i, pair in enumerate(zip_longest(classes, expected)) if pair[0] != pair[1])
        got, want = (f"class {name!r}" if name is not None else "no class" for name in (got, want))
        raise DataError(f"{source} has {got} at index {i} where the train split has {want} ({len(classes)} vs "
                        f"{len(expected)} classes): train and val must hold the same class names")
    if num_classes is not None and len(classes) != num_classes:
        raise DataError(f"{source} has {len(classes)} classes but model.num_classes={num_classes}: set "
                        f"model.num_classes={len(classes)} or point data at the right dataset")


def sidecar_path(beton: str | Path) -> Path:
    """``train.beton`` -> ``train.beton.json``: the class list and report written beside a .beton."""
    beton = Path(beton)
    return beton.with_name(beton.name + ".json")


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of a .beton (``path`` is the .beton or the sidecar itself), checked to be one."""
    path = Path(path) if Path(path).suffix == ".json" else sidecar_path(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is missing or unreadable ({type(e).__name__}): it holds the class list; "
                        "re-create it with python -m data_loaders.convert") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("num_samples"), int)
            and isinstance(meta.get("classes"), list) and all(isinstance(c, str) for c in meta["classes"])):
        raise DataError(f"{path} is not a .beton sidecar (no 'classes' list of names and 'num_samples'): use the "
                        "<name>.beton.json written by python -m data_loaders.convert")
    return meta

