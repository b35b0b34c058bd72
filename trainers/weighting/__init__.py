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

__all__ = [
    "ALWA", "DTP", "DWA", "FixedWeights", "GuidedLoss", "LossWeighting", "NoWeighting",
    "UncertaintyWeighting", "WEIGHTINGS", "WeightOverflowError", "build_weighting",
    "validate_weighting_config",
]
