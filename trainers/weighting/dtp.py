"""DTP: Dynamic Task Prioritization.

Guo, Haque, Huang, Yeung, Fei-Fei, "Dynamic Task Prioritization for Multitask
Learning", ECCV 2018 (task-level focal weights). PAPER.md section 6.

    κ̄_k ← momentum · κ̄_k + (1 − momentum) · κ_k       (κ̄_k starts at the first κ_k)
    w_k = −(1 − κ̄_k)^γ · log κ̄_k,   κ̄_k clamped into [eps, 1 − eps]

The harder a task (low KPI), the larger its weight. The KPIs, in (0, 1), are the
detached scalars the detector reports for the weighted head through ``kpis``:
    classification: ``kpis["cls_acc"]``, the accuracy of the sampled anchors;
    regression:     ``kpis["reg_iou"]``, the mean IoU of the positive anchors' decoded
                    boxes with their ground truth.
Each call first folds its KPIs into the averages, then weights its losses with the
updated averages (the KPIs are detached, so this adds no gradient path).

Hyper-parameters (config ``weighting``):
    gamma:    focusing parameter γ >= 0 (default 1.0)
    momentum: EMA momentum in [0, 1) (default 0.9)
    eps:      clamp margin of κ̄ in (0, 0.5) (default 1e-6), keeps log κ̄ finite
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainers.errors import ConfigError
from trainers.weighting.base import LossWeighting, check_number

KPI_KEYS = ("cls_acc", "reg_iou")


class DTP(LossWeighting):
    name = "dtp"

    def __init__(self, gamma: float = 1.0, momentum: float = 0.9, eps: float = 1e-6):
        self.gamma = check_number("gamma", gamma, low=0.0, low_closed=True)
        self.momentum = check_number("momentum", momentum, low=0.0, high=1.0, low_closed=True)
        self.eps = check_number("eps", eps, low=0.0, high=0.5)
        self._kpi_average: Tensor | None = None  # κ̄ for (cls, reg)
        self._last: dict[str, Tensor | float] = {}

    def __call__(self, cls_loss: Tensor, reg_loss: Tensor, *, kpis: dict | None = None) -> tuple[Tensor, Tensor]:
        missing = [key for key in KPI_KEYS if not kpis or key not in kpis]
        if missing:
            raise ConfigError(
                "weighting.method", f"'dtp' needs the KPIs {', '.join(KPI_KEYS)} of the weighted head, "
                f"but the detector did not report {', '.join(missing)}.",
                "Weight a head whose detector reports them, or choose another method.")
        kpi = torch.stack([torch.as_tensor(kpis[key], device=cls_loss.device) for key in KPI_KEYS])
        kpi = kpi.detach().to(torch.promote_types(cls_loss.dtype, torch.float32))
        if self._kpi_average is None:
            self._kpi_average = kpi
        else:
            average = self._kpi_average.to(kpi.device, kpi.dtype)
            self._kpi_average = self.momentum * average + (1.0 - self.momentum) * kpi
        kappa = self._kpi_average.clamp(self.eps, 1.0 - self.eps)
        weights = -(1.0 - kappa).pow(self.gamma) * kappa.log()
        cls_weight, reg_weight = weights[0].to(cls_loss.dtype), weights[1].to(reg_loss.dtype)
        self._last = {"cls": cls_weight, "reg": reg_weight}
        return cls_weight * cls_loss, reg_weight * reg_loss

    def log_values(self) -> dict[str, Tensor | float]:
        return dict(self._last)

    def state_dict(self) -> dict:
        return {"kpi_average": None if self._kpi_average is None else self._kpi_average.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        average = state["kpi_average"]
        self._kpi_average = None if average is None else average.clone()
        self._last = {}
