"""Loss-weighting methods for a detection head's (classification, regression) pair.

One ``nn.Module`` per method, one file each (the shape of LibMTL's ``weighting/``),
each with its pydantic settings model; every file's docstring cites the method's
paper (and, for ALWA, the released code):

    none / fixed  fixed.py        Eq. 1, the weight grid of Table 1
    alwa          alwa.py         ALWA_1 / ALWA_2, the method of the paper
    guided        guided.py       Guided Loss (Chen et al., TIP 2021)
    dwa           dwa.py          Dynamic Weight Average (Liu et al., CVPR 2019)
    dtp           dtp.py          Dynamic Task Prioritization (Guo et al., ECCV 2018)
    uncertainty   uncertainty.py  Uncertainty weighting (Kendall et al., CVPR 2018)

``base.LossWeighting`` is the interface the engine calls; ``WeightingConfig`` is the
type of the config's ``weighting`` section and ``build_weighting`` makes the method.
"""

from trainers.weighting.alwa import ALWA, ALWASettings
from trainers.weighting.base import LossWeighting, WeightingSettings, WeightOverflowError
from trainers.weighting.build import (
    WEIGHTINGS, WeightingConfig, build_weighting, config_error, field_of, hyper_parameters, parse_weighting,
    validate_weighting_config,
)
from trainers.weighting.dtp import DTP, DTPSettings
from trainers.weighting.dwa import DWA, DWASettings
from trainers.weighting.fixed import FixedSettings, FixedWeights, NoneSettings, NoWeighting
from trainers.weighting.guided import GuidedLoss, GuidedSettings
from trainers.weighting.uncertainty import UncertaintySettings, UncertaintyWeighting

__all__ = [
    "ALWA", "ALWASettings", "DTP", "DTPSettings", "DWA", "DWASettings", "FixedSettings", "FixedWeights",
    "GuidedLoss", "GuidedSettings", "LossWeighting", "NoWeighting", "NoneSettings", "UncertaintySettings",
    "UncertaintyWeighting", "WEIGHTINGS", "WeightOverflowError", "WeightingConfig", "WeightingSettings",
    "build_weighting", "config_error", "field_of", "hyper_parameters", "parse_weighting", "validate_weighting_config",
]
