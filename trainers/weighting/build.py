"""The weighting methods by name, and the config section that picks one.

    weighting:
      method: none | fixed | alwa | guided | dwa | dtp | uncertainty
      head: auto | rpn | roi | retina   # the head whose (cls, reg) pair is weighted
      ...                               # the method's hyper-parameters (its class docstring)

A method's allowed keys are its constructor's parameters; the constructors check the
values, so the checks live in one place.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from trainers.errors import ConfigError, choice_error
from trainers.weighting.alwa import ALWA
from trainers.weighting.base import LossWeighting, check_choice
from trainers.weighting.dtp import DTP
from trainers.weighting.dwa import DWA
from trainers.weighting.fixed import FixedWeights, NoWeighting
from trainers.weighting.guided import GuidedLoss
from trainers.weighting.uncertainty import UncertaintyWeighting

WEIGHTINGS: dict[str, type[LossWeighting]] = {
    "none": NoWeighting,
    "fixed": FixedWeights,
    "alwa": ALWA,
    "guided": GuidedLoss,
    "dwa": DWA,
    "dtp": DTP,
    "uncertainty": UncertaintyWeighting,
}

# "auto" lets the engine pick the detector's anchor head (RPN, or RetinaNet's head).
HEADS = ("auto", "rpn", "roi", "retina")
COMMON_KEYS = ("method", "head")


def hyper_parameters(method_class: type[LossWeighting]) -> list[str]:
    """The config keys a method accepts besides ``method`` and ``head``."""
    signature = inspect.signature(method_class.__init__)
    return [name for name in signature.parameters if name != "self"]


def _method_and_options(cfg: Mapping | None) -> tuple[type[LossWeighting], dict]:
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise ConfigError("weighting", f"must be a mapping of settings (got {type(cfg).__name__}).",
                          "Write it as 'weighting: {method: alwa, ...}'.")
    method = cfg.get("method", "none")
    if not isinstance(method, str) or method not in WEIGHTINGS:
        raise choice_error("weighting.method", method, WEIGHTINGS)
    check_choice("head", cfg.get("head", "auto"), HEADS)
    method_class = WEIGHTINGS[method]
    allowed = hyper_parameters(method_class)
    options = {key: value for key, value in cfg.items() if key not in COMMON_KEYS}
    for key in options:
        if key not in allowed:
            allowed_keys = ", ".join(list(COMMON_KEYS) + allowed)
            raise ConfigError(f"weighting.{key}", f"is not a setting of method {method!r}.",
                              f"Allowed keys for {method}: {allowed_keys}.")
    return method_class, options


def validate_weighting_config(cfg: Mapping | None) -> None:
    """Raise ConfigError naming the field if ``cfg`` (the ``weighting`` section) is invalid."""
    build_weighting(cfg)  # construction is cheap and touches no device: the constructors are the checks


def build_weighting(cfg: Mapping | None) -> LossWeighting:
    """The weighting method described by the ``weighting`` config section (None or {}: ``none``)."""
    if hasattr(cfg, "model_dump"):  # interim: typed settings
        cfg = cfg.model_dump()
    method_class, options = _method_and_options(cfg)
    return method_class(**options)
