"""Fixed task weights: Eq. 1 of the paper, the (λcls, λreg) grid of its Table 1.

    L = λcls · L̂cls + λreg · L̂reg

Hyper-parameters (:class:`FixedSettings`): ``cls`` = λcls > 0, ``reg`` = λreg > 0
(default 1.0 each). ``method: none`` is the detector's own loss, fixed weights
(1, 1), with no hyper-parameters (:class:`NoneSettings`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from trainers.weighting.base import LossWeighting, WeightingSettings


class NoneSettings(WeightingSettings):
    """The unmodified detector loss."""

    method: Literal["none"] = "none"


class FixedSettings(WeightingSettings):
    # Zero would silently switch a task off and a negative weight would maximise its
    # loss: both are configuration mistakes, not grid points of Table 1.
    method: Literal["fixed"] = "fixed"
    cls: float = Field(1.0, gt=0, description="λcls, the classification loss weight (Eq. 1).")
    reg: float = Field(1.0, gt=0, description="λreg, the regression loss weight (Eq. 1).")


class FixedWeights(LossWeighting):
    name = "fixed"
    Settings = FixedSettings

    def _weights(self) -> tuple[float, float]:
        return self.settings.cls, self.settings.reg

    def forward(self, cls_loss: Tensor, reg_loss: Tensor, kpis: dict | None = None) -> tuple[Tensor, Tensor]:
        cls_weight, reg_weight = self._weights()
        self._host.last = {"cls": cls_weight, "reg": reg_weight}
        return cls_weight * cls_loss, reg_weight * reg_loss


class NoWeighting(FixedWeights):
    """The unmodified detector loss: fixed weights (1, 1)."""

    name = "none"
    Settings = NoneSettings

    def _weights(self) -> tuple[float, float]:
        return 1.0, 1.0
