"""The weighting methods by name, the typed config section that picks one, the builder.

    weighting:
      method: none | fixed | alwa | guided | dwa | dtp | uncertainty   (missing: none)
      head: auto | rpn | roi | retina   # the head whose (cls, reg) pair is weighted
      ...                               # the method's hyper-parameters (its Settings model)

``WeightingConfig`` is the pydantic type of that section: a union of the methods'
settings models discriminated by ``method``. Defaults, ranges and documentation
live in the settings models only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter, ValidationError

from trainers.errors import ConfigError
from trainers.weighting.alwa import ALWA, ALWASettings
from trainers.weighting.base import LossWeighting, WeightingSettings
from trainers.weighting.dtp import DTP, DTPSettings
from trainers.weighting.dwa import DWA, DWASettings
from trainers.weighting.fixed import FixedSettings, FixedWeights, NoneSettings, NoWeighting
from trainers.weighting.guided import GuidedLoss, GuidedSettings
from trainers.weighting.uncertainty import UncertaintySettings, UncertaintyWeighting

WEIGHTINGS: dict[str, type[LossWeighting]] = {
    method_class.name: method_class
    for method_class in (NoWeighting, FixedWeights, ALWA, GuidedLoss, DWA, DTP, UncertaintyWeighting)
}

_METHODS = ", ".join(repr(name) for name in WEIGHTINGS)


def _method_of(value: Any) -> str | None:
    """The discriminator: a missing ``method`` means "none"."""
    method = value.get("method", "none") if isinstance(value, Mapping) else getattr(value, "method", "none")
    return method if isinstance(method, str) else None


WeightingConfig = Annotated[
    Union[
        Annotated[NoneSettings, Tag("none")],
        Annotated[FixedSettings, Tag("fixed")],
        Annotated[ALWASettings, Tag("alwa")],
        Annotated[GuidedSettings, Tag("guided")],
        Annotated[DWASettings, Tag("dwa")],
        Annotated[DTPSettings, Tag("dtp")],
        Annotated[UncertaintySettings, Tag("uncertainty")],
    ],
    Discriminator(_method_of, custom_error_type="weighting_method",
                  custom_error_message=f"method should be one of {_METHODS}",
                  custom_error_context={"discriminator": "method"}),
]

_ADAPTER: TypeAdapter[WeightingSettings] = TypeAdapter(WeightingConfig)


def parse_weighting(cfg: Mapping | WeightingSettings | None) -> WeightingSettings:
    """The settings model of a ``weighting`` section (None or {}: method "none").
    Raises pydantic's ValidationError; the first element of an error's ``loc`` is the
    method's tag, the second the field (see :func:`field_of`)."""
    return _ADAPTER.validate_python({} if cfg is None else cfg)


def build_weighting(settings: WeightingSettings | Mapping | None) -> LossWeighting:
    """The weighting method for ``settings`` (a settings model, or a plain dict / None
    validated through ``WeightingConfig``)."""
    if not isinstance(settings, WeightingSettings):
        settings = parse_weighting(settings)
    return WEIGHTINGS[settings.method](settings)


def hyper_parameters(settings: WeightingSettings) -> dict:
    """The method's hyper-parameters with their values, defaults included (without
    ``method`` and ``head``): what a run records as parameters."""
    return settings.model_dump(exclude={"method", "head"})


def field_of(error: dict) -> str:
    """The dotted config field of one ``ValidationError.errors()`` entry: the union's
    tag dropped, and a bad or missing discriminator reported as ``weighting.method``."""
    loc = error["loc"]
    if not loc or error["type"] == "weighting_method":
        return "weighting.method" if error["type"] == "weighting_method" else "weighting"
    return "weighting" if len(loc) == 1 else f"weighting.{loc[1]}"


def config_error(exc: ValidationError) -> ConfigError:
    """The project's one-paragraph error for the first bad field of a ``weighting``
    section (the messages of a union's alternatives for that field are joined)."""
    errors = exc.errors()
    where = field_of(errors[0])
    first = errors[0]
    if first["type"] == "weighting_method":
        method = first["input"].get("method") if isinstance(first["input"], Mapping) else first["input"]
        return ConfigError(where, f"unknown value {method!r}.", f"Allowed values: {', '.join(WEIGHTINGS)}.")
    if first["type"] == "model_type":
        return ConfigError(where, f"must be a mapping of settings (got {type(first['input']).__name__}).",
                           "Write it as 'weighting: {method: alwa, ...}'.")
    if first["type"] == "extra_forbidden":
        method = first["loc"][0]
        allowed = ", ".join(WEIGHTINGS[method].Settings.model_fields)
        return ConfigError(where, f"is not a setting of method {method!r}.",
                           f"Allowed keys for {method}: {allowed}.")
    messages = list(dict.fromkeys(e["msg"] for e in errors if field_of(e) == where))
    prefix = "Input should be "
    problem = messages[0] + "".join(
        f" or {m.removeprefix(prefix) if messages[0].startswith(prefix) else m}" for m in messages[1:])
    return ConfigError(where, f"{problem} (got {first['input']!r}).")


def validate_weighting_config(cfg: Mapping | None) -> WeightingSettings:
    """Transitional, for the dict config of trainers/config.py: the settings, or a
    ConfigError naming the first bad field (the typed config replaces it)."""
    try:
        return parse_weighting(cfg)
    except ValidationError as exc:
        raise config_error(exc) from None
