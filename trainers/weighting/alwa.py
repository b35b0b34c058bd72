"""ALWA: Adaptive Loss Weight Adjustment.

Yu, Shen, Hu, Yin, "Revisiting the loss weights in anchor-based detection"
(Algorithm 1 and Eq. 2; released code: github ywx-hub/ALWA, an mmdetection 2.7 fork).
PAPER.md sections 2 and 3 give the algorithm and the released code's conventions.

    L = α·λ0·L̂cls + λ0·L̂reg

Every call records the weighted losses; every ``interval`` calls the spread of the
records decides α: ALWA_1 compares mean + std, ALWA_2 std alone, and if the
classification score is the larger one, α = score_reg / score_cls. The update
*replaces* α (it does not multiply it), so α stays in (0, 1] and can swing back.
The new α applies from the next call.

Hyper-parameters (config ``weighting``):
    variant:      1 (mean + std) or 2 (std)                                  default 1
    lambda0:      λ0 > 0, the weight shared by both terms                    default 1.0
    interval:     C >= 1, the number of calls between updates                default 100
    convention:   when the updates happen and which std (default "official"):
        "official"  the released code: the k-th call (k = 1, 2, ...) updates when
                    k % C == 0, over the C records since the last update, with the
                    sample std (ddof = 1). The first update follows the C-th call.
        "paper"     Algorithm 1 as printed: with i = k - 1, update when i % C == 0,
                    over the records since the last update (the first update uses
                    the single record of i = 0), with the population std (ddof = 0).
    records:      "weighted" (default, the released behaviour: α·λ0·L̂cls and
                  λ0·L̂reg are recorded) or "raw" (the unweighted losses; beyond the
                  paper, an ablation of ours).
    sync_records: false (default, as released: statistics per GPU) or true: under an
                  initialised torch.distributed, the window's records are averaged
                  across ranks (element-wise all-reduce) before the statistics; beyond
                  the released code.

A window of a single record (interval 1, or the paper convention's first window)
has std 0 in both conventions: the sample std of one value is undefined (NaN), and a
NaN score would silently freeze α.

No host synchronisation: the records live in a preallocated device tensor, α is a
device tensor updated with ``torch.where``, and whether a call updates depends only
on the call count. Reading :attr:`alpha` is the only sync (a read, when asked).
The records are kept in the loss dtype promoted to at least float32, the statistics
are computed in float64.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from trainers.weighting.base import LossWeighting, check_bool, check_choice, check_number, check_positive_int

VARIANTS = (1, 2)
CONVENTIONS = ("official", "paper")
RECORD_KINDS = ("weighted", "raw")


class ALWA(LossWeighting):
    name = "alwa"

    def __init__(self, variant: int = 1, lambda0: float = 1.0, interval: int = 100,
                 convention: str = "official", records: str = "weighted", sync_records: bool = False):
        check_choice("variant", variant, VARIANTS)
        check_choice("convention", convention, CONVENTIONS)
        check_choice("records", records, RECORD_KINDS)
        self.variant = variant
        self.lambda0 = check_number("lambda0", lambda0, low=0.0)
        self.interval = check_positive_int("interval", interval)
        self.convention = convention
        self.records = records
        self.sync_records = check_bool("sync_records", sync_records)
        self._ddof = 1 if convention == "official" else 0

        self._calls = 0  # k: calls so far, counted across epochs (never reset)
        self._count = 0  # records since the last update
        # Row 0: classification records, row 1: regression records. Moved to the
        # loss's device and dtype at the first call.
        self._window = torch.zeros(2, self.interval, dtype=torch.float32)
        self._alpha = torch.ones((), dtype=torch.float64)
        self._cls_factor: Tensor | None = None  # α·λ0 in the loss dtype, recomputed when α changes
        self._last: dict[str, Tensor | float] = {}
        self._updated = False

    @property
    def alpha(self) -> float:
        """The α the next call will use (reading it synchronises with the device)."""
        return float(self._alpha)

    def __call__(self, cls_loss: Tensor, reg_loss: Tensor, *, kpis: dict | None = None) -> tuple[Tensor, Tensor]:
        self._follow(cls_loss)
        if self._cls_factor is None or self._cls_factor.dtype != cls_loss.dtype:
            self._cls_factor = self._alpha.to(cls_loss.dtype) * self.lambda0
        cls_weighted = self._cls_factor * cls_loss
        reg_weighted = self.lambda0 * reg_loss

        recorded = (cls_weighted, reg_weighted) if self.records == "weighted" else (cls_loss, reg_loss)
        self._window[0, self._count] = recorded[0].detach()
        self._window[1, self._count] = recorded[1].detach()
        self._count += 1
        self._calls += 1

        self._last = {"cls": self._cls_factor, "reg": self.lambda0, "alpha": self._alpha}
        self._updated = self._update_due(self._calls)
        if self._updated:
            self._last.update(self._update())
        return cls_weighted, reg_weighted

    def _update_due(self, k: int) -> bool:
        i = k if self.convention == "official" else k - 1
        return i % self.interval == 0

    def _update(self) -> dict[str, Tensor]:
        """Recompute α from the window, clear it; returns the window statistics."""
        n = self._count
        window = self._window[:, :n].to(torch.float64, copy=True)
        if self.sync_records and dist.is_available() and dist.is_initialized():
            # Every rank has made the same number of calls, so the windows line up.
            dist.all_reduce(window)
            window /= dist.get_world_size()
        mean = window.mean(dim=1)
        std = window.std(dim=1, correction=self._ddof) if n > 1 else torch.zeros_like(mean)
        score = mean + std if self.variant == 1 else std
        cls_score, reg_score = score[0], score[1]
        self._alpha = torch.where(cls_score > reg_score, reg_score / cls_score, self._alpha)
        self._cls_factor = None
        self._count = 0
        return {"window/cls_mean": mean[0], "window/cls_std": std[0],
                "window/reg_mean": mean[1], "window/reg_std": std[1]}

    def _follow(self, loss: Tensor) -> None:
        """Keep the window and α on the loss's device (a one-time move, or after loading)."""
        dtype = torch.promote_types(loss.dtype, torch.float32)
        if self._window.device != loss.device or self._window.dtype != dtype:
            self._window = self._window.to(loss.device, dtype)
        if self._alpha.device != loss.device:
            self._alpha = self._alpha.to(loss.device)
            self._cls_factor = None

    def log_values(self) -> dict[str, Tensor | float]:
        """``cls`` = α·λ0 and ``alpha`` = α as applied by the last call, ``reg`` = λ0;
        after an updating call also ``window/{cls,reg}_{mean,std}`` (std with the
        convention's ddof)."""
        return dict(self._last)

    def updated(self) -> bool:
        return self._updated

    def _config(self) -> dict:
        # sync_records is left out: it may change between runs without changing the
        # per-rank sequence's meaning.
        return {"variant": self.variant, "lambda0": self.lambda0, "interval": self.interval,
                "convention": self.convention, "records": self.records}

    def state_dict(self) -> dict:
        return {"config": self._config(), "calls": self._calls,
                "alpha": self._alpha.detach().cpu().clone(),
                "window": self._window[:, :self._count].cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        saved = dict(state["config"])
        if saved != self._config():
            raise ValueError(f"ALWA state saved with {saved} cannot continue in an ALWA with {self._config()}.")
        window = state["window"]
        self._count = int(window.shape[1])
        self._window = torch.zeros(2, self.interval, dtype=window.dtype)
        self._window[:, :self._count] = window
        self._alpha = state["alpha"].to(torch.float64).clone()
        self._calls = int(state["calls"])
        self._cls_factor = None
        self._last = {}
        self._updated = False
