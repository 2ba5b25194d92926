"""Session fixtures: one tiny synthetic ImageFolder and its .beton conversion, shared by all tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_loaders.synthetic import generate


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """4 classes x 12 train / 5 val JPEGs of 64 px: ``root/train/class_XX/*.JPEG``, ``root/val/...``."""
    return generate(tmp_path_factory.mktemp("data") / "synthetic", classes=4, per_class=12, size=64,
                    val_per_class=5, seed=0)


@pytest.fixture(scope="session")
def synthetic_betons(synthetic_root, tmp_path_factory) -> dict[str, Path]:
    """``{"train": .beton, "val": .beton}`` converted from ``synthetic_root`` (sidecars beside them)."""
    from data_loaders.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("betons")
    opts = ConvertOptions(max_resolution=64, workers=2)
    convert(synthetic_root / "train", out / "train.beton", options=opts, progress=False)
    convert(synthetic_root / "val", out / "val.beton", classes_from=out / "train.beton.json", options=opts,
            progress=False)
    return {"train": out / "train.beton", "val": out / "val.beton"}
