import hashlib

import pytest

from data_loaders.folders import find_classes, list_samples
from data_loaders.synthetic import generate, main


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.JPEG")}


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    a = generate(tmp_path / "a", classes=3, per_class=4, size=32, val_per_class=2, seed=1)
    b = generate(tmp_path / "b", classes=3, per_class=4, size=32, val_per_class=2, seed=1)
    c = generate(tmp_path / "c", classes=3, per_class=4, size=32, val_per_class=2, seed=2)
    assert _digest(a) == _digest(b) and len(_digest(a)) == 3 * 6
    assert _digest(a) != _digest(c)


def test_layout_is_an_imagefolder(synthetic_root):
    assert find_classes(synthetic_root / "train") == find_classes(synthetic_root / "val") == [
        "class_00", "class_01", "class_02", "class_03"]
    assert len(list_samples(synthetic_root / "train")) == 48 and len(list_samples(synthetic_root / "val")) == 20


def test_refuses_to_overwrite_and_reports_bad_arguments(tmp_path, capsys):
    generate(tmp_path / "d", classes=2, per_class=1, size=16)
    with pytest.raises(FileExistsError, match="already exists"):
        generate(tmp_path / "d", classes=2, per_class=1, size=16)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "e"), "--classes", "1"])
    assert "classes >= 2" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
