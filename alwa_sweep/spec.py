"""Sweep specs: YAML → validated spec → the list of trials.

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
    seeds: [0]                        # repeats: one trial per seed
    resources: {workers: 4, cpus_per_worker: 4, gpus_per_worker: 1}
    scheduler: {type: none}           # or {type: asha, grace_period: 2, reduction_factor: 2}
    max_concurrent: null
    max_failures: 2                   # retries of a killed trial, from its last checkpoint
    estimate: {hours_per_trial: 6.0}  # for `validate`'s resource-hours

Every trial is the base config with its overrides applied; trials are identified by a
deterministic key (a hash of the overrides), which maps a trial to its MLflow run.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers.config import DEFAULTS, apply_overrides, check_keys, load_yaml, resolve_config, validate_config
from trainers.data.build import build_datasets, resolve_dataset_paths
from trainers.errors import ConfigError, UserInputError

SPEC_KEYS = {"name", "description", "experiment", "base", "grid", "seeds", "resources", "scheduler",
             "max_concurrent", "max_failures", "estimate"}
RESOURCE_KEYS = {"workers", "cpus_per_worker", "gpus_per_worker"}
SCHEDULER_KEYS = {"type", "metric", "mode", "grace_period", "reduction_factor"}
SCHEDULERS = ("none", "asha")
ESTIMATE_KEYS = {"hours_per_trial"}


@dataclass
class Trial:
    key: str  # deterministic: hash of the overrides
    name: str  # readable: the overrides in short
    overrides: dict  # dotted key → value
    config: dict  # resolved, validated training config


@dataclass
class Spec:
    name: str
    description: str
    experiment: str
    base: dict
    trials: list[Trial]
    resources: dict
    scheduler: dict
    max_concurrent: int | None
    max_failures: int
    estimate: dict
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def uses_gpus(self) -> bool:
        return self.resources["gpus_per_worker"] > 0

    def resource_hours(self) -> float | None:
        hours = self.estimate.get("hours_per_trial")
        if hours is None:
            return None
        per_worker = self.resources["gpus_per_worker"] if self.uses_gpus else self.resources["cpus_per_worker"]
        return len(self.trials) * self.resources["workers"] * per_worker * hours


def _short(key: str) -> str:
    return key.split(".")[-1]


def _value_text(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{_short(k)}={_value_text(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "x".join(_value_text(v) for v in value)
    return str(value)


def trial_name(overrides: dict) -> str:
    parts = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            parts.append(_value_text(value))
        else:
            parts.append(f"{_short(key)}={_value_text(value)}")
    return "_".join(parts) or "base"


def trial_key(overrides: dict) -> str:
    canonical = json.dumps(overrides, sort_keys=True, default=str)
    return hashlib.sha1(canonical.encode()).hexdigest()[:12]


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
    if axis.split(".")[0] in DEFAULTS:
        return _flatten_override(axis, value)
    if not isinstance(value, dict):
        raise ConfigError(f"grid.{axis}", f"{axis!r} is not a config field, so its values must be mappings "
                          f"of config fields; got {value!r}.",
                          f"Name the field (e.g. weighting.method), or write values like {{weighting.method: alwa}}; "
                          f"config sections are {', '.join(DEFAULTS)}.")
    flat = {}
    for key, sub_value in value.items():
        if key.split(".")[0] not in DEFAULTS:
            raise ConfigError(f"grid.{axis}.{key}", "unknown config field.",
                              f"Fields start with one of: {', '.join(DEFAULTS)}.")
        flat.update(_flatten_override(key, sub_value))
    return flat


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
            raise ConfigError(where, "must be a non-empty mapping of axis → list of values.",
                              "Example: {weighting.method: [none, alwa]}")
        axes = []
        for axis, values in block.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.{axis}", f"expected a non-empty list of values, got {values!r}.",
                                  "Write the values as a YAML list, e.g. [1, 2].")
            axes.append([(axis, value) for value in values])
        for choice in itertools.product(*axes):
            combos.append({axis: value for axis, value in choice})
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
            raise ConfigError("seeds", f"expected a non-empty list of non-negative integers, got {seeds!r}.")
        if len(seeds) > 1 or seeds != [0]:
            combos = [{**combo, "train.seed": seed} for combo in combos for seed in seeds]
    unique, seen = [], set()
    for combo in combos:
        key = trial_key(combo)
        if key not in seen:
            seen.add(key)
            unique.append(combo)
    return unique


def _positive_int(value, where, *, optional=False):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(where, f"expected a positive integer, got {value!r}.")


def _resources(raw) -> dict:
    resources = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}
    if raw is not None:
        check_keys(raw, RESOURCE_KEYS, "resources")
        resources.update(raw)
    _positive_int(resources["workers"], "resources.workers")
    for key in ("cpus_per_worker", "gpus_per_worker"):
        value = resources[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"resources.{key}", f"expected a non-negative number, got {value!r}.")
    if resources["cpus_per_worker"] == 0 and resources["gpus_per_worker"] == 0:
        raise ConfigError("resources", "a trial needs some CPU or GPU.", "Set cpus_per_worker > 0.")
    if resources["workers"] > 1 and 0 < resources["gpus_per_worker"] < 1:
        raise ConfigError("resources.gpus_per_worker", "fractional GPUs are for single-worker trials.",
                          "Use whole GPUs per worker for multi-worker (DDP) trials.")
    return resources


def _scheduler(raw) -> dict:
    scheduler = {"type": "none", "metric": None, "mode": "max", "grace_period": 1, "reduction_factor": 3}
    if raw is not None:
        check_keys(raw, SCHEDULER_KEYS, "scheduler")
        scheduler.update(raw)
    if scheduler["type"] not in SCHEDULERS:
        raise ConfigError("scheduler.type", f"unknown value {scheduler['type']!r}.",
                          f"Allowed values: {', '.join(SCHEDULERS)}.")
    if scheduler["mode"] not in ("max", "min"):
        raise ConfigError("scheduler.mode", f"unknown value {scheduler['mode']!r}.", "Allowed values: max, min.")
    _positive_int(scheduler["grace_period"], "scheduler.grace_period")
    if not isinstance(scheduler["reduction_factor"], (int, float)) or scheduler["reduction_factor"] <= 1:
        raise ConfigError("scheduler.reduction_factor", f"must be > 1, got {scheduler['reduction_factor']!r}.")
    return scheduler


def _check_trial_config(config: dict, where: str, check_paths: bool) -> dict:
    try:
        return validate_config(resolve_config(config), check_paths=check_paths)
    except UserInputError as exc:
        raise type(exc)(f"{where}: {exc.where}", exc.problem, exc.hint) from None


def load_spec(source, overrides: list[str] | None = None, *, check_paths: bool = True) -> Spec:
    """Read and validate a spec (a YAML path or a dict); ``overrides`` are ``--set``
    strings applied to the base config. Every trial's config is validated."""
    raw = load_yaml(source) if isinstance(source, (str, Path)) else copy.deepcopy(source)
    check_keys(raw, SPEC_KEYS, "")
    for required in ("base", "grid"):
        if required not in raw:
            raise ConfigError(required, "is missing.", "A spec needs a base config and a grid of axes.")
    default_name = Path(source).stem if isinstance(source, (str, Path)) else "sweep"
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError("name", f"{name!r} may only hold letters, digits, '.', '_' and '-'.")
    if not isinstance(raw["base"], dict):
        raise ConfigError("base", "expected a mapping (a training config).")
    base = apply_overrides(raw["base"], overrides)
    if isinstance(base.get("dataset"), dict):
        # Absolute from here on: spec.yaml in the sweep folder keeps them for `resume`,
        # whatever directory that runs from.
        base["dataset"] = resolve_dataset_paths(base["dataset"])
    trials, seen_configs = [], set()
    for combo in expand_grid(raw["grid"], raw.get("seeds")):
        flat = {}
        for axis, value in combo.items():
            flat.update(_axis_overrides(axis, value))
        label = trial_name(combo)
        config = _check_trial_config(apply_overrides(base, flat), f"trial {label}", check_paths)
        canonical = json.dumps(config, sort_keys=True, default=str)
        if canonical in seen_configs:  # two grid points that describe the same training
            continue
        seen_configs.add(canonical)
        trials.append(Trial(key=trial_key(combo), name=label, overrides=combo, config=config))
    max_concurrent = raw.get("max_concurrent")
    _positive_int(max_concurrent, "max_concurrent", optional=True)
    max_failures = raw.get("max_failures", 2)
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise ConfigError("max_failures", f"expected a non-negative integer, got {max_failures!r}.")
    estimate = raw.get("estimate") or {}
    check_keys(estimate, ESTIMATE_KEYS, "estimate")
    hours = estimate.get("hours_per_trial")
    if hours is not None and (isinstance(hours, bool) or not isinstance(hours, (int, float)) or hours <= 0):
        raise ConfigError("estimate.hours_per_trial", f"expected a positive number, got {hours!r}.")
    experiment = raw.get("experiment", f"alwa-{name}")
    if not isinstance(experiment, str) or not experiment.strip():
        raise ConfigError("experiment", f"expected a non-empty name, got {experiment!r}.")
    return Spec(name=name, description=str(raw.get("description", "")).strip(), experiment=experiment,
                base=base, trials=trials, resources=_resources(raw.get("resources")),
                scheduler=_scheduler(raw.get("scheduler")), max_concurrent=max_concurrent,
                max_failures=max_failures, estimate=estimate, raw=raw)


def check_datasets(configs) -> int:
    """Read each distinct dataset of these training configs as training will (every
    annotation parsed, every image folder listed), so that a malformed XML or JSON, an
    unknown class or a missing image fails before any run or trial exists instead of
    inside every trial. Returns the number of distinct datasets read."""
    seen = set()
    for config in configs:
        with_masks = config["model"]["detector"] == "mask_rcnn"
        key = json.dumps([config["dataset"], with_masks], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            build_datasets({**config["dataset"], "flip": 0.0}, with_masks=with_masks)
    return len(seen)
