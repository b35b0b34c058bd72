"""A search over continuous settings (the loss weights), beyond the grid: Optuna via Ray Tune.

A spec with ``search:`` instead of ``grid:`` samples ``samples`` trials from ``space``;
Optuna's TPE sampler (``ray.tune.search.optuna.OptunaSearch``) proposes each new point
from the scores of the trials that finished, so the later trials concentrate where the
metric is best::

    base: {…, weighting: {method: fixed}}
    search:
      type: optuna
      samples: 24
      metric: val/map                 # default: the dataset's main metric
      mode: max
      seed: 0
      space:
        weighting.cls: {low: 0.25, high: 4.0, log: true}
        weighting.reg: {low: 0.25, high: 4.0, log: true}

Each sampled point is a trial like a grid point: its overrides are the sampled values,
its key a hash of them (``alwa_sweep.spec.sampled_trial``), one MLflow run per trial
with the values in its params. The space is checked when the spec is read: every corner
of the box must parse as a training config, so every point inside does (the config's
numeric constraints are intervals).
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from trainers.config import SECTIONS, Section

MAX_DIMENSIONS = 8  # corners checked: 2**8 = 256 configs at most


class Range(Section):
    """One dimension: a float in [low, high], sampled uniformly or log-uniformly."""

    low: float
    high: float
    log: bool = Field(False, description="sample log-uniformly (loss weights: true)")

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low:g})")
        return self


class Search(Section):
    """``search:`` of a spec (instead of ``grid:``)."""

    type: Literal["optuna"] = "optuna"
    samples: int = Field(ge=1, le=10_000, description="trials to sample (Tune's num_samples)")
    space: dict[str, Range] = Field(min_length=1, max_length=MAX_DIMENSIONS,
                                    description="config field (dotted) → {low, high, log}")
    metric: Optional[str] = Field(None, description="what the sampler optimises; default: val/map (VOC) or "
                                  "val/ap (COCO)")
    mode: Literal["max", "min"] = "max"
    seed: int = Field(0, ge=0, le=2**31 - 1, description="the sampler's seed")

    @field_validator("space", mode="before")
    @classmethod
    def _dotted(cls, space):
        """``{weighting: {cls: {low: …}}}`` (what ``--set search.space.weighting.cls.low=…``
        builds) is ``{weighting.cls: {low: …}}``."""
        if not isinstance(space, dict):
            return space
        flat: dict = {}

        def walk(prefix: str, mapping: dict) -> None:
            for key, value in mapping.items():
                name = f"{prefix}{key}"
                is_range = isinstance(value, dict) and (not value or set(value) & set(Range.model_fields))
                if isinstance(value, dict) and not is_range:
                    walk(f"{name}.", value)
                elif isinstance(value, dict) and isinstance(flat.get(name), dict):
                    flat[name] = {**flat[name], **value}  # --set of one end of a range written dotted
                else:
                    flat[name] = value
        walk("", space)
        return flat

    @field_validator("space")
    @classmethod
    def _fields(cls, space: dict) -> dict:
        for key in space:
            if key.split(".")[0] not in SECTIONS or key.count(".") < 1:
                raise ValueError(f"{key!r} is not a config field; fields start with one of: {', '.join(SECTIONS)} "
                                 "(e.g. weighting.cls)")
            if key == "train.seed":
                raise ValueError("train.seed is not a continuous setting; repeat a search with another seed")
        return space

    def corners(self) -> list[dict]:
        """Every corner of the box: the overrides checked when the spec is read."""
        keys = list(self.space)
        return [dict(zip(keys, values))
                for values in itertools.product(*[(self.space[k].low, self.space[k].high) for k in keys])]


def require_sampler(search: Search) -> None:
    """The sampler's package is importable (checked when a search spec is read)."""
    import importlib.util

    from trainers.errors import ConfigError

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("search.type", f"is {search.type!r}, but the optuna package is not installed.",
                          "pip install optuna (a dependency of alwa-sweep), or use a grid.")


def tune_space(search: Search) -> dict:
    """The ``param_space`` entry Tune samples: field → ``tune.uniform``/``tune.loguniform``."""
    from ray import tune

    return {key: (tune.loguniform if r.log else tune.uniform)(r.low, r.high) for key, r in search.space.items()}


def build_searcher(search: Search, metric: str):
    """Optuna's TPE sampler through Tune (``metric`` as a key of the trials' results)."""
    from ray.tune.search.optuna import OptunaSearch

    class EvaluatedResultsOnly(OptunaSearch):
        """A trial reports its metric only once evaluated (``schedulers.tune_result``):
        the results before (checkpoints) are not given to Optuna as intermediate values,
        which ``OptunaSearch.on_trial_result`` would read as ``result[metric]``."""

        def on_trial_result(self, trial_id, result):
            if self.metric in result:
                super().on_trial_result(trial_id, result)

    # (and run_sweep turns Tune's strict metric check off)
    return EvaluatedResultsOnly(metric=metric, mode=search.mode, seed=search.seed)
