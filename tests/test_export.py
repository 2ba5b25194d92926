"""Exports describe themselves: timm and launchers/evaluate.py rebuild a run's model and eval transform from the
export alone and reproduce the run's own top-1; damaged or foreign checkpoints end in one ``error:`` line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import ROOT, tiny_run, train
from safetensors import safe_open
from safetensors.torch import load_file

import pipeline.models  # noqa: F401  (registers sovit_* with timm)
from launchers.evaluate import main as evaluate
from launchers.export import main as export
from pipeline.config import load_config
from pipeline.export import consolidated_state_dict, save_local_dir

TAGS = ("step_00000003", "step_00000006")


@pytest.fixture(scope="module")
def run(synthetic_root, tmp_path_factory) -> Path:
    """A finished 6-step run with EMA: checkpoints at steps 3 and 6, an evaluation at step 6, best.safetensors."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train(tiny_run(synthetic_root, run_dir, 6), run_dir.parent)
    assert sorted(p.name for p in run_dir.glob("step_*")) == list(TAGS)
    return run_dir


@pytest.fixture(scope="module")
def exported(run) -> Path:
    out = run.parent / "exported"
    assert export([str(run), "--out", str(out)]) == 0
    return out


def final(run: Path) -> dict:
    return json.loads((run / "final_metrics.json").read_text())


def printed(out: str) -> tuple[float, float]:
    """(top-1, loss) from evaluate.py's result line."""
    words = out.strip().splitlines()[-1].split()
    return float(words[1]), float(words[5])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_export_folder_is_all_timm_needs(run, exported, synthetic_root):
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    hub = json.loads((exported / "config.json").read_text())
    assert hub["architecture"] == "sovit_7" and hub["num_classes"] == 4
    assert hub["model_args"] == {"img_size": 32, "head": "so"}
    assert {"input_size", "mean", "std", "crop_pct", "interpolation"} <= set(hub["pretrained_cfg"])

    model = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    expected = consolidated_state_dict(run)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert not torch.equal(timm.create_model(f"local-dir:{exported}").head.weight, expected["head.weight"])  # timm
    # loads the weights with pretrained=True only

    data = ImageFolder(synthetic_root / "val", transform=create_transform(**resolve_data_config(model=model)))
    images, labels = map(torch.stack, zip(*[(x, torch.tensor(y)) for x, y in data], strict=True))
    with torch.no_grad():
        logits = model(images)
    top1 = 100 * (logits.argmax(1) == labels).float().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert top1 == pytest.approx(final(run)["val_top1"], abs=0.5)  # 20 images: 0.5 points means the same count
    assert loss == pytest.approx(final(run)["val_loss"], abs=1e-3)


def test_evaluate_needs_nothing_but_the_export_folder(run, exported, synthetic_root):
    """The command the run prints, on one core: an export carries no worker count, so evaluate does not warn that
    the default data.workers=8 exceeds the cores."""
    one_core = min(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, str(ROOT / "launchers" / "evaluate.py"), "--checkpoint", str(exported),
                          "--data", str(synthetic_root / "val")], capture_output=True, text=True, timeout=300,
                         preexec_fn=lambda: os.sched_setaffinity(0, {one_core}))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "data.workers" not in out.stderr, out.stderr
    top1, loss = printed(out.stdout)
    assert top1 == pytest.approx(final(run)["val_top1"], abs=0.5)
    assert loss == pytest.approx(final(run)["val_loss"], abs=1e-3)


def test_best_safetensors_carries_the_config_evaluate_needs(run, exported, synthetic_root, capsys):
    """best.safetensors holds the EMA that scored best (at 32 px, 4 classes): evaluate.py reads both from its header
    instead of building the default 224 px, 1000-class model."""
    with safe_open(str(run / "best.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["config"]) == json.loads((exported / "config.json").read_text())
    assert evaluate(["--checkpoint", str(run / "best.safetensors"), "--data", str(synthetic_root / "val")]) == 0
    top1, loss = printed(capsys.readouterr().out)
    assert top1 == pytest.approx(final(run)["best_top1"], abs=0.5)
    assert loss == pytest.approx(final(run)["val_ema_loss"], abs=1e-3)


def test_ema_export_to_one_file_is_the_evaluated_ema(run, tmp_path):
    out = tmp_path / "ema.safetensors"
    assert export([str(run), "--out", str(out), "--ema"]) == 0
    ema, best = load_file(out), load_file(run / "best.safetensors")  # the step-6 EMA, which scored best
    assert ema.keys() == best.keys() and all(torch.equal(ema[k], best[k]) for k in ema)
    assert not torch.equal(ema["head.weight"], consolidated_state_dict(run)["head.weight"])


def test_exports_create_their_folders_and_honour_the_umask(run, tmp_path):
    """README's ``--out exports/sovit19`` on a fresh clone: missing parents are created. Every exported file, and
    training's best.safetensors, gets the process umask as config.json does (safetensors' own writer made the
    weights 0600: unreadable to colleagues on a shared filesystem)."""
    umask = os.umask(0o027)
    try:
        assert export([str(run), "--out", str(tmp_path / "exports" / "sovit7")]) == 0
        assert export([str(run), "--out", str(tmp_path / "files" / "deeper" / "m.safetensors")]) == 0
    finally:
        os.umask(umask)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert modes == {"exports/sovit7/config.json": 0o640, "exports/sovit7/model.safetensors": 0o640,
                     "files/deeper/m.safetensors": 0o640}
    assert (run / "best.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # the trainer ran under ``umask``


def test_export_fine_tunes_to_other_classes_in_timm(tmp_path):
    """The config names both classifiers, so timm drops them (not the backbone) for another class count."""
    cfg = load_config([], ["model.num_classes=4", "model.img_size=32", "data.img_size=32"])
    torch.manual_seed(0)
    src = timm.create_model("sovit_7", num_classes=4, img_size=32)
    save_local_dir(src.state_dict(), cfg, tmp_path / "m")
    dst = timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True, num_classes=10)
    assert dst.head.out_features == dst.so_head.out_features == 10
    assert torch.equal(dst.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)


def test_a_corrupt_newest_is_refused_naming_the_one_that_reads_and_all_corrupt_is_one_line(run, synthetic_root,
                                                                                            tmp_path, capsys):
    """Never an older checkpoint in silence: export and evaluate name the damaged newest one and how to pick the
    newest that reads (--tag), which then gives exactly its weights."""
    copy = shutil.copytree(run, tmp_path / "run")

    def truncate(tag: str) -> None:
        states = copy / tag / "mp_rank_00_model_states.pt"
        states.write_bytes(states.read_bytes()[:1000])

    truncate(TAGS[1])
    assert export([str(copy), "--out", str(tmp_path / "refused")]) == 2
    line = one_error_line(capsys)
    assert f"newest checkpoint is unreadable: {TAGS[1]} (" in line and f"pass --tag {TAGS[0]}" in line, line
    assert evaluate(["--checkpoint", str(copy), "--data", str(synthetic_root / "val")]) == 2
    assert f"pass --tag {TAGS[0]}" in one_error_line(capsys) and not (tmp_path / "refused").exists()
    assert export([str(copy), "--out", str(tmp_path / "older"), "--tag", TAGS[0]]) == 0
    got, want = load_file(tmp_path / "older" / "model.safetensors"), consolidated_state_dict(run, TAGS[0])
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
    truncate(TAGS[0])
    assert export([str(copy), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert all(tag in line for tag in TAGS) and not (tmp_path / "out").exists()


def test_an_export_to_a_full_disk_is_one_line_and_leaves_nothing(run, small_disk, capsys):
    """16 MiB of weights into 8 MiB: one line with the free space df sees, and no temporary folder or file left."""
    assert export([str(run), "--out", str(small_disk / "export")]) == 2
    line = one_error_line(capsys)
    assert f"could not write {small_disk / 'export'} (" in line and "MiB free" in line, line
    free = float(line.split(" MiB free")[0].rsplit(" ", 1)[1])
    assert abs(free - shutil.disk_usage(small_disk).free / 2**20) < 0.1 and list(small_disk.iterdir()) == []


class Payload:
    """Pickles as a call to ``exec`` that creates ``marker``: what a planted checkpoint runs when unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_planted_pickle_never_runs(run, tmp_path, synthetic_root, capsys):
    marker = tmp_path / "pwned"
    torch.save({"module": Payload(marker)}, tmp_path / "payload.pt")
    torch.load(tmp_path / "payload.pt", weights_only=False)  # the payload is live: loading it runs it
    assert marker.exists()
    marker.unlink()

    copy = shutil.copytree(run, tmp_path / "run")
    shutil.copy(tmp_path / "payload.pt", copy / TAGS[1] / "mp_rank_00_model_states.pt")
    assert export([str(copy), "--out", str(tmp_path / "older"), "--tag", TAGS[0]]) == 0  # the newest is not read
    shutil.copy(tmp_path / "payload.pt", copy / TAGS[0] / "mp_rank_00_model_states.pt")
    assert export([str(copy), "--out", str(tmp_path / "out")]) == 2
    assert "foreign objects (builtins.exec)" in one_error_line(capsys)
    assert evaluate(["--checkpoint", str(copy), "--data", str(synthetic_root / "val")]) == 2
    assert "foreign objects (builtins.exec)" in one_error_line(capsys)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_bad_arguments_are_one_error_line(run, exported, synthetic_root, tmp_path, capsys):
    val = str(synthetic_root / "val")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import save_file

    save_file(load_file(exported / "model.safetensors"), bare)  # no config in the header
    cases = [
        (export, [str(tmp_path), "--out", str(tmp_path / "m")], "not a run directory"),
        (export, [str(run), "--out", str(tmp_path / "notes")], "not an earlier export"),
        (evaluate, ["--checkpoint", str(tmp_path), "--data", val], "neither a run directory"),
        (evaluate, ["--checkpoint", str(exported), "--data", str(tmp_path / "nothing")], "does not exist"),
        (evaluate, ["--checkpoint", str(exported), "--data", val, "--ema"], "--ema needs a run directory"),
        (evaluate, ["--checkpoint", str(bare), "--data", val], "carries no config"),
        (evaluate, ["--checkpoint", str(exported), "--data", val, "--set", "model.head=cls"], "do not fit"),
    ]
    for main, argv, expected in cases:
        assert main(argv) == 2, argv
        assert expected in one_error_line(capsys), argv
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("script", ["export.py", "evaluate.py"])
def test_help_imports_nothing_heavy(script):
    """``--help`` parses arguments before torch, timm or DeepSpeed load (measured on the 2-core machine: 0.1 s for
    export.py and 0.2 s for evaluate.py, against 1.9 s and 6.2 s when they imported torch first)."""
    code = ("import runpy, sys\n"
            f"sys.argv = [{script!r}, '--help']\n"
            "try:\n"
            f"    runpy.run_path({str(ROOT / 'launchers' / script)!r}, run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'deepspeed', 'numpy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "usage:" in out.stdout and out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
