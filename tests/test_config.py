"""The RunConfig: every shipped config loads, overrides apply, and each mistake is one clear line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
import typing

import pytest
from conftest import ROOT

from pipeline.config import ConfigError, RunConfig, load_config, parse_override, save_config
from pipeline.config_rules import FREE_TEXT, field_rules


@pytest.mark.parametrize("arch", [7, 10, 14, 19])
def test_arch_configs_load_with_the_authors_recipe(arch):
    cfg = load_config([f"arch/sovit_{arch}"], world_size=32)
    assert cfg.model.arch == f"sovit_{arch}" and cfg.model.img_size == 224
    assert cfg.optim.weight_decay == (0.03 if arch in (7, 10) else 0.05)
    assert cfg.schedule.epochs == 300 and cfg.schedule.cooldown_epochs == 10 and cfg.ema.decay == 0.99996
    assert cfg.data.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.data.crop_pct == 0.875


def test_demo_config_loads():
    cfg = load_config(["demo"], world_size=2)
    assert cfg.model.num_classes == 10 and cfg.data.loader == "ffcv"


def test_overrides_apply_in_order():
    cfg = load_config(["arch/sovit_7"], ["optim.lr=5e-4", "data.scale=[0.2, 1.0]", "optim.clip_grad=null",
                                         "train.zero_stage=2", "optim.clip_grad=1.5"])
    assert cfg.optim.lr == 5e-4 and cfg.data.scale == (0.2, 1.0) and cfg.train.zero_stage == 2
    assert cfg.optim.clip_grad == 1.5
    assert parse_override("a.b.c=x") == {"a": {"b": {"c": "x"}}}


BAD = [
    ([], ["modle.arch=sovit_7"], "unknown config key 'modle'"),
    ([], ["model.depth=12"], "unknown config key 'model.depth'"),
    ([], ["optim.lr=fast"], "optim.lr='fast' is invalid: expected float"),
    ([], ["train.zero_stage=4"], "train.zero_stage=4 is invalid: expected one of 0, 1, 2, 3"),
    ([], ["train.precision=fp8"], "train.precision='fp8' is invalid"),
    ([], ["model.arch=sovit_8"], "model.arch='sovit_8' is invalid"),
    ([], ["optim.lr=-1"], "optim.lr=-1.0 is invalid: expected a positive number"),
    ([], ["model.img_size=100", "data.img_size=100"], "model.img_size=100 is invalid: expected a multiple of 8"),
    ([], ["data.img_size=160"], "data.img_size=160 is invalid: expected equal to model.img_size (224)"),
    ([], ["schedule.warmup_epochs=300"], "schedule.warmup_epochs=300 is invalid"),
    ([], ["data.hflip=1.5"], "data.hflip=1.5 is invalid: expected a probability"),
    ([], ["data.scale=[0.5]"], "data.scale=[0.5] is invalid: expected a list of 2 values"),
    ([], ["train.zero_stage=3"], "ema.enabled=True is invalid: expected false with train.zero_stage=3"),
    ([], ["data.micro_batch_size=7", "train.global_batch_size=14"],
     "data.micro_batch_size=7 is invalid: expected an even"),
    ([], ["train.global_batch_size=100", "data.micro_batch_size=32"], "train.global_batch_size=100 is invalid"),
    (["nope.yaml"], [], "config file 'nope.yaml' not found"),
    ([], ["optim.lr"], "override 'optim.lr' is invalid: expected section.key=value"),
    ([], ["optim.lr=.inf"], "optim.lr=inf is invalid: expected a finite number"),
    ([], ["optim.lr=.nan"], "optim.lr=nan is invalid: expected a finite number"),
    ([], ["data.scale=[0.1, 1"], "override 'data.scale=[0.1, 1' is invalid: its value is not valid YAML"),
]


@pytest.mark.parametrize(("files", "sets", "message"), BAD, ids=[b[2][:40] for b in BAD])
def test_bad_configs_are_one_clear_line(files, sets, message):
    with pytest.raises(ConfigError) as e:
        load_config(files, sets)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_global_batch_must_divide_by_world_size():
    with pytest.raises(ConfigError, match=r"micro_batch_size x world size = 32 x 3 = 96"):
        load_config(["arch/sovit_7"], world_size=3)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("optim:\n  lr: 1.0e-3  # \xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"config {tmp_path / 'latin1.yaml'} is not UTF-8 text"):
        load_config([tmp_path / "latin1.yaml"])


def test_yaml_errors(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config([tmp_path / "list.yaml"])
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config([tmp_path / "a.yaml"])
    (tmp_path / "broken.yaml").write_text("model: {arch: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([tmp_path / "broken.yaml"])


def test_rank_environment_from_a_plain_srun_task(monkeypatch):
    """No torchrun, no submitit pickle: SLURM's own variables must become torch.distributed's."""
    from pipeline.distributed import export_env

    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[1-2]",
             "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "2",
             "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_TASKS_PER_NODE": "2(x2)"}
    # export_env writes RANK, MASTER_ADDR, ... into os.environ: give it a private copy, or every later test's
    # subprocess inherits rank 3 of 4 and waits forever for a rendezvous at node1
    rank_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "SUBMITIT_EXECUTOR")
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in rank_vars} | slurm)
    export_env()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("3", "1", "4")
    assert os.environ["MASTER_ADDR"] == "node1" and int(os.environ["MASTER_PORT"]) > 1024


def test_saved_config_hides_tracking_credentials(tmp_path):
    from pipeline.tracking import redact

    cfg = load_config(["arch/sovit_7"], ["tracking.uri=http://alice:s3cr3t-TOKEN@mlflow.example:5000"])
    save_config(cfg, tmp_path / "config.yaml", redact=redact)
    text = (tmp_path / "config.yaml").read_text()
    assert "s3cr3t-TOKEN" not in text and "mlflow.example:5000" in text
    assert cfg.tracking.uri.endswith("s3cr3t-TOKEN@mlflow.example:5000")  # the run itself still connects


def _fields() -> list[tuple[str, object]]:
    """Every ``section.key`` of RunConfig with its annotation, read from the dataclasses: a new field is covered."""
    out = []
    for section in dataclasses.fields(RunConfig):
        hints = typing.get_type_hints(typing.get_type_hints(RunConfig)[section.name])
        out += [(f"{section.name}.{name}", tp) for name, tp in hints.items()]
    return out


FIELDS = _fields()


def _base(tp):
    """The annotation without its None: ``int | None`` -> int; a Literal or a tuple as itself."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp


def _wrong_type(tp):
    """A value of a type the field does not take (YAML spells it so on the command line)."""
    base = _base(tp)
    if typing.get_origin(base) is typing.Literal:
        return ["a", "list"]
    return {bool: "maybe", int: 2.5, float: "fast", str: 12}.get(base, "text")  # tuples get text


def _enum_like(key: str, tp) -> bool:
    base = _base(tp)
    return key not in FREE_TEXT and (base is str or typing.get_origin(base) is typing.Literal)


def _cases():
    """Per field: a wrong type; a number out of its rule's range; for an enum-like text, a value no library takes
    (a URI's: an unknown scheme, as ``no-such-value`` is a file store's path to MLflow)."""
    rules = field_rules()
    for key, tp in FIELDS:
        yield key, "wrong type", _wrong_type(tp)
        if _enum_like(key, tp):
            yield key, "wrong enum", rules[key].outside if key in rules else "no-such-value"
        elif key in rules:
            yield key, "out of range", rules[key].outside


def test_every_field_has_a_rule_or_a_type_that_is_one():
    """Literal and bool fields are checked by their type, paths and names are free text; every other field needs a
    rule in field_rules(), and no rule names a field that does not exist."""
    rules, keys = field_rules(), {key for key, _ in FIELDS}
    by_type = {key for key, tp in FIELDS if _base(tp) is bool or typing.get_origin(_base(tp)) is typing.Literal}
    assert set(rules) <= keys
    assert keys - set(rules) - by_type - set(FREE_TEXT) == set()


@pytest.mark.parametrize(("key", "kind", "value"), list(_cases()), ids=[f"{k}-{c}" for k, c, _ in _cases()])
def test_each_field_refuses_a_wrong_type_an_out_of_range_value_and_a_wrong_enum(key, kind, value):
    with pytest.raises(ConfigError) as e:
        load_config([], [f"{key}={json.dumps(value)}"])
    assert str(e.value).startswith(f"{key}=") and "\n" not in str(e.value), str(e.value)


def test_a_credential_in_a_refused_uri_is_not_printed():
    with pytest.raises(ConfigError) as e:
        load_config([], ["tracking.uri=foo://alice:s3cr3t@host"])
    assert "s3cr3t" not in str(e.value) and "foo://***@host" in str(e.value)


@pytest.mark.parametrize("bad", ["data.auto_augment=garbage", "train.seed=1099511627776", "tracking.uri=foo://bar"])
def test_train_py_refuses_a_bad_value_in_one_line_before_any_work(bad, tmp_path):
    """Values that used to pass and crash after DeepSpeed started (or train and log nothing): exit 2, one line,
    nothing started and nothing written."""
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "launchers" / "train.py"), "--arch", "7", "--set", bad, "--set",
                        f"checkpoint.run_dir={run_dir}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.startswith(f"error: {bad.split('=')[0]}=") and r.stderr.count("\n") == 1, r.stderr
    assert not run_dir.exists()
