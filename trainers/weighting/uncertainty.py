"""Uncertainty weighting.

Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
Scene Geometry and Semantics", CVPR 2018.

Each task k has a learnable log-variance s_k = log σ_k², trained with the network:

    L = Σ_k exp(−s_k) · L_k + s_k

The paper derives 1/σ² for classification and 1/(2σ²) for regression; we use the
common form exp(−s)·L + s for both tasks (as most implementations do): the factor
1/2 only rescales the regression term's fixed point and is absorbed by s.
The weighted outputs are cls_w = exp(−s_cls)·L_cls + s_cls and the same for reg.

Hyper-parameters: none (the log-variances start at 0, i.e. weights 1). The two
``nn.Parameter``s go to the optimizer (``parameters()``); ``.to(device)`` moves them
in place (the same Parameter objects), best before the optimizer is built.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from trainers.weighting.base import LossWeighting, WeightingSettings


class UncertaintySettings(WeightingSettings):
    method: Literal["uncertainty"] = "uncertainty"


class UncertaintyWeighting(LossWeighting):
    name = "uncertainty"
    Settings = UncertaintySettings

    def __init__(self, settings: UncertaintySettings | None = None, **kwargs):
        super().__init__(settings, **kwargs)
        self.log_var_cls = nn.Parameter(torch.zeros(()))
        self.log_var_reg = nn.Parameter(torch.zeros(()))

    def forward(self, cls_loss: Tensor, reg_loss: Tensor, kpis: dict | None = None) -> tuple[Tensor, Tensor]:
        self._follow(cls_loss)
        cls_weight = torch.exp(-self.log_var_cls)
        reg_weight = torch.exp(-self.log_var_reg)
        self._host.last = {"cls": cls_weight.detach(), "reg": reg_weight.detach()}
        return cls_weight * cls_loss + self.log_var_cls, reg_weight * reg_loss + self.log_var_reg
