"""Fixed task weights: Eq. 1 of the paper, the (λcls, λreg) grid of its Table 1.

    L = λcls · L̂cls + λreg · L̂reg

Hyper-parameters (config ``weighting``):
    cls: λcls > 0 (default 1.0)
    reg: λreg > 0 (default 1.0)

``method: none`` is the detector's own loss, i.e. fixed weights (1, 1), with no
hyper-parameters.
"""

from __future__ import annotations

from torch import Tensor

from trainers.weighting.base import LossWeighting, check_number


class FixedWeights(LossWeighting):
    name = "fixed"

    def __init__(self, cls: float = 1.0, reg: float = 1.0):
        # Zero would silently switch a task off and a negative weight would maximise
        # its loss: both are configuration mistakes, not grid points of Table 1.
        self.cls = check_number("cls", cls, low=0.0)
        self.reg = check_number("reg", reg, low=0.0)
        self._called = False

    def __call__(self, cls_loss: Tensor, reg_loss: Tensor, *, kpis: dict | None = None) -> tuple[Tensor, Tensor]:
        self._called = True
        return self.cls * cls_loss, self.reg * reg_loss

    def log_values(self) -> dict[str, Tensor | float]:
        return {"cls": self.cls, "reg": self.reg} if self._called else {}


class NoWeighting(FixedWeights):
    """The unmodified detector loss: fixed weights (1, 1)."""

    name = "none"

    def __init__(self):
        super().__init__(1.0, 1.0)
