"""The training config: defaults, ``key=value`` overrides, resolution and validation.

A config is a plain nested dict (YAML on disk). ``resolve_config`` fills defaults and
the fields that depend on others (learning rate per detector and optimizer, the head
the weighting acts on, the number of classes); ``validate_config`` checks every field
before anything is built, raising :class:`~trainers.errors.ConfigError` that names the
field and the allowed values.

Defaults follow mmdetection 2.x as used by the paper (``shared/PAPER.md`` section 4):
SGD momentum 0.9, weight decay 1e-4, lr 0.02 for two-stage detectors and 0.01 for
RetinaNet (the released VOC configs); AdamW lr 1e-4, weight decay 0.05; the 1x
schedule (12 epochs, lr × 0.1 after epochs 8 and 11, linear warm-up over 500
iterations from ratio 0.001).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from trainers.errors import ConfigError, choice_error

DEFAULTS: dict[str, Any] = {
    "dataset": {
        "kind": "voc",
        "root": None,
        "train_sets": ["2012/trainval"],
        "test_sets": ["2007/test"],
        "repeat": 1,
        "scale": [1000, 600],
        "flip": 0.5,
        "num_workers": 2,
    },
    "model": {
        "detector": "faster_rcnn",
        "backbone": "resnet50",
        "pretrained": "imagenet",
        "num_classes": None,  # from the dataset when left out
        "losses": {},
    },
    "weighting": {"method": "none", "head": "auto"},
    "optimizer": {"type": "sgd", "lr": None, "momentum": 0.9, "weight_decay": None},
    "schedule": {
        "unit": "epoch",  # "epoch": epochs/steps count epochs; "iter": max_iters/steps count iterations
        "epochs": 12,
        "max_iters": None,
        "steps": [8, 11],
        "gamma": 0.1,
        "warmup_iters": 500,
        "warmup_ratio": 0.001,
    },
    "train": {
        "batch_size": 2,
        "seed": 0,
        "device": "auto",  # auto | cpu | cuda
        "amp": True,  # used on CUDA only
        "grad_clip": None,  # max L2 norm of all gradients, or None
        "eval_every": 1,  # evaluate every N epochs (0: only at the end)
        "checkpoint_every_iters": None,  # also checkpoint every N iterations
        "log_every": 50,  # iterations per batch of records pulled from the device
        "eval_batch_size": None,  # defaults to batch_size
        "eval_max_images": None,  # evaluate on the first N test images only (smoke runs)
    },
    "evaluation": {"method": "11point", "iou_threshold": 0.5},
}

TWO_STAGE_HEADS = ("rpn", "roi")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULE_UNITS = ("epoch", "iter")
DEVICES = ("auto", "cpu", "cuda")
EVAL_METHODS = ("11point", "area")


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of ``base`` with ``override`` merged in, nested dicts merged key by key."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with the safe loader; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "file not found.", "Check the path.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {exc}".replace("\n", " "),
                          "Fix the syntax at the position shown.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"expected a mapping at the top level, got {type(data).__name__}.")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b.c=value"`` → ``("a.b.c", parsed value)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError("--set", f"{text!r} is not of the form key=value.",
                          "Example: --set train.batch_size=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", f"{text!r} has an empty key.", "Example: --set optimizer.lr=0.01")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(config: dict, key: str, value: Any) -> None:
    """Set ``config["a"]["b"]["c"] = value`` for ``key = "a.b.c"``, creating mappings."""
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(key, f"{part!r} is a value, not a section.", "Set the section's fields instead.")
        node = child
    node[parts[-1]] = value


def apply_overrides(config: dict, overrides: list[str] | dict | None) -> dict:
    """A copy of ``config`` with ``key=value`` strings (or a dotted-key dict) applied."""
    config = copy.deepcopy(config)
    if not overrides:
        return config
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for key, value in items:
        set_dotted(config, key, value)
    return config


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def check_keys(section: dict, allowed, where: str) -> None:
    """Unknown keys in a config section are errors naming the key and the allowed ones."""
    if not isinstance(section, dict):
        raise ConfigError(where, f"expected a mapping, got {type(section).__name__}.")
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}" if where else key, "unknown key.",
                              f"Allowed keys: {', '.join(sorted(allowed))}.")


def _number(value, where: str, *, minimum=None, exclusive=False, integer=False, optional=False):
    if value is None and optional:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(where, f"expected {'an integer' if integer else 'a number'}, got {value!r}.")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ConfigError(where, f"must be {'>' if exclusive else '>='} {minimum}, got {value!r}.")


def is_two_stage(detector: str) -> bool:
    return detector != "retinanet"


def resolve_config(user_config: dict) -> dict:
    """Defaults merged with the user's config and the dependent fields filled in."""
    if not isinstance(user_config, dict):
        raise ConfigError("config", f"expected a mapping, got {type(user_config).__name__}.")
    check_keys(user_config, DEFAULTS.keys(), "")
    config = deep_merge(DEFAULTS, user_config)
    if isinstance(config["dataset"], dict):
        from trainers.data.build import resolve_dataset_paths

        config["dataset"] = resolve_dataset_paths(config["dataset"])
    model, optimizer, weighting = config["model"], config["optimizer"], config["weighting"]
    if isinstance(optimizer, dict) and optimizer.get("lr") is None:
        if optimizer.get("type") == "adamw":
            optimizer["lr"] = 1e-4
        else:
            optimizer["lr"] = 0.02 if is_two_stage(str(model.get("detector"))) else 0.01
    if isinstance(optimizer, dict) and optimizer.get("weight_decay") is None:
        optimizer["weight_decay"] = 0.05 if optimizer.get("type") == "adamw" else 1e-4
    if isinstance(weighting, dict) and weighting.get("head", "auto") == "auto":
        # The released ALWA code re-weights the RPN of two-stage detectors and the
        # RetinaNet head (shared/PAPER.md section 3).
        weighting["head"] = "rpn" if is_two_stage(str(model.get("detector"))) else "retina"
    if isinstance(config["train"], dict) and config["train"].get("eval_batch_size") is None:
        config["train"]["eval_batch_size"] = config["train"].get("batch_size")
    return config


def validate_config(config: dict, *, check_paths: bool = True) -> dict:
    """Validate a resolved config; returns it. ``check_paths=False`` skips file checks
    (used when a sweep is validated on a machine that does not hold the data)."""
    from trainers.data.build import KNOWN_KEYS, validate_dataset_config
    from trainers.detectors import validate_model_config
    from trainers.weighting import validate_weighting_config

    if check_paths:
        validate_dataset_config(config["dataset"])
    else:
        check_keys(config["dataset"], KNOWN_KEYS, "dataset")
    resolved_model = validate_model_config(config["model"])
    # Record the regression loss each head really uses (the detector's default when
    # unset): it becomes an MLflow param that the reports group by.
    config["model"]["losses"] = {head: dataclasses.asdict(loss)
                                 for head, loss in resolved_model["losses"].items()}
    validate_weighting_config(config["weighting"])
    head = config["weighting"].get("head")
    detector = config["model"]["detector"]
    heads = TWO_STAGE_HEADS if is_two_stage(detector) else ("retina",)
    if head not in heads:
        raise choice_error("weighting.head", head, heads)

    optimizer = config["optimizer"]
    check_keys(optimizer, DEFAULTS["optimizer"], "optimizer")
    if optimizer["type"] not in OPTIMIZERS:
        raise choice_error("optimizer.type", optimizer["type"], OPTIMIZERS)
    _number(optimizer["lr"], "optimizer.lr", minimum=0, exclusive=True)
    _number(optimizer["momentum"], "optimizer.momentum", minimum=0)
    _number(optimizer["weight_decay"], "optimizer.weight_decay", minimum=0)

    schedule = config["schedule"]
    check_keys(schedule, DEFAULTS["schedule"], "schedule")
    if schedule["unit"] not in SCHEDULE_UNITS:
        raise choice_error("schedule.unit", schedule["unit"], SCHEDULE_UNITS)
    if schedule["unit"] == "epoch":
        _number(schedule["epochs"], "schedule.epochs", minimum=1, integer=True)
        length = schedule["epochs"]
    else:
        if schedule["max_iters"] is None:
            raise ConfigError("schedule.max_iters", "is required when schedule.unit is 'iter'.",
                              "Set it, e.g. --set schedule.max_iters=300.")
        _number(schedule["max_iters"], "schedule.max_iters", minimum=1, integer=True)
        length = schedule["max_iters"]
    if not isinstance(schedule["steps"], list):
        raise ConfigError("schedule.steps", f"expected a list, got {schedule['steps']!r}.", "Example: [8, 11].")
    for step in schedule["steps"]:
        _number(step, "schedule.steps", minimum=1, integer=True)
        if step > length:
            raise ConfigError("schedule.steps", f"step {step} is after the end of training ({length}).",
                              f"Use values up to {length} ({schedule['unit']}s).")
    _number(schedule["gamma"], "schedule.gamma", minimum=0, exclusive=True)
    _number(schedule["warmup_iters"], "schedule.warmup_iters", minimum=0, integer=True)
    _number(schedule["warmup_ratio"], "schedule.warmup_ratio", minimum=0, exclusive=True)

    train = config["train"]
    check_keys(train, DEFAULTS["train"], "train")
    _number(train["batch_size"], "train.batch_size", minimum=1, integer=True)
    _number(train["eval_batch_size"], "train.eval_batch_size", minimum=1, integer=True)
    _number(train["seed"], "train.seed", minimum=0, integer=True)
    if train["device"] not in DEVICES:
        raise choice_error("train.device", train["device"], DEVICES)
    if not isinstance(train["amp"], bool):
        raise ConfigError("train.amp", f"expected true or false, got {train['amp']!r}.")
    _number(train["grad_clip"], "train.grad_clip", minimum=0, exclusive=True, optional=True)
    _number(train["eval_every"], "train.eval_every", minimum=0, integer=True)
    _number(train["checkpoint_every_iters"], "train.checkpoint_every_iters", minimum=1, integer=True,
            optional=True)
    _number(train["log_every"], "train.log_every", minimum=1, integer=True)
    _number(train["eval_max_images"], "train.eval_max_images", minimum=1, integer=True, optional=True)

    evaluation = config["evaluation"]
    check_keys(evaluation, DEFAULTS["evaluation"], "evaluation")
    if evaluation["method"] not in EVAL_METHODS:
        raise choice_error("evaluation.method", evaluation["method"], EVAL_METHODS)
    _number(evaluation["iou_threshold"], "evaluation.iou_threshold", minimum=0, exclusive=True)
    if evaluation["iou_threshold"] > 1:
        raise ConfigError("evaluation.iou_threshold", "must be at most 1.")
    return config


def load_config(path_or_dict, overrides=None, *, check_paths: bool = True) -> dict:
    """Read (YAML path or dict), apply ``--set`` overrides, resolve and validate."""
    raw = load_yaml(path_or_dict) if isinstance(path_or_dict, (str, Path)) else path_or_dict
    raw = apply_overrides(raw, overrides)
    return validate_config(resolve_config(raw), check_paths=check_paths)
