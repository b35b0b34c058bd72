"""Guided Loss.

J. Chen et al., "Is Heuristic Sampling Necessary in Training Deep Object
Detectors?", IEEE Transactions on Image Processing 2021 (PAPER.md section 6).

The classification loss is rescaled by the no-grad ratio of the two losses, so that
both terms have the same magnitude while the gradient directions are unchanged:

    L = (L_reg / L_cls)_no-grad · L_cls + L_reg

Hyper-parameters (config ``weighting``):
    eps: lower bound on the detached L_cls in the ratio's denominator (default 1e-8),
         so that a vanishing classification loss gives a large finite weight, not inf.
"""

from __future__ import annotations

from torch import Tensor

from trainers.weighting.base import LossWeighting, check_number


class GuidedLoss(LossWeighting):
    name = "guided"

    def __init__(self, eps: float = 1e-8):
        self.eps = check_number("eps", eps, low=0.0, high=1.0)
        self._cls_weight: Tensor | None = None

    def __call__(self, cls_loss: Tensor, reg_loss: Tensor, *, kpis: dict | None = None) -> tuple[Tensor, Tensor]:
        self._cls_weight = reg_loss.detach() / cls_loss.detach().clamp_min(self.eps)
        return self._cls_weight * cls_loss, reg_loss

    def log_values(self) -> dict[str, Tensor | float]:
        return {} if self._cls_weight is None else {"cls": self._cls_weight, "reg": 1.0}
