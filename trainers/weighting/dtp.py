"""DTP: Dynamic Task Prioritization.

Guo, Haque, Huang, Yeung, Fei-Fei, "Dynamic Task Prioritization for Multitask
Learning", ECCV 2018 (task-level focal weights). PAPER.md section 6.

    κ̄_k ← momentum · κ̄_k + (1 − momentum) · κ_k       (κ̄_k starts at the first κ_k)
    w_k = −(1 − κ̄_k)^γ · log κ̄_k,   κ̄_k clamped into [eps, 1 − eps]

The harder a task (low KPI), the larger its weight. The KPIs, in (0, 1), are the
detached scalars the detector reports for the weighted head through ``kpis``:
    classification: ``kpis["cls_acc"]``, the accuracy of the head's sampled anchors
                    (proposals, for the ROI head);
    regression:     ``kpis["reg_iou"]``, the mean IoU of the positive anchors' decoded
                    boxes with their ground truth.
Each call first folds its KPIs into the averages, then weights its losses with the
updated averages (the KPIs are detached, so this adds no gradient path).

Unnormalised, these weights are small for an easy task: an RPN classification
accuracy of 0.95 gives w = −0.05·log 0.95 ≈ 0.0026 at γ = 1, in effect a ~400×
smaller learning rate for that loss. ``normalize: true`` rescales the two weights
to sum to K = 2 (mean 1, the convention of DWA's K·softmax), keeping DTP's
prioritisation (the ratio w_cls / w_reg) while the loss keeps the scale of
fixed weights (1, 1).

Hyper-parameters: :class:`DTPSettings`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from trainers.errors import ConfigError
from trainers.weighting.base import LossWeighting, WeightingSettings

KPI_KEYS = ("cls_acc", "reg_iou")
NUM_TASKS = 2


class DTPSettings(WeightingSettings):
    method: Literal["dtp"] = "dtp"
    gamma: float = Field(1.0, ge=0, description="γ, the focusing parameter of w = −(1 − κ̄)^γ·log κ̄.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum of the KPIs' exponential moving average.")
    eps: float = Field(1e-6, gt=0, lt=0.5, description="Clamp margin of κ̄ into [eps, 1 − eps]; keeps log κ̄ "
                       "finite.")
    normalize: bool = Field(False, description="false: the paper's weights; true: the two weights rescaled "
                            "to sum to 2 (mean 1), keeping their ratio.")


class DTP(LossWeighting):
    name = "dtp"
    Settings = DTPSettings

    def __init__(self, settings: DTPSettings | None = None, **kwargs):
        super().__init__(settings, **kwargs)
        self._host.started = False  # whether kpi_average holds a KPI yet
        self.register_buffer("kpi_average", torch.zeros(NUM_TASKS, dtype=torch.float64))  # κ̄ (cls, reg)

    def forward(self, cls_loss: Tensor, reg_loss: Tensor, kpis: dict | None = None) -> tuple[Tensor, Tensor]:
        missing = [key for key in KPI_KEYS if not kpis or key not in kpis]
        if missing:
            raise ConfigError(
                "weighting.method", f"'dtp' needs the KPIs {', '.join(KPI_KEYS)} of the weighted head, "
                f"but the detector did not report {', '.join(missing)}.",
                "Weight a head whose detector reports them, or choose another method.")
        self._follow(cls_loss)
        s = self.settings
        kpi = torch.stack([torch.as_tensor(kpis[key], device=cls_loss.device) for key in KPI_KEYS])
        kpi = kpi.detach().to(torch.float64)
        if self._host.started:
            self.kpi_average = s.momentum * self.kpi_average + (1.0 - s.momentum) * kpi
        else:
            self.kpi_average = kpi
            self._host.started = True
        kappa = self.kpi_average.clamp(s.eps, 1.0 - s.eps)
        weights = -(1.0 - kappa).pow(s.gamma) * kappa.log()
        if s.normalize:
            weights = NUM_TASKS * weights / weights.sum()  # > 0: κ̄ is clamped inside (0, 1)
        cls_weight, reg_weight = weights[0].to(cls_loss.dtype), weights[1].to(reg_loss.dtype)
        self._host.last = {"cls": cls_weight, "reg": reg_weight}
        return cls_weight * cls_loss, reg_weight * reg_loss

    def get_extra_state(self) -> dict:
        return {"started": self._host.started}

    def set_extra_state(self, state: dict) -> None:
        self._host.started = bool(state["started"])
        self._host.last = {}
