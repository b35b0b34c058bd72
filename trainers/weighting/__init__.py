"""Loss-weighting methods for a detection head's (classification, regression) pair.

One class per method, one file each (the shape of LibMTL's ``weighting/``); every
file's docstring cites the method's paper and lists its hyper-parameters:

    none / fixed  fixed.py        Eq. 1, the weight grid of Table 1
    alwa          alwa.py         ALWA_1 / ALWA_2, the method of the paper
    guided        guided.py       Guided Loss (Chen et al., TIP 2021)
    dwa           dwa.py          Dynamic Weight Average (Liu et al., CVPR 2019)
    dtp           dtp.py          Dynamic Task Prioritization (Guo et al., ECCV 2018)
    uncertainty   uncertainty.py  Uncertainty weighting (Kendall et al., CVPR 2018)

``base.LossWeighting`` is the interface the engine calls; ``build_weighting`` makes
one from the config's ``weighting`` section.
"""

from trainers.weighting.alwa import ALWA
from trainers.weighting.base import LossWeighting, WeightOverflowError
from trainers.weighting.build import WEIGHTINGS, build_weighting, validate_weighting_config
from trainers.weighting.dtp import DTP
from trainers.weighting.dwa import DWA
from trainers.weighting.fixed import FixedWeights, NoWeighting
from trainers.weighting.guided import GuidedLoss
from trainers.weighting.uncertainty import UncertaintyWeighting

# ---- interim typed settings (replaced by the per-method settings models) ----
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class WeightingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    head: Literal["auto", "rpn", "roi", "retina"] = "auto"


class NoneSettings(WeightingSettings):
    method: Literal["none"] = "none"


class FixedSettings(WeightingSettings):
    method: Literal["fixed"] = "fixed"
    cls: float = Field(1.0, gt=0)
    reg: float = Field(1.0, gt=0)


class ALWASettings(WeightingSettings):
    method: Literal["alwa"] = "alwa"
    variant: Literal[1, 2] = 1
    lambda0: float = Field(1.0, gt=0)
    interval: int = Field(100, ge=1, le=1_000_000)
    convention: Literal["official", "paper"] = "official"
    records: Literal["weighted", "raw"] = "weighted"
    sync_records: bool = False


class GuidedSettings(WeightingSettings):
    method: Literal["guided"] = "guided"
    eps: float = Field(1e-8, gt=0, lt=1)


class DWASettings(WeightingSettings):
    method: Literal["dwa"] = "dwa"
    temperature: float = Field(2.0, gt=0)
    period: Union[Literal["epoch"], Annotated[int, Field(ge=1)]] = "epoch"


class DTPSettings(WeightingSettings):
    method: Literal["dtp"] = "dtp"
    gamma: float = Field(1.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0, lt=0.5)


class UncertaintySettings(WeightingSettings):
    method: Literal["uncertainty"] = "uncertainty"


_SETTINGS = (NoneSettings, FixedSettings, ALWASettings, GuidedSettings, DWASettings, DTPSettings,
             UncertaintySettings)


def _method_of(value):
    if isinstance(value, dict):
        return value.get("method", "none")
    return getattr(value, "method", "none")


WeightingConfig = Annotated[
    Union[tuple(Annotated[s, Tag(s.model_fields["method"].default)] for s in _SETTINGS)],
    Discriminator(_method_of),
]

__all__ = [
    "ALWA", "DTP", "DWA", "FixedWeights", "GuidedLoss", "LossWeighting", "NoWeighting",
    "UncertaintyWeighting", "WEIGHTINGS", "WeightOverflowError", "build_weighting",
    "validate_weighting_config",
]
