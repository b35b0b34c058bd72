"""The training config: one typed model per section, defaults written once, validated once.

A run's config is a :class:`TrainingConfig` with seven sections — ``dataset``,
``model``, ``weighting``, ``optimizer``, ``schedule``, ``train``, ``evaluation`` — each
a pydantic model whose fields carry their default, type and range. YAML on disk is
the same shape. :func:`parse_config` turns a mapping into a resolved config (the
fields that depend on others filled in: the learning rate per detector and optimizer,
the weighted head, each head's regression loss, the evaluation batch size, the
transform's sizes) or raises one :class:`~trainers.errors.ConfigError` listing *every*
problem, each naming the field, the bad value and what is allowed. ``model_dump()``
of a resolved config holds every value a run uses, so MLflow records all of them,
whatever a spec omits.

Defaults follow the released ALWA code (ywx-hub/ALWA, an mmdetection 2.7 fork):
``configs/_base_/schedules/schedule_1x.py`` (SGD lr 0.02, momentum 0.9, weight decay
1e-4; 12 epochs, lr × 0.1 after epochs 8 and 11; linear warm-up over 500 iterations
from ratio 0.001); RetinaNet's lr 0.01 from ``configs/_base_/models/retinanet_r50_fpn.py``
users' configs (``configs/alwa/*/retinanet*``); ``docs/fidelity.md`` lists every
setting against its released file. AdamW (beyond the paper): lr 1e-4, weight decay 0.05.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Optional, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainers.errors import ConfigError, ConfigErrors, UserInputError
from trainers.weighting import WeightingConfig, NoneSettings

SECTIONS = ("dataset", "model", "weighting", "optimizer", "schedule", "train", "evaluation")
DETECTORS = ("faster_rcnn", "retinanet", "mask_rcnn", "libra_rcnn", "dynamic_rcnn", "double_head_rcnn")
TWO_STAGE_HEADS = ("rpn", "roi")
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds are 32-bit


class Section(BaseModel):
    """A config section: unknown keys, wrong types and non-finite numbers are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=True)


def is_two_stage(detector: str) -> bool:
    return detector != "retinanet"


class DatasetConfig(Section):
    """``dataset:``, the layouts of trainers/data (VOCdevkit, COCO)."""

    kind: Literal["voc", "coco"] = "voc"
    root: Optional[str] = Field(None, description="voc: the folder holding VOC2007/ and VOC2012/")
    train_sets: list[str] = Field(["2012/trainval"], min_length=1, description="voc: 'year/split' strings")
    test_sets: list[str] = Field(["2007/test"], min_length=1)
    class_names: Optional[list[str]] = Field(None, min_length=1, description="voc: default the 20 VOC classes")
    repeat: int = Field(1, ge=1, le=1000, description="training set repeat factor (released VOC: 3)")
    scale: list[int] = Field([1000, 600], min_length=2, max_length=2,
                             description="[long, short] side, mmdetection's img_scale")
    flip: float = Field(0.5, ge=0.0, le=1.0, description="horizontal-flip probability in training")
    num_workers: int = Field(2, ge=0, le=64)
    train_ann: Optional[str] = None
    train_images: Optional[str] = None
    val_ann: Optional[str] = None
    val_images: Optional[str] = None

    @field_validator("root", "train_ann", "train_images", "val_ann", "val_images")
    @classmethod
    def _absolute(cls, value: Optional[str]) -> Optional[str]:
        # Absolute where the config is read (the driver): Ray runs each trial in its
        # own folder, where a relative path the driver checked points nowhere.
        if value is None or not value.strip():
            return value
        if "\x00" in value:
            raise ValueError("a path cannot contain a NUL character")
        return os.path.abspath(os.path.expanduser(value))

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: list[int]) -> list[int]:
        if any(side < 1 or side > 8192 for side in value):
            raise ValueError(f"sides must be integers in [1, 8192], got {value}")
        return value

    @field_validator("class_names")
    @classmethod
    def _distinct(cls, value):
        if value is not None and len(set(value)) != len(value):
            raise ValueError("class names must be distinct")
        return value

    @model_validator(mode="after")
    def _layout(self) -> "DatasetConfig":
        missing = [key for key in (("root",) if self.kind == "voc" else
                                   ("train_ann", "train_images", "val_ann", "val_images"))
                   if not getattr(self, key)]
        if missing:
            raise ConfigError(f"dataset.{missing[0]}", f"is required for a {self.kind} dataset.",
                              "Point it at the dataset (or make one with `alwa-sweep make-synthetic`).")
        return self


class ModelConfig(Section):
    """``model:``, the detector (trainers/detectors)."""

    detector: Literal[DETECTORS] = "faster_rcnn"
    backbone: Literal["tiny", "resnet50", "resnet101"] = "resnet50"
    pretrained: Optional[Literal["none", "imagenet"]] = Field(
        None, description="ImageNet weights from the torch hub cache (never downloaded); "
        "default imagenet for ResNets (the paper's), none for the tiny backbone")
    num_classes: Optional[int] = Field(None, ge=1, le=10_000, description="default: the dataset's classes")
    min_size: Optional[int] = Field(None, ge=1, le=8192, description="default: the short side of dataset.scale")
    max_size: Optional[int] = Field(None, ge=1, le=8192, description="default: the long side of dataset.scale")
    losses: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="regression loss per head: rpn_reg, roi_reg or retina_reg")
    double_head: Optional[dict[str, Any]] = Field(None, description="double_head_rcnn's loss weights")
    parity: Literal["torchvision", "mmdet"] = Field(
        "torchvision", description="mmdet: mmdetection 2.x's anchor validity, assigner, norm_eval BatchNorm, "
        "aligned RoIAlign and inits (trainers/detectors/mmdet_parity.py; docs/fidelity.md)")

    @field_validator("pretrained", mode="before")
    @classmethod
    def _pretrained(cls, value):
        return "none" if value is False or value == "None" else value

    @model_validator(mode="after")
    def _resolve(self) -> "ModelConfig":
        """Each head's regression loss resolved (the detector's default under the user's)."""
        if self.pretrained is None:
            self.pretrained = "none" if self.backbone == "tiny" else "imagenet"
        if self.backbone == "tiny" and self.pretrained == "imagenet":
            raise ConfigError("model.pretrained", "the tiny backbone has no ImageNet weights.",
                              "Use pretrained: none.")
        if self.min_size is not None and self.max_size is not None and self.min_size > self.max_size:
            raise ConfigError("model.min_size", f"{self.min_size} is larger than model.max_size "
                              f"{self.max_size}.", "min_size is the short side, max_size the long-side cap.")
        from trainers.detectors.build import resolve_model_losses

        self.losses, self.double_head = resolve_model_losses(self.detector, self.losses, self.double_head)
        return self


def parse_model(raw) -> "ModelConfig":
    """A ``model:`` section alone (tests, tools), errors as :func:`parse_config`'s."""
    if isinstance(raw, ModelConfig):
        return raw
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise errors_from_validation(exc, ModelConfig, "model.") from None


class OptimizerConfig(Section):
    type: Literal["sgd", "adamw"] = "sgd"
    lr: Optional[float] = Field(None, gt=0, description="default 0.02 (two-stage) / 0.01 (RetinaNet) "
                                "with SGD, 1e-4 with AdamW")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: Optional[float] = Field(None, ge=0, le=1, description="default 1e-4 (SGD), 0.05 (AdamW)")


class ScheduleConfig(Section):
    unit: Literal["epoch", "iter"] = Field("epoch", description="what epochs/max_iters and steps count")
    epochs: int = Field(12, ge=1, le=10_000)
    max_iters: Optional[int] = Field(None, ge=1, le=100_000_000)
    steps: list[int] = Field([8, 11], max_length=100, description="lr × gamma from each of these on")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_iters: int = Field(500, ge=0, le=100_000_000)
    warmup_ratio: float = Field(0.001, gt=0, le=1)

    @model_validator(mode="after")
    def _steps_inside(self) -> "ScheduleConfig":
        if self.unit == "iter" and self.max_iters is None:
            raise ConfigError("schedule.max_iters", "is required when schedule.unit is 'iter'.",
                              "Set it, e.g. --set schedule.max_iters=300.")
        length = self.epochs if self.unit == "epoch" else self.max_iters
        for step in self.steps:
            if not 1 <= step <= length:
                raise ConfigError("schedule.steps", f"step {step} is outside training (1..{length} "
                                  f"{self.unit}s).", f"Use values from 1 to {length}.")
        return self


class TrainConfig(Section):
    batch_size: int = Field(2, ge=1, le=1024, description="images per worker per step")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="mixed precision, CUDA only")
    grad_clip: Optional[float] = Field(None, gt=0, description="max L2 norm of all gradients")
    eval_every: int = Field(1, ge=0, le=10_000, description="evaluate every N epochs (0: only at the end)")
    checkpoint_every_iters: Optional[int] = Field(None, ge=1)
    log_every: int = Field(50, ge=1, le=1_000_000, description="iterations per pull of the records")
    log_interval: int = Field(50, ge=1, le=1_000_000,
                              description="iterations per MLflow point (mean losses; 1: every iteration), as "
                              "mmdetection's log_config interval (configs/_base_/default_runtime.py)")
    system_metrics: bool = Field(False, description="sample CPU/GPU/memory into MLflow (system/…)")
    log_model: bool = Field(False, description="upload the final checkpoint as the run's model/ artifact")
    eval_batch_size: Optional[int] = Field(None, ge=1, le=1024, description="default: batch_size")
    eval_max_images: Optional[int] = Field(None, ge=1, description="evaluate the first N test images only")
    group_by_aspect_ratio: Optional[bool] = Field(
        None, description="batches of landscape or of portrait images only, as mmdetection's GroupSampler "
        "(mmdet/datasets/builder.py); default: true under model.parity mmdet")
    emulate_workers: int = Field(
        1, ge=1, le=64, description="DDP workers each process plays: every step trains on that many "
        "micro-batches of batch_size images, each with its own weighting state (ALWA's per-GPU records "
        "and alpha), gradients averaged as DDP averages them, one optimizer step; composes with real "
        "workers (R processes x N emulated = R*N DDP ranks). 4 on one GPU is the paper's 4 GPUs x 2 "
        "images. A sweep spec sets it with resources.emulate_workers (trainers/distributed.py)")


class EvaluationConfig(Section):
    method: Literal["11point", "area"] = "11point"
    iou_threshold: float = Field(0.5, gt=0, le=1)


class TrainingConfig(Section):
    """One training run. ``parse_config`` builds it; its fields are then resolved."""

    dataset: DatasetConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    weighting: WeightingConfig = Field(default_factory=NoneSettings)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _resolve(self) -> "TrainingConfig":
        """Fill the fields that depend on other sections (idempotent)."""
        model, optimizer, train = self.model, self.optimizer, self.train
        two_stage = is_two_stage(model.detector)
        if optimizer.lr is None:
            optimizer.lr = 1e-4 if optimizer.type == "adamw" else (0.02 if two_stage else 0.01)
        if optimizer.weight_decay is None:
            optimizer.weight_decay = 0.05 if optimizer.type == "adamw" else 1e-4
        if train.eval_batch_size is None:
            train.eval_batch_size = train.batch_size
        if train.group_by_aspect_ratio is None:
            train.group_by_aspect_ratio = model.parity == "mmdet"
        if model.min_size is None:
            model.min_size = min(self.dataset.scale)
        if model.max_size is None:
            model.max_size = max(self.dataset.scale)
        if model.min_size > model.max_size:
            raise ConfigError("model.min_size", f"{model.min_size} is larger than model.max_size "
                              f"{model.max_size}.", "min_size is the short side, max_size the long-side cap.")
        from trainers.distributed import check_emulation

        check_emulation(self)
        heads = TWO_STAGE_HEADS if two_stage else ("retina",)
        head = self.weighting.head
        if head == "auto":
            # The released ALWA code re-weights the RPN of two-stage detectors and the
            # RetinaNet head (mmdet/models/dense_heads/anchor_head.py, shared/PAPER.md §3).
            self.weighting = self.weighting.model_copy(update={"head": heads[0]})
        elif head not in heads:
            raise ConfigError("weighting.head", f"{head!r} is not a head of {model.detector}.",
                              f"Allowed values: auto, {', '.join(heads)}.")
        return self

    def dump(self) -> dict:
        """The resolved config as plain YAML-able data (what MLflow and checkpoints keep)."""
        return self.model_dump(mode="json")


# ---- parsing: mappings → TrainingConfig, errors → one report -----------------------------

def parse_config(raw: Any, *, where: str = "") -> TrainingConfig:
    """A resolved :class:`TrainingConfig` from a mapping (or an existing config).

    Every problem is collected: one problem raises a :class:`ConfigError`, several a
    :class:`ConfigErrors` listing them. ``where`` prefixes each field (``trial x: ``).
    """
    if isinstance(raw, TrainingConfig):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(where.rstrip(": ") or "config", f"expected a mapping of sections, got {raw!r:.80}.",
                          f"Sections: {', '.join(SECTIONS)}.")
    try:
        return TrainingConfig.model_validate(raw)
    except ValidationError as exc:
        raise errors_from_validation(exc, TrainingConfig, where) from None
    except UserInputError as exc:  # raised by a validator outside pydantic's wrapping
        raise _prefixed(exc, where) from None


def errors_from_validation(exc: ValidationError, model_class: type[BaseModel], where: str = "") -> ConfigError:
    """pydantic's errors as the project's: one paragraph per field, all of them."""
    problems = []
    for error in exc.errors(include_url=False):
        context = error.get("ctx") or {}
        inner = context.get("error")
        if isinstance(inner, UserInputError):
            problems.append(_prefixed(inner, where))
            continue
        loc = _readable_loc(error["loc"])
        if error["type"] in ("union_tag_invalid", "weighting_method"):  # the weighting section's `method`
            given = error.get("input")
            loc = (*loc, "method")
            error = {**error, "input": given.get("method") if isinstance(given, dict) else given}
        field = ".".join(str(part) for part in loc) or "config"
        problems.append(ConfigError(f"{where}{field}", *_describe(error, model_class, loc)))
    unique = list({str(p): p for p in problems}.values())
    return unique[0] if len(unique) == 1 else ConfigErrors(unique)


def _readable_loc(loc: tuple) -> tuple:
    """Drop pydantic's union tags: ``('weighting', 'alwa', 'interval')`` → ``weighting.interval``."""
    from trainers.weighting import WEIGHTINGS

    parts = list(loc)
    if len(parts) > 1 and parts[0] == "weighting" and parts[1] in WEIGHTINGS:
        del parts[1]
    return tuple(parts)


def _describe(error: dict, model_class: type[BaseModel], loc: tuple) -> tuple[str, str]:
    kind, value = error["type"], error.get("input")
    shown = _short_repr(value)
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model_class, loc[:-1], error)
        return "unknown key.", f"Allowed keys: {', '.join(allowed)}." if allowed else "Remove it."
    if kind == "missing":
        return "is missing.", "Set it."
    if kind in ("union_tag_invalid", "literal_error", "weighting_method"):
        context = error.get("ctx") or {}
        expected = context.get("expected_tags") or context.get("expected") or _weighting_methods()
        return f"unknown value {shown}.", f"Allowed values: {expected}."
    message = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    if kind in ("finite_number",):
        message = "must be a finite number"
    return f"{message} (got {shown}).", _hint(kind)


def _weighting_methods() -> str:
    from trainers.weighting import WEIGHTINGS

    return ", ".join(WEIGHTINGS)


def _hint(kind: str) -> str:
    if kind.startswith(("int_", "float_", "bool_", "string_", "list_", "dict_", "model_")):
        return "Write the value with the type shown (YAML: 2, 0.5, true, text, [a, b], {key: value})."
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"):
        return "Use a value inside the range."
    if kind in ("too_short", "too_long"):
        return "Give the number of items shown."
    return ""


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _allowed_keys(model_class: type[BaseModel], loc: tuple, error: dict) -> list[str]:
    """The field names of the section at ``loc`` (for 'unknown key' hints)."""
    current = model_class
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            break
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return _weighting_keys(error) if part == "weighting" else []
        current = nested[0]
    else:
        return sorted(current.model_fields)
    return _weighting_keys(error) if loc and loc[0] == "weighting" else []


def _weighting_keys(error: dict) -> list[str]:
    """The keys of the weighting method the error is about (its settings model)."""
    loc = error["loc"]
    method = loc[1] if len(loc) > 2 else "none"
    for settings in get_args(get_args(WeightingConfig)[0]):
        if settings.model_fields["method"].default == method:
            return sorted(settings.model_fields)
    return []


def _prefixed(exc: UserInputError, where: str) -> UserInputError:
    if not where or exc.where.startswith(where):
        return exc
    if isinstance(exc, ConfigErrors):
        return ConfigErrors([_prefixed(e, where) for e in exc.errors])
    return type(exc)(f"{where}{exc.where}", exc.problem, exc.hint)


# ---- dotted keys, overrides ------------------------------------------------------------

def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b.c=value"`` → ``("a.b.c", parsed value)``; the value is parsed as YAML
    under the same policy as files (``trainers.yamlio``)."""
    from trainers.yamlio import parse_set

    return parse_set(text)


def set_dotted(config: dict, key: str, value: Any) -> None:
    """Set ``config["a"]["b"]["c"] = value`` for ``key = "a.b.c"``, creating mappings."""
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[:depth + 1]), f"is a value ({_short_repr(child)}), not a section, "
                              f"so {key} cannot be set.", "Set the whole value, or fix the key.")
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


def check_keys(section: Any, allowed, where: str) -> None:
    """Unknown keys in a mapping are errors naming the key and the allowed ones."""
    if not isinstance(section, dict):
        raise ConfigError(where or "spec", f"expected a mapping, got {_short_repr(section)}.")
    unknown = [key for key in section if key not in allowed]
    if unknown:
        key = unknown[0]
        raise ConfigError(f"{where}.{key}" if where else str(key), "unknown key.",
                          f"Allowed keys: {', '.join(sorted(allowed))}.")


def load_config(source, overrides=None) -> TrainingConfig:
    """A YAML path or a mapping, with ``--set`` overrides applied, parsed and resolved."""
    from trainers.yamlio import load_yaml

    if isinstance(source, TrainingConfig):
        if not overrides:
            return source
        source = source.dump()
    raw = load_yaml(source, what="config") if isinstance(source, (str, Path)) else source
    if not isinstance(raw, dict):
        raise ConfigError("config", f"expected a mapping of sections, got {_short_repr(raw)}.")
    return parse_config(apply_overrides(raw, overrides))
