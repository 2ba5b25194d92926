"""What each field of the run configuration accepts beyond its type, and the one line that says so when a value
is refused. ``RunConfig.validate`` checks every field against its rule; tests/test_config.py fails when a new field
has none and feeds every rule the value it refuses.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

from data_loaders.errors import ConfigError

ARCHS = ("sovit_7", "sovit_10", "sovit_14", "sovit_19")
# fields any text is right for: paths (the loaders and the run lock check them, naming the key) and names
FREE_TEXT = ("data.train", "data.val", "checkpoint.run_dir", "tracking.run_name")


class Rule(NamedTuple):
    """What one field accepts beyond its type: ``ok(value)``, that in words, and a value it refuses (the tests
    feed that one to every field)."""

    ok: Callable[[Any], bool]
    expected: str
    outside: Any

PROBABILITY = Rule(lambda v: 0 <= v <= 1, "a probability in [0, 1]", 1.5)
BELOW_ONE = Rule(lambda v: 0 <= v < 1, "a number in [0, 1)", 1.0)
SEED = Rule(lambda v: 0 <= v < 2**31, "an integer in [0, 2**31) (numpy's seeds are 32-bit, and the rank and step are "
            "added)", -1)


def field_rules() -> dict[str, Rule]:
    """The rule of every field that is not a Literal, a bool or free text (``FREE_TEXT``). Enum-like strings are
    checked by the libraries that read them: timm builds its transforms with the value, MLflow looks its URI scheme
    up in its own store registry."""
    return {**_model_rules(), **_data_rules(), **_run_rules()}


def _model_rules() -> dict[str, Rule]:
    return {
        "model.arch": Rule(lambda v: v in ARCHS, f"one of {', '.join(ARCHS)}", "sovit_8"),
        "model.img_size": Rule(lambda v: v >= 32 and v % 8 == 0, "a multiple of 8, at least 32 (the token embedding "
                               "downsamples by 8 or more)", 100),
        "model.num_classes": _optional(_at_least(2), "for the data's class count"),
        "model.drop_path_rate": BELOW_ONE,
        "model.drop_rate": BELOW_ONE,
    }


def _data_rules() -> dict[str, Rule]:
    return {
        "data.micro_batch_size": _at_least(1),
        "data.workers": _at_least(0),
        "data.img_size": _at_least(32),  # and equal to model.img_size, below
        "data.scale": Rule(lambda v: 0 < v[0] <= v[1] <= 1, "(min, max) with 0 < min <= max <= 1", (0.0, 1.0)),
        "data.ratio": Rule(lambda v: 0 < v[0] <= v[1], "(min, max) with 0 < min <= max", (1.0, 0.5)),
        "data.hflip": PROBABILITY,
        "data.mean": Rule(lambda v: all(0 <= x <= 1 for x in v), "three numbers in [0, 1] (of pixels scaled to "
                          "[0, 1])", (0.5, 0.5, 128.0)),
        "data.std": Rule(lambda v: all(x > 0 for x in v), "three positive numbers", (0.2, 0.2, 0.0)),
        "data.crop_pct": Rule(lambda v: 0 < v <= 1, "a fraction in (0, 1]", 0.0),
        "data.train_interpolation": _timm("an interpolation timm knows (bilinear, bicubic, ...) or random",
                                          is_training=True, interpolation=None),
        "data.eval_interpolation": _timm("an interpolation timm knows (bilinear, bicubic, ...)", is_training=False,
                                         interpolation=None),
        "data.auto_augment": _optional(_timm("a policy timm's parser accepts (rand-m9-mstd0.5-inc1, augmix-m5, "
                                             "original, ...)", is_training=True, auto_augment=None)),
        "data.color_jitter": _timm(">= 0 (timm's colour jitter strength)", is_training=True, color_jitter=None),
        "data.reprob": PROBABILITY,
        "data.remode": _timm("a random-erasing mode timm knows (const, rand, pixel)", is_training=True, re_prob=0.5,
                             re_mode=None),
        "data.seed": SEED,
    }


def _run_rules() -> dict[str, Rule]:
    """The recipe (optimizer, schedule, mixup, EMA), training, checkpoints and tracking."""
    return {
        "optim.lr": _positive(),
        "optim.base_batch_size": _at_least(1),
        "optim.weight_decay": _non_negative(),
        "optim.betas": Rule(lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)", (0.9, 1.0)),
        "optim.eps": _positive(),
        "optim.clip_grad": _optional(Rule(lambda v: v > 0, "a positive max-norm", 0.0), "for no clipping"),
        "schedule.epochs": _at_least(1),
        "schedule.cooldown_epochs": _at_least(0),
        "schedule.warmup_epochs": _at_least(0),  # and below schedule.epochs, below
        "schedule.warmup_lr": _non_negative(),
        "schedule.min_lr": _non_negative(),
        "mixup.mixup": _non_negative(),
        "mixup.cutmix": _non_negative(),
        "mixup.prob": PROBABILITY,
        "mixup.switch_prob": PROBABILITY,
        "mixup.label_smoothing": PROBABILITY,
        "ema.decay": BELOW_ONE,
        "train.global_batch_size": _at_least(1),
        "train.seed": SEED,
        "train.max_steps": _optional(_at_least(1), "for the full schedule"),
        "train.eval_every_epochs": _at_least(1),
        "train.log_every_steps": _at_least(1),
        "train.stop_check_every_steps": _at_least(1),
        "train.peak_tflops": _optional(_positive(), "to detect it"),
        "checkpoint.every_steps": _at_least(1),
        "checkpoint.keep_last": Rule(lambda v: v >= 1, ">= 1 (the newest checkpoint is always kept)", 0),
        "tracking.uri": _optional(Rule(_mlflow_store, "a URI whose scheme MLflow has a store for (sqlite:///PATH, "
                                       "http(s)://HOST, postgresql://..., file:PATH)", "foo://bar"),
                                  "for $MLFLOW_TRACKING_URI or ./mlflow.db"),
        "tracking.experiment": Rule(lambda v: bool(v.strip()), "a non-empty name", " "),
    }


def _at_least(low: int) -> Rule:
    return Rule(lambda v: v >= low, f"an integer >= {low}", low - 1)


def _positive() -> Rule:
    return Rule(lambda v: v > 0, "a positive number", 0.0)


def _non_negative() -> Rule:
    return Rule(lambda v: v >= 0, ">= 0", -1.0)


def _optional(rule: Rule, meaning: str = "") -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f"{rule.expected}, or null{' ' + meaning if meaning else ''}",
                rule.outside)


def _timm(expected: str, is_training: bool, **kwargs: Any) -> Rule:
    """A value timm's own transform factory accepts, given as the one keyword of ``kwargs`` that is None: the rest of
    the transform stays at timm's defaults, so a refusal can only mean this value (torchvision loader: the same
    factory with the whole config)."""
    key = next(k for k, v in kwargs.items() if v is None)

    def ok(value: Any) -> bool:
        from timm.data import create_transform

        try:
            create_transform(32, is_training=is_training, **{**kwargs, key: value})
        except Exception:  # timm refuses with assert, KeyError, ValueError or AttributeError, depending on the key
            return False
        return True

    return Rule(ok, expected, "no-such-value" if key != "color_jitter" else -1.0)


def _mlflow_store(uri: str) -> bool:
    """MLflow has no public list of its store schemes; its registry is what ``MlflowClient(uri)`` consults."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    try:
        _tracking_store_registry.get_store_builder(uri)
    except Exception:
        return False
    return True


def check(ok: bool, key: str, value: Any, expected: str) -> None:
    """ConfigError, in one line naming ``key``, its value and ``expected``, unless ``ok``."""
    if not ok:
        shown = re.sub(r"//[^/@\s]*@", "//***@", repr(value))  # a URI's credentials are never printed
        raise ConfigError(f"{key}={shown} is invalid: expected {expected}")
