"""Sweep specs: YAML → validated :class:`Spec` → the list of trials, each a resolved config.

A spec is a base training config (``trainers/config.py``) plus grid axes, in the spirit
of mmdetection's config diffs but readable in one screen::

    name: table2_voc                  # default sweep name (a timestamp is appended)
    description: Table 2, VOC07 …
    experiment: alwa-table2           # MLflow experiment
    base: {dataset: …, model: …, …}   # the training config every trial starts from
    grid:                             # one product of axes, or a list of them (a union)
      model.backbone: [resnet50, resnet101]
      weighting:                      # a mapping value is merged into that section
        - {method: none}
        - {method: alwa, variant: 1}
                                      # or, instead of grid, search: {type: optuna, samples: 24,
                                      #   space: {weighting.cls: {low: 0.1, high: 2, log: true}, …}}
                                      #   (alwa_sweep/search.py: trials sampled while it runs)
    seeds: [0]                        # repeats: one trial per seed
    resources: {workers: 4, cpus_per_worker: 4, gpus_per_worker: 1}
                                      # or {workers: 1, emulate_workers: 4, …}: the same
                                      # 4 DDP ranks, played by one process (slower, 1 GPU)
    scheduler: {type: none}           # or {type: asha, grace_period: 2, reduction_factor: 2}
    max_concurrent: null
    max_failures: 2                   # retries of a killed trial, from its last checkpoint
    keep_checkpoints: 2               # checkpoints stored per trial (Tune's/Train's num_to_keep)
    max_trials: 1000                  # a guard against a grid larger than meant
    estimate: {hours_per_trial: 6.0}  # for `validate`'s resource-hours

Every trial is the base config with its overrides applied, parsed once here into a
:class:`~trainers.config.TrainingConfig` (the object the trial trains from). Trials are
identified by a deterministic key (a hash of the overrides), which maps a trial to its
MLflow run. Every problem of a spec — its own fields and every trial's config — is
reported together.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from trainers.config import (SECTIONS, Section, TrainingConfig, apply_overrides, check_keys,
                             errors_from_validation, parse_config, parse_override, set_dotted)
from alwa_sweep.search import Search
from trainers.errors import ConfigError, ConfigErrors, UserInputError

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,100}$"
PATH_KEYS = ("root", "train_ann", "train_images", "val_ann", "val_images")
MAX_REPORTED_PROBLEMS = 20
# Every trial's config is parsed when the spec is read (~0.15 ms each): 10⁴ trials take ~2 s,
# 10⁶ took 150 s and ~GBs. A larger study is several specs.
MAX_TRIALS = 10_000
KEEP_CHECKPOINTS = 2  # checkpoints stored per trial by default (Tune's/Train's num_to_keep)


class Resources(Section):
    """Per trial: DDP workers and what each one reserves."""

    workers: int = Field(1, ge=1, le=1024, description="DDP workers (processes) per trial")
    emulate_workers: int = Field(
        1, ge=1, le=64, description="DDP workers each process plays (sets train.emulate_workers of every "
        "trial): a trial trains as workers x emulate_workers DDP ranks of train.batch_size images, exactly "
        "(per-rank weighting state and random streams; trainers/distributed.py), on workers processes")
    cpus_per_worker: float = Field(1, ge=0, le=1024)
    gpus_per_worker: float = Field(0, ge=0, le=64)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each worker reserves, e.g. {worker: 1}")
    accelerator_type: Optional[str] = Field(None, min_length=1, max_length=64,
                                            description="Ray's accelerator type of the GPUs, e.g. A100")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how a DDP trial's workers are placed on nodes (Ray's placement strategies)")

    @field_validator("resources_per_worker")
    @classmethod
    def _custom(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name.upper() in ("CPU", "GPU") or not name or amount < 0 or amount > 1e6:
                raise ValueError(f"{name!r}: {amount} — custom resources need a name other than CPU/GPU "
                                 "and an amount in [0, 1e6]")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Resources":
        if self.cpus_per_worker == 0 and self.gpus_per_worker == 0:
            raise ConfigError("resources", "a trial needs some CPU or GPU.", "Set cpus_per_worker > 0.")
        if self.workers > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ConfigError("resources.gpus_per_worker", "fractional GPUs are for single-worker trials.",
                              "Use whole GPUs per worker for multi-worker (DDP) trials.")
        return self

    @property
    def ranks(self) -> int:
        """The DDP ranks a trial trains as (real workers × emulated per worker)."""
        return self.workers * self.emulate_workers


class Scheduler(Section):
    type: Literal["none", "asha"] = "none"
    metric: Optional[str] = Field(None, description="default: val/map (VOC) or val/ap (COCO)")
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1, le=10_000, description="epochs before ASHA may stop a trial")
    reduction_factor: float = Field(3, gt=1, le=100)


class Estimate(Section):
    hours_per_trial: Optional[float] = Field(None, gt=0, le=100_000)


class SpecFile(Section):
    """The top level of a spec file; ``base`` is checked as every trial's config."""

    name: Optional[str] = Field(None, pattern=NAME_PATTERN)
    description: str = ""
    experiment: Optional[str] = Field(None, min_length=1, max_length=250)
    base: dict[str, Any]
    grid: Any = Field(None, description="a mapping axis → list of values (one product), or a list of such "
                      "mappings (a union of products); or, instead, a search")
    search: Optional[Search] = Field(None, description="sample trials from continuous ranges (Optuna), "
                                     "instead of a grid (alwa_sweep/search.py)")
    seeds: Optional[list[int]] = Field(None, min_length=1, max_length=1000)
    resources: Resources = Field(default_factory=Resources)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    max_concurrent: Optional[int] = Field(None, ge=1, le=100_000)
    max_failures: int = Field(2, ge=0, le=100)
    keep_checkpoints: int = Field(KEEP_CHECKPOINTS, ge=1, le=1000, description="checkpoints stored per trial, the newest "
                                  "(Tune's and Train's CheckpointConfig num_to_keep); the only copies there are")
    max_trials: int = Field(1000, ge=1, le=MAX_TRIALS, description="refuse a grid with more trials")
    estimate: Estimate = Field(default_factory=Estimate)

    @model_validator(mode="after")
    def _grid_or_search(self) -> "SpecFile":
        if self.search is None and self.grid is None:
            raise ConfigError("grid", "is missing.", "Set it (or a search: over continuous ranges instead).")
        if self.search is not None and self.grid is not None:
            raise ConfigError("search", "is given together with a grid; a spec has one or the other.",
                              "Fix the other settings in base and keep either grid or search.")
        if self.search is not None and self.seeds not in (None, [0]):
            raise ConfigError("seeds", f"is {self.seeds} in a search spec; the sampler proposes each trial once.",
                              "Remove seeds (set base.train.seed), or run the search once per seed.")
        return self

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds):
        from trainers.config import MAX_SEED

        if seeds is not None and any(not 0 <= s <= MAX_SEED for s in seeds):
            raise ValueError(f"seeds must be integers in [0, {MAX_SEED}]")
        return seeds

    @field_validator("name")
    @classmethod
    def _name(cls, name):
        if name is not None and not any(c.isalnum() for c in name):
            raise ValueError("a name needs a letter or digit (it names folders)")
        return name

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, name):
        if name is not None and not name.strip():
            raise ValueError("the experiment name is blank")
        return name


SPEC_KEYS = tuple(SpecFile.model_fields)


@dataclass
class Trial:
    key: str  # deterministic: hash of the overrides
    name: str  # readable: the overrides in short
    overrides: dict  # axis → value
    config: TrainingConfig  # resolved and validated, once


@dataclass
class Spec:
    name: str
    description: str
    experiment: str
    base: dict
    trials: list[Trial]
    resources: Resources
    scheduler: Scheduler
    max_concurrent: int | None
    max_failures: int
    estimate: Estimate
    keep_checkpoints: int
    search: Search | None = None  # trials sampled while the sweep runs (then `trials` is empty)
    probes: list[Trial] = field(default_factory=list)  # a search's corners, checked when read
    raw: dict = field(repr=False, default_factory=dict)  # the spec as run (--set applied)

    @property
    def trial_count(self) -> int:
        return self.search.samples if self.search is not None else len(self.trials)

    @property
    def configs(self) -> list[TrainingConfig]:
        """The training configs known before the sweep runs (a search's: its corners)."""
        return [t.config for t in (self.trials or self.probes)]

    @property
    def uses_gpus(self) -> bool:
        return self.resources.gpus_per_worker > 0

    def resource_hours(self) -> float | None:
        hours = self.estimate.hours_per_trial
        if hours is None:
            return None
        per_worker = self.resources.gpus_per_worker if self.uses_gpus else self.resources.cpus_per_worker
        return self.trial_count * self.resources.workers * per_worker * hours


# ---- names and keys ----------------------------------------------------------------------

MAX_NAME_LENGTH = 250  # a PostgreSQL-backed MLflow server stores run names of ≤ 250 characters
_PATH_FIELDS = {"root", "train_ann", "train_images", "val_ann", "val_images"}  # dataset paths


def _short(key: str) -> str:
    return key.split(".")[-1]


def _value_text(value: Any) -> str:
    if isinstance(value, dict):
        return _mapping_label(value)
    if isinstance(value, list):
        return "x".join(_value_text(v) for v in value)
    return str(value)


def _mapping_label(value: dict) -> str:
    """A short label of a named grid value (a mapping of config fields): nested sections
    are flattened, dataset paths left out (``kind`` says which dataset), ``kind`` shown by
    its value alone, and a field name shortened to its last part unless two parts of
    the label would then read the same (``roi_reg.type=l1,optimizer.type=adamw``)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, mapping: dict) -> None:
        for key, sub in mapping.items():
            dotted = f"{prefix}{key}"
            if isinstance(sub, dict):
                walk(f"{dotted}.", sub)
            else:
                flat[dotted] = sub
    walk("", value)
    shown = {k: v for k, v in flat.items() if _short(k) not in _PATH_FIELDS}
    shorts = [_short(k) for k in shown]
    parts = []
    for key, sub in shown.items():
        short = _short(key)
        if short == "kind" and key.count(".") <= 1:
            parts.append(_value_text(sub))
            continue
        if shorts.count(short) > 1:
            short = ".".join(key.split(".")[-2:])
        parts.append(f"{short}={_value_text(sub)}")
    return ",".join(parts)


def trial_name(overrides: dict) -> str:
    """A readable name of one grid point, ≤ ``MAX_NAME_LENGTH`` characters (a longer one
    is cut and ends with ``~`` and the trial's key, so it stays unique)."""
    parts = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            parts.append(_value_text(value))
        else:
            parts.append(f"{_short(key)}={_value_text(value)}")
    name = "_".join(parts) or "base"
    if len(name) > MAX_NAME_LENGTH:
        key = trial_key(overrides)
        name = name[: MAX_NAME_LENGTH - len(key) - 1] + "~" + key
    return name


def sampled_trial(base: dict, overrides: dict, emulate_workers: int = 1) -> Trial:
    """The trial of one point a search sampled (``overrides``: field → value)."""
    overrides = {key: float(value) for key, value in overrides.items()}
    config = parse_config(apply_overrides(base, {**overrides, "train.emulate_workers": emulate_workers}))
    name = trial_name({key: float(f"{value:.4g}") for key, value in overrides.items()})
    return Trial(key=trial_key(overrides), name=name, overrides=overrides, config=config)


def trial_key(overrides: dict) -> str:
    canonical = json.dumps(overrides, sort_keys=True, default=str)
    return hashlib.sha1(canonical.encode()).hexdigest()[:12]


# ---- the grid ------------------------------------------------------------------------------

def _flatten_override(key: str, value: Any) -> dict:
    """A mapping value merges into the section ``key`` (dotted keys inside allowed)."""
    if isinstance(value, dict):
        flat = {}
        for sub_key, sub_value in value.items():
            flat.update(_flatten_override(f"{key}.{sub_key}", sub_value))
        return flat
    return {key: value}


def _axis_overrides(axis: str, value: Any) -> dict:
    """Dotted-key overrides of one axis value. An axis named after a config field merges
    its value there; any other name (``setting``, ``method``) is a named axis whose
    values are mappings of dotted keys applied to the whole config."""
    if axis.split(".")[0] in SECTIONS:
        return _flatten_override(axis, value)
    if not isinstance(value, dict):
        raise ConfigError(f"grid.{axis}", f"{axis!r} is not a config field, so its values must be mappings "
                          f"of config fields; got {value!r:.80}.",
                          f"Name the field (e.g. weighting.method), or write values like {{weighting.method: alwa}}; "
                          f"config sections are {', '.join(SECTIONS)}.")
    flat = {}
    for key, sub_value in value.items():
        if str(key).split(".")[0] not in SECTIONS:
            raise ConfigError(f"grid.{axis}.{key}", "unknown config field.",
                              f"Fields start with one of: {', '.join(SECTIONS)}.")
        flat.update(_flatten_override(key, sub_value))
    return flat


def grid_size(grid, seeds=None) -> int:
    """How many grid points (before duplicates are dropped), without expanding them."""
    blocks = grid if isinstance(grid, list) else [grid]
    points = sum(math.prod(len(values) if isinstance(values, list) else 1 for values in block.values())
                 for block in blocks if isinstance(block, dict))
    return points * (len(seeds) if seeds and (len(seeds) > 1 or seeds != [0]) else 1)


def expand_grid(grid, seeds=None) -> list[dict]:
    """The list of trial overrides: the product of each grid block's axes, blocks
    concatenated, then crossed with the seeds; duplicates dropped, order kept."""
    blocks = grid if isinstance(grid, list) else [grid]
    if not blocks:
        raise ConfigError("grid", "is empty.", "Give at least one axis with at least one value.")
    combos: list[dict] = []
    for index, block in enumerate(blocks):
        where = f"grid[{index}]" if isinstance(grid, list) else "grid"
        if not isinstance(block, dict) or not block:
            raise ConfigError(where, f"must be a non-empty mapping of axis → list of values, got {block!r:.80}.",
                              "Example: {weighting.method: [none, alwa]}")
        axes = []
        for axis, values in block.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.{axis}", f"expected a non-empty list of values, got {values!r:.80}.",
                                  "Write the values as a YAML list, e.g. [1, 2].")
            axes.append([(axis, value) for value in values])
        for choice in itertools.product(*axes):
            combos.append({axis: value for axis, value in choice})
    if seeds is not None and (len(seeds) > 1 or seeds != [0]):
        combos = [{**combo, "train.seed": seed} for combo in combos for seed in seeds]
    unique, seen = [], set()
    for combo in combos:
        key = trial_key(combo)
        if key not in seen:
            seen.add(key)
            unique.append(combo)
    return unique


# ---- loading -------------------------------------------------------------------------------

def apply_spec_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """``--set`` on a spec: keys of a config section (``optimizer.lr``) go to ``base``,
    spec keys (``resources.workers``, ``seeds``) to the spec itself."""
    raw = copy.deepcopy(raw)
    for text in overrides or []:
        key, value = parse_override(text)
        head = key.split(".")[0]
        if head in SECTIONS:
            base = raw.setdefault("base", {})
            if not isinstance(base, dict):
                raise ConfigError("base", "expected a mapping (a training config).")
            set_dotted(base, key, value)
        elif head in SPEC_KEYS:
            set_dotted(raw, key, value)
        else:
            raise ConfigError(f"--set {key}", "is neither a config field nor a spec key.",
                              f"Config sections: {', '.join(SECTIONS)}; spec keys: {', '.join(SPEC_KEYS)}.")
    return raw


def _absolute_dataset_paths(base: dict) -> dict:
    """Dataset paths made absolute here: ``spec.yaml`` in the sweep folder keeps them
    for ``resume``, whatever directory that runs from."""
    dataset = base.get("dataset")
    if not isinstance(dataset, dict):
        return base
    import os

    resolved = dict(dataset)
    for key in PATH_KEYS:
        value = resolved.get(key)
        if isinstance(value, str) and value.strip() and "\x00" not in value:
            resolved[key] = os.path.abspath(os.path.expanduser(value))
    return {**base, "dataset": resolved}


def load_spec(source, overrides: list[str] | None = None, *, check_paths: bool = True) -> Spec:
    """Read and validate a spec (a YAML path or a dict); ``overrides`` are ``--set``
    strings. Every trial's config is parsed; every problem found is reported at once.
    ``check_paths`` also checks that dataset paths exist on this machine."""
    from trainers.yamlio import load_yaml

    raw = load_yaml(source, what="spec") if isinstance(source, (str, Path)) else copy.deepcopy(source)
    check_keys(raw, SPEC_KEYS, "")
    raw = apply_spec_overrides(raw, overrides)
    try:
        top = SpecFile.model_validate(raw)
    except ValidationError as exc:
        raise errors_from_validation(exc, SpecFile) from None
    size = top.search.samples if top.search is not None else grid_size(top.grid, top.seeds)
    if size > top.max_trials:
        where = "search.samples" if top.search is not None else "grid"
        raise ConfigError(where, f"asks for {size:,} trials, more than max_trials = {top.max_trials:,}.",
                          "Ask for fewer, or raise max_trials in the spec if you mean it.")
    name = top.name or (Path(source).stem if isinstance(source, (str, Path)) else "sweep")
    _refuse_emulate_in_configs(top)
    base = _absolute_dataset_paths(top.base)
    # One place of truth: resources.emulate_workers becomes every trial's train.emulate_workers
    # (what the engine reads and MLflow records); spec.yaml keeps the spec as written.
    emulate = {"train.emulate_workers": top.resources.emulate_workers}
    raw = {**raw, "base": base}
    if top.search is not None:
        return _search_spec(top, name, base, raw, check_paths)
    trials, problems, seen_configs = [], [], set()
    for combo in expand_grid(top.grid, top.seeds):
        label = trial_name(combo)
        try:
            flat = {}
            for axis, value in combo.items():
                flat.update(_axis_overrides(axis, value))
            config = parse_config(apply_overrides(base, {**flat, **emulate}))
            if check_paths:
                check_dataset_paths(config)
        except ConfigErrors as exc:
            problems.extend((label, error) for error in exc.errors)
            continue
        except UserInputError as exc:
            problems.append((label, exc))
            continue
        canonical = json.dumps(config.dump(), sort_keys=True)
        if canonical in seen_configs:  # two grid points that describe the same training
            continue
        seen_configs.add(canonical)
        trials.append(Trial(key=trial_key(combo), name=label, overrides=combo, config=config))
    if problems:
        raise _grouped(problems, len(trials) + len({label for label, _ in problems}))
    return _spec(top, name, base, raw, trials=trials)


def _search_spec(top: SpecFile, name: str, base: dict, raw: dict, check_paths: bool) -> Spec:
    """A search spec: every corner of its box must be a valid training config."""
    from alwa_sweep.search import require_sampler

    require_sampler(top.search)
    probes, problems = [], []
    for corner in top.search.corners():
        label = "search corner " + ",".join(f"{_short(k)}={v:g}" for k, v in corner.items())
        try:
            probe = sampled_trial(base, corner, top.resources.emulate_workers)
            if check_paths:
                check_dataset_paths(probe.config)
        except UserInputError as exc:
            problems.extend((label, error) for error in getattr(exc, "errors", [exc]))
            continue
        probes.append(probe)
    if problems:
        raise _grouped(problems, len(probes) + len({label for label, _ in problems}))
    return _spec(top, name, base, raw, probes=probes)


def _spec(top: SpecFile, name: str, base: dict, raw: dict, trials=(), probes=()) -> Spec:
    return Spec(name=name, description=top.description.strip(), experiment=top.experiment or f"alwa-{name}",
                base=base, trials=list(trials), resources=top.resources, scheduler=top.scheduler,
                max_concurrent=top.max_concurrent, max_failures=top.max_failures, estimate=top.estimate,
                keep_checkpoints=top.keep_checkpoints, search=top.search, probes=list(probes), raw=raw)


def _refuse_emulate_in_configs(top: SpecFile) -> None:
    """``train.emulate_workers`` is a resource of the sweep: set in ``resources`` only."""
    train = top.base.get("train")
    where = None
    if isinstance(train, dict) and "emulate_workers" in train:
        where = "base.train.emulate_workers"
    else:
        for combo in expand_grid(top.grid, top.seeds) if isinstance(top.grid, (dict, list)) else []:
            try:
                flat = {key: None for axis, value in combo.items() for key in _axis_overrides(axis, value)}
            except UserInputError:
                continue  # reported with the trial's other problems
            if "train.emulate_workers" in flat:
                where = "grid: train.emulate_workers"
                break
    if where is not None:
        raise ConfigError(where, "is set in the spec's training configs, but a sweep's emulated workers are "
                          "a resource of every trial.",
                          "Remove it and set resources.emulate_workers (e.g. --set resources.emulate_workers=4).")


def _grouped(problems: list[tuple[str, UserInputError]], total: int) -> UserInputError:
    """The trials' problems, each told once with the trials it concerns."""
    groups: dict[str, tuple[UserInputError, list[str]]] = {}
    for label, error in problems:
        groups.setdefault(str(error), (error, []))[1].append(label)
    errors = []
    for error, labels in groups.values():
        if len(labels) == total and total > 1:
            scope = "every trial"
        else:
            scope = "trial " + ", ".join(labels[:3]) + (f" (+{len(labels) - 3} more)" if len(labels) > 3 else "")
        errors.append(type(error)(f"{scope}: {error.where}", error.problem, error.hint))
    errors = errors[:MAX_REPORTED_PROBLEMS]
    return errors[0] if len(errors) == 1 else ConfigErrors(errors)


def check_dataset_paths(config: TrainingConfig) -> None:
    """The dataset's folders and split/annotation files exist (nothing is read)."""
    from trainers.data.build import validate_dataset_config

    validate_dataset_config(config.dataset.model_dump())


def check_datasets(configs) -> int:
    """Read each distinct dataset of these training configs as training will (every
    annotation parsed, every image's header read), so that a malformed XML or JSON, an
    unknown class or a missing or broken image fails before any run or trial exists instead of
    inside every trial. Also checks that ``model.num_classes``, where set, matches the
    dataset. Returns the number of distinct datasets read."""
    from trainers.data.build import build_datasets
    from trainers.data.checks import check_dataset_images

    seen: dict[str, int] = {}
    for config in configs:
        with_masks = config.model.detector == "mask_rcnn"
        key = json.dumps([config.dataset.model_dump(), with_masks], sort_keys=True)
        if key not in seen:
            train_set, test_set = build_datasets({**config.dataset.model_dump(), "flip": 0.0},
                                                 with_masks=with_masks)
            for dataset in (train_set, test_set):  # headers: a 0-byte or cut JPEG fails here
                check_dataset_images(dataset)
            seen[key] = len(train_set.class_names)
        classes = seen[key]
        if config.model.num_classes is not None and config.model.num_classes != classes:
            raise ConfigError("model.num_classes", f"is {config.model.num_classes}, but the dataset has "
                              f"{classes} classes.", "Leave it out (it defaults to the dataset's) or fix it.")
    return len(seen)


def spec_json_schema() -> dict:
    """A JSON Schema of spec files (``alwa-sweep schema``): editors complete and check YAML."""
    schema = SpecFile.model_json_schema()
    config_schema = TrainingConfig.model_json_schema()
    definitions = {**schema.pop("$defs", {}), **config_schema.pop("$defs", {})}
    config_schema.pop("required", None)
    config_schema["title"] = "Base training config"
    schema["properties"]["base"] = config_schema
    schema["$defs"] = definitions
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "alwa-sweep spec"
    return schema

