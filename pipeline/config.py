"""The run configuration: typed dataclasses, loaded from YAML with ``--set`` overrides, validated once.

Every later layer (loaders, engine, launchers) reads a ``RunConfig`` and trusts it, so everything a user can
get wrong is checked here, before any process group, file or model exists. Errors are ``ConfigError``: one
line naming the key, the bad value and what is expected.

YAML files may name other files under ``defaults:`` (paths relative to ``configs/`` or to the file itself);
those load first, the file's own keys override them, and ``--set section.key=value`` overrides last.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from data_loaders.config import DataConfig
from data_loaders.errors import ConfigError

from . import files
from .config_rules import ARCHS, check, field_rules

if TYPE_CHECKING:
    import torch

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ModelConfig:
    arch: str = "sovit_7"
    img_size: int = 224
    num_classes: int | None = None  # None: the data's class count (the .beton sidecar or the train ImageFolder)
    drop_path_rate: float = 0.1
    drop_rate: float = 0.0
    head: Literal["so", "cls"] = "so"  # "cls" switches the second-order branch off (ablation)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # at base_batch_size; scaled linearly with the global batch
    base_batch_size: int = 512
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = None


@dataclass
class ScheduleConfig:
    epochs: int = 300
    cooldown_epochs: int = 10
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5


@dataclass
class MixupConfig:
    mixup: float = 0.8
    cutmix: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = 0.1


@dataclass
class EmaConfig:
    enabled: bool = True
    decay: float = 0.99996


@dataclass
class TrainConfig:
    global_batch_size: int = 1024
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # autocast compute; weights and optimizer stay fp32
    zero_stage: Literal[0, 1, 2, 3] = 0
    seed: int = 0
    max_steps: int | None = None  # stop early (demo, tests); None = the full schedule
    eval_every_epochs: int = 1
    log_every_steps: int = 20
    # how often ranks agree on a stop signal (SIGUSR1/SIGTERM/Ctrl-C): one small all-reduce and host sync each time.
    # SLURM warns 120 s ahead (--signal USR1@120), so every 10 steps is ample at any realistic step time.
    stop_check_every_steps: int = 10
    compile: bool | None = None  # torch.compile the model; None: on with CUDA below ZeRO-3, else off
    peak_tflops: float | None = None  # for MFU; None = detected GPU bf16 peak, none on CPU


@dataclass
class CheckpointConfig:
    run_dir: str = ""  # "": runs/<arch>-<SLURM job id, else start time>, so two runs never share a directory
    every_steps: int = 1000
    keep_last: int = 3
    # resuming with another arch, num_classes, img_size or global batch is refused unless this is true
    allow_config_change: bool = False


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project
    experiment: str = "sovit"
    run_name: str | None = None
    system_metrics: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def grad_accum_steps(self, world_size: int) -> int:
        return self.train.global_batch_size // (self.data.micro_batch_size * world_size)

    def scaled_lr(self) -> float:
        """The linear scaling rule (Goyal et al.): lr grows with the global batch."""
        return self.optim.lr * self.train.global_batch_size / self.optim.base_batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"optim.lr": 1e-3, ...}``: what MLflow records as params."""
        return {f"{s}.{k}": v for s, sub in self.to_dict().items() for k, v in sub.items()}

    def validate(self, world_size: int | None = None) -> RunConfig:
        """Every field against its rule (``field_rules``), then the checks across fields. With ``world_size`` also
        the batch arithmetic of that many ranks."""
        flat = self.flat()
        for key, rule in field_rules().items():
            check(rule.ok(flat[key]), key, flat[key], rule.expected)
        m, d, t = self.model, self.data, self.train
        check(d.img_size == m.img_size, "data.img_size", d.img_size,
               f"equal to model.img_size ({m.img_size})")
        s = self.schedule
        check(s.warmup_epochs < s.epochs, "schedule.warmup_epochs", s.warmup_epochs,
               f"an integer in [0, schedule.epochs={s.epochs})")
        check(t.global_batch_size % d.micro_batch_size == 0, "train.global_batch_size", t.global_batch_size,
               f"a multiple of data.micro_batch_size={d.micro_batch_size}")
        check(not (t.precision == "fp16" and t.zero_stage > 0), "train.precision", t.precision,
               f"bf16 or fp32 with train.zero_stage={t.zero_stage}, or fp16 with train.zero_stage=0 (DeepSpeed's "
               "ZeRO optimizer skips an overflowing fp16 step before the gradient scaler sees it: the scale never "
               "backs off)")
        check(not (self.ema.enabled and t.zero_stage == 3), "ema.enabled", self.ema.enabled,
               "false with train.zero_stage=3 (ZeRO-3 partitions the parameters the EMA copies; use stage <= 2)")
        mixing = (self.mixup.mixup > 0 or self.mixup.cutmix > 0) and self.mixup.prob > 0
        check(not (mixing and d.micro_batch_size % 2), "data.micro_batch_size", d.micro_batch_size,
               "an even number while mixup/cutmix is on (timm's Mixup pairs each batch with its flip)")
        redacted = self.tracking.enabled and "***@" in (self.tracking.uri or "")
        check(not redacted or os.environ.get("MLFLOW_TRACKING_URI"), "tracking.uri", self.tracking.uri,
               "its credentials in $MLFLOW_TRACKING_URI (a redacted URI stands for that variable)")
        if world_size is not None:
            per_step = d.micro_batch_size * world_size
            check(t.global_batch_size % per_step == 0, "train.global_batch_size", t.global_batch_size,
                   f"a multiple of data.micro_batch_size x world size = {d.micro_batch_size} x {world_size}"
                   f" = {per_step}")
        return self


def resolve_device_defaults(cfg: RunConfig, device: torch.device) -> None:
    """``None`` means "what is fast here": channels_last and torch.compile pay off on CUDA, cost time on a CPU.
    Not compile at ZeRO-3: its parameter-gathering hooks on every submodule are ``torch.compiler.disable``d, so the
    compiled model is one graph break per submodule, compile time without its gain."""
    on_gpu = device.type == "cuda"
    if cfg.data.channels_last is None:
        cfg.data.channels_last = on_gpu
    if cfg.train.compile is None:
        cfg.train.compile = on_gpu and cfg.train.zero_stage < 3


# ---------------------------------------------------------------------------------------------- loading


def load_config(files: list[str | Path] = (), overrides: list[str] = (), world_size: int | None = None
                ) -> RunConfig:
    """Merge YAML ``files`` in order, then ``key=value`` overrides; build and validate a RunConfig."""
    merged: dict[str, Any] = {}
    for f in files:
        _deep_merge(merged, read_yaml(_resolve(f, CONFIGS_DIR)))
    for o in overrides:
        _deep_merge(merged, parse_override(o))
    return from_dict(merged).validate(world_size)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The config flags every launcher shares, so ``train.py`` and ``submit.py`` read configs alike."""
    parser.add_argument("--arch", help="7, 10, 14 or 19: loads configs/arch/sovit_N.yaml first")
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="config file(s) merged in order after --arch (repeatable)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override one key, e.g. --set optim.lr=5e-4 (repeatable, applied last)")


def config_from_args(args: argparse.Namespace, world_size: int | None = None) -> RunConfig:
    files: list[str | Path] = []
    if args.arch is not None:
        arch = str(args.arch).removeprefix("sovit_")
        if f"sovit_{arch}" not in ARCHS:
            raise ConfigError(f"--arch {args.arch!r} is invalid: expected one of 7, 10, 14, 19")
        files.append(CONFIGS_DIR / "arch" / f"sovit_{arch}.yaml")
    files += args.config
    return load_config(files, args.overrides, world_size)


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.lr=1e-3"`` -> ``{"optim": {"lr": 0.001}}``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {text!r} is invalid: expected section.key=value, e.g. optim.lr=1e-3")
    try:
        value = _unquoted(raw) if not _utf8(raw) else yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r} is invalid: its value is not valid YAML "
                          f"({str(e).splitlines()[0]}); quote strings, e.g. {key}='a: b'") from None
    node: dict[str, Any] = {}
    cur = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return node


def _utf8(text: str) -> bool:
    """False for a value holding bytes that are not UTF-8, which a path may (argv decodes them to surrogates); YAML
    cannot read those, so such a value is taken as the string it is."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _unquoted(text: str) -> str:
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig, rejecting unknown sections/keys and values of the wrong type."""
    return _build(RunConfig, raw, prefix="")


def save_config(cfg: RunConfig, path: str | Path, redact: Callable[[str], str] | None = None) -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file). ``redact`` cleans the
    tracking URI, which may carry credentials (``http://user:TOKEN@host``)."""
    path = Path(path)
    data = plain(cfg.to_dict())
    if redact is not None and data["tracking"]["uri"]:
        data["tracking"]["uri"] = redact(data["tracking"]["uri"])
    files.write_text(path, yaml.safe_dump(data, sort_keys=False))


def plain(x: Any) -> Any:
    """Tuples as lists, recursively: what ``yaml.safe_dump`` (and JSON) can write."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def _resolve(name: str | Path, base: Path) -> Path:
    p = Path(name)
    for cand in (p, base / p, CONFIGS_DIR / p):
        for c in (cand, cand.with_suffix(".yaml")):
            if c.is_file():
                return c
    raise ConfigError(f"config file {str(name)!r} not found (looked in ., {base} and {CONFIGS_DIR})")


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a mapping, its ``defaults:`` merged in first; ConfigError for a file that is not one."""
    if path in seen:
        raise ConfigError(f"config {path} includes itself through defaults: {' -> '.join(map(str, seen))}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start}): save it as UTF-8 YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    merged: dict[str, Any] = {}
    for parent in data.pop("defaults", None) or []:
        _deep_merge(merged, read_yaml(_resolve(parent, path.parent), (*seen, path)))
    _deep_merge(merged, data)
    return merged


def _deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}={raw!r} is invalid: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(f"unknown config key {key!r}: expected one of {', '.join(prefix + f for f in fields)}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int->float and list->tuple, nothing looser."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{key}={value!r} is invalid: expected one of {', '.join(map(repr, args))}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} is invalid: expected a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:  # YAML 1.1 reads "1e-3" as a string
            number = float(value)
        except ValueError:
            number = None
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise ConfigError(f"{key}={value!r} is invalid: expected a finite number")
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}={value!r} is invalid: expected {getattr(tp, '__name__', tp)}")
