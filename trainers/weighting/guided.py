"""Guided Loss.

J. Chen et al., "Is Heuristic Sampling Necessary in Training Deep Object
Detectors?", IEEE Transactions on Image Processing 2021 (PAPER.md section 6).

The classification loss is rescaled by the no-grad ratio of the two losses, so that
both terms have the same magnitude while the gradient directions are unchanged:

    L = (L_reg / L_cls)_no-grad · L_cls + L_reg

Hyper-parameters (:class:`GuidedSettings`): ``eps``, the lower bound on the detached
L_cls in the ratio's denominator.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from trainers.weighting.base import LossWeighting, WeightingSettings


class GuidedSettings(WeightingSettings):
    method: Literal["guided"] = "guided"
    eps: float = Field(1e-8, gt=0, lt=1, description="Lower bound on the detached classification loss "
                       "in the ratio, so that a vanishing L_cls gives a large finite weight, not inf.")


class GuidedLoss(LossWeighting):
    name = "guided"
    Settings = GuidedSettings

    def forward(self, cls_loss: Tensor, reg_loss: Tensor, kpis: dict | None = None) -> tuple[Tensor, Tensor]:
        cls_weight = reg_loss.detach() / cls_loss.detach().clamp_min(self.settings.eps)
        self._host.last = {"cls": cls_weight, "reg": 1.0}
        return cls_weight * cls_loss, reg_loss
