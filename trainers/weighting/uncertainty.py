"""Uncertainty weighting.

Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
Scene Geometry and Semantics", CVPR 2018.

Each task k has a learnable log-variance s_k = log σ_k², trained with the network:

    L = Σ_k exp(−s_k) · L_k + s_k

The paper derives 1/σ² for classification and 1/(2σ²) for regression; we use the
common form exp(−s)·L + s for both tasks (as most implementations do): the factor
1/2 only rescales the regression term's fixed point and is absorbed by s.
The weighted outputs are cls_w = exp(−s_cls)·L_cls + s_cls and the same for reg.

Hyper-parameters: none (the log-variances start at 0, i.e. weights 1).
The parameters live where the losses are: ``to(device)`` moves them in place (the
same Parameter objects), best before the optimizer is built or its state loaded;
failing that, the first call on another device moves them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainers.weighting.base import LossWeighting


class UncertaintyWeighting(LossWeighting):
    name = "uncertainty"

    def __init__(self):
        self.log_var_cls = torch.nn.Parameter(torch.zeros(()))
        self.log_var_reg = torch.nn.Parameter(torch.zeros(()))
        self._last: dict[str, Tensor | float] = {}

    def __call__(self, cls_loss: Tensor, reg_loss: Tensor, *, kpis: dict | None = None) -> tuple[Tensor, Tensor]:
        if self.log_var_cls.device != cls_loss.device:
            self.to(cls_loss.device)
        cls_weight = torch.exp(-self.log_var_cls)
        reg_weight = torch.exp(-self.log_var_reg)
        self._last = {"cls": cls_weight.detach(), "reg": reg_weight.detach()}
        return cls_weight * cls_loss + self.log_var_cls, reg_weight * reg_loss + self.log_var_reg

    def to(self, device: torch.device | str) -> "UncertaintyWeighting":
        # In place: the optimizer holding these Parameter objects keeps working.
        for parameter in self.parameters():
            parameter.data = parameter.data.to(device)
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.log_var_cls, self.log_var_reg]

    def log_values(self) -> dict[str, Tensor | float]:
        return dict(self._last)

    def state_dict(self) -> dict:
        return {"log_var_cls": self.log_var_cls.detach().cpu().clone(),
                "log_var_reg": self.log_var_reg.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.log_var_cls.copy_(state["log_var_cls"])
            self.log_var_reg.copy_(state["log_var_reg"])
