"""DWA: Dynamic Weight Average.

Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019
(MTAN). PAPER.md section 6.

    w_k(t) = K · exp(r_k(t−1) / T) / Σ_j exp(r_j(t−1) / T),   r_k(t−1) = L̄_k(t−1) / L̄_k(t−2)

with K = 2 tasks (classification, regression of one head), L̄_k(t) the average raw
loss of task k over period t, and w_k = 1 during the first two periods.

Hyper-parameters (:class:`DWASettings`): ``temperature`` T and ``period``, either
"epoch" (MTAN's choice: a period ends at ``on_epoch_end``) or an integer number of
iterations (calls). With two tasks the weights are w_cls = 1 + tanh((r_cls − r_reg)/(2T)),
so they stay in (0, 2), and with per-epoch averages the ratios of consecutive
epochs are close to each other: over a 12-epoch run the weights stay at about
1 ± 0.08 (issue 15; ±0.08 at T = 2 means |r_cls − r_reg| < 0.32), and the exponent
cannot overflow unless an epoch's average loss grows by a factor of about 88.7·T
(177 at T = 2) over the previous one. The "overflow" cells of the paper's Table 4
therefore need short iteration periods (noisy ratios) or a small T to reproduce.

The exponent is computed literally, not as a max-subtracted softmax: the paper's
Table 4 reports DWA runs whose exponent overflowed, and that failure is reproduced.
It is evaluated in the loss dtype promoted to at least float32 (exp overflows
float32 once r/T exceeds about 88.7). A non-finite weight raises
:class:`WeightOverflowError`; the check runs once per period (one host sync per
period, none per call).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from trainers.weighting.base import LossWeighting, WeightingSettings, WeightOverflowError

NUM_TASKS = 2


class DWASettings(WeightingSettings):
    method: Literal["dwa"] = "dwa"
    temperature: float = Field(2.0, gt=0, description="T, the softmax temperature (MTAN uses 2).")
    period: Literal["epoch"] | Annotated[int, Field(ge=1)] = Field(
        "epoch", description="The averaging period of the loss ratios: 'epoch' (a period ends with each "
        "epoch, as in MTAN) or an integer number of iterations.")


class DWA(LossWeighting):
    name = "dwa"
    Settings = DWASettings

    def __init__(self, settings: DWASettings | None = None, **kwargs):
        super().__init__(settings, **kwargs)
        self._calls = 0
        self._period_calls = 0  # calls in the current period
        self._periods = 0  # periods completed
        self._compute_dtype = torch.float32  # the last loss dtype, promoted to at least float32
        self.register_buffer("sums", torch.zeros(NUM_TASKS, dtype=torch.float64))  # raw losses, this period
        # Rows: L̄(t−2), L̄(t−1), the last two periods' averages.
        self.register_buffer("averages", torch.zeros(2, NUM_TASKS, dtype=torch.float64))
        self.register_buffer("weights", torch.ones(NUM_TASKS, dtype=torch.float64))  # used from period 3
        self._last: dict[str, Tensor | float] = {}

    def forward(self, cls_loss: Tensor, reg_loss: Tensor, kpis: dict | None = None) -> tuple[Tensor, Tensor]:
        self._follow(cls_loss)
        if self._periods < 2:
            cls_weight, reg_weight = 1.0, 1.0
        else:
            cls_weight, reg_weight = self.weights[0].to(cls_loss.dtype), self.weights[1].to(reg_loss.dtype)
        self._last = {"cls": cls_weight, "reg": reg_weight}
        self._compute_dtype = torch.promote_types(cls_loss.dtype, torch.float32)

        self.sums += torch.stack([cls_loss.detach(), reg_loss.detach()]).to(torch.float64)
        self._period_calls += 1
        self._calls += 1
        if self.settings.period != "epoch" and self._calls % self.settings.period == 0:
            self._end_period()
        return cls_weight * cls_loss, reg_weight * reg_loss

    def on_epoch_end(self, epoch: int) -> None:
        if self.settings.period == "epoch" and self._period_calls > 0:
            self._end_period()

    def _end_period(self) -> None:
        self.averages = torch.stack([self.averages[1], self.sums / self._period_calls])
        self.sums = torch.zeros_like(self.sums)
        self._period_calls = 0
        self._periods += 1
        if self._periods < 2:
            return
        previous, last = self.averages.to(self._compute_dtype)
        ratios = last / previous
        exponentials = torch.exp(ratios / self.settings.temperature)
        weights = NUM_TASKS * exponentials / exponentials.sum()
        if not bool(torch.isfinite(weights).all()):  # the one sync per period
            raise WeightOverflowError(
                f"DWA weights are not finite: loss ratios r = {ratios.tolist()} with temperature "
                f"{self.settings.temperature:g} give exp(r/T) = {exponentials.tolist()} ({self._compute_dtype}).")
        self.weights = weights.to(torch.float64)

    def log_values(self) -> dict[str, Tensor | float]:
        return dict(self._last)

    def get_extra_state(self) -> dict:
        return {"calls": self._calls, "period_calls": self._period_calls, "periods": self._periods,
                "compute_dtype": str(self._compute_dtype).removeprefix("torch.")}

    def set_extra_state(self, state: dict) -> None:
        self._calls = int(state["calls"])
        self._period_calls = int(state["period_calls"])
        self._periods = int(state["periods"])
        self._compute_dtype = getattr(torch, state["compute_dtype"])
        self._last = {}
