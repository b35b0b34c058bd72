"""DWA: Dynamic Weight Average.

Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019
(MTAN). PAPER.md section 6.

    w_k(t) = K · exp(r_k(t−1) / T) / Σ_j exp(r_j(t−1) / T),   r_k(t−1) = L̄_k(t−1) / L̄_k(t−2)

with K = 2 tasks (classification, regression of one head), L̄_k(t) the average raw
loss of task k over period t, and w_k = 1 during the first two periods.

Hyper-parameters (config ``weighting``):
    temperature: T > 0 (default 2.0)
    period:      "epoch" (default; a period ends at ``on_epoch_end``) or an integer
                 number of calls.

The exponent is computed literally, not as a max-subtracted softmax: the paper's
Table 4 reports DWA runs whose exponent overflowed, and that failure is reproduced.
It is evaluated in the loss dtype promoted to at least float32 (exp overflows
float32 once r/T exceeds about 88.7). A non-finite weight raises
:class:`WeightOverflowError`; the check runs once per period (one host sync per
period, none per call).
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainers.errors import ConfigError
from trainers.weighting.base import LossWeighting, WeightOverflowError, check_number, field

NUM_TASKS = 2


class DWA(LossWeighting):
    name = "dwa"

    def __init__(self, temperature: float = 2.0, period: str | int = "epoch"):
        self.temperature = check_number("temperature", temperature, low=0.0)
        if period != "epoch" and (isinstance(period, bool) or not isinstance(period, int) or period <= 0):
            raise ConfigError(field("period"), f"must be 'epoch' or an integer >= 1 of calls (got {period!r}).")
        self.period = period

        self._calls = 0
        self._period_calls = 0  # calls in the current period
        self._sums = torch.zeros(NUM_TASKS, dtype=torch.float64)  # raw losses summed over the period
        self._averages: list[Tensor] = []  # L̄(t−2), L̄(t−1): the last two periods' averages
        self._weights: Tensor | None = None  # None: still in the first two periods, w = 1
        self._compute_dtype = torch.float32  # the last loss dtype, promoted to at least float32
        self._last: dict[str, Tensor | float] = {}
        self._updated = False

    def __call__(self, cls_loss: Tensor, reg_loss: Tensor, *, kpis: dict | None = None) -> tuple[Tensor, Tensor]:
        if self._sums.device != cls_loss.device:
            self._sums = self._sums.to(cls_loss.device)
            self._averages = [a.to(cls_loss.device) for a in self._averages]
            if self._weights is not None:
                self._weights = self._weights.to(cls_loss.device)
        if self._weights is None:
            cls_weight, reg_weight = 1.0, 1.0
        else:
            cls_weight, reg_weight = self._weights[0].to(cls_loss.dtype), self._weights[1].to(reg_loss.dtype)
        self._last = {"cls": cls_weight, "reg": reg_weight}
        self._compute_dtype = torch.promote_types(cls_loss.dtype, torch.float32)

        self._sums += torch.stack([cls_loss.detach(), reg_loss.detach()]).to(torch.float64)
        self._period_calls += 1
        self._calls += 1
        self._updated = self.period != "epoch" and self._calls % self.period == 0
        if self._updated:
            self._end_period()
        return cls_weight * cls_loss, reg_weight * reg_loss

    def on_epoch_end(self, epoch: int) -> None:
        if self.period == "epoch" and self._period_calls > 0:
            self._end_period()

    def _end_period(self) -> None:
        self._averages = (self._averages + [self._sums / self._period_calls])[-2:]
        self._sums = torch.zeros_like(self._sums)
        self._period_calls = 0
        if len(self._averages) < 2:
            return
        previous, last = (a.to(self._compute_dtype) for a in self._averages)
        ratios = last / previous
        exponentials = torch.exp(ratios / self.temperature)
        weights = NUM_TASKS * exponentials / exponentials.sum()
        if not bool(torch.isfinite(weights).all()):  # the one sync per period
            raise WeightOverflowError(
                f"DWA weights are not finite: loss ratios r = {ratios.tolist()} with temperature "
                f"{self.temperature:g} give exp(r/T) = {exponentials.tolist()} ({self._compute_dtype}).")
        self._weights = weights

    def log_values(self) -> dict[str, Tensor | float]:
        return dict(self._last)

    def updated(self) -> bool:
        return self._updated

    def state_dict(self) -> dict:
        return {"calls": self._calls, "period_calls": self._period_calls,
                "sums": self._sums.cpu().clone(),
                "averages": [a.cpu().clone() for a in self._averages],
                "weights": None if self._weights is None else self._weights.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self._calls = int(state["calls"])
        self._period_calls = int(state["period_calls"])
        self._sums = state["sums"].to(torch.float64).clone()
        self._averages = [a.to(torch.float64).clone() for a in state["averages"]]
        weights = state["weights"]
        self._weights = None if weights is None else weights.clone()
        self._last = {}
        self._updated = False
