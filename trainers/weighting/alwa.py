"""ALWA: Adaptive Loss Weight Adjustment.

Yu, Shen, Hu, Yin, "Revisiting the loss weights in anchor-based detection"
(Algorithm 1 and Eq. 2; released code: github ywx-hub/ALWA, an mmdetection 2.7 fork,
``mmdet/models/dense_heads/anchor_head.py``, ``AnchorHead.loss``). PAPER.md sections
2 and 3 give the algorithm and the released code's conventions.

    L = w_cls·L̂cls + λ0·L̂reg,   w_cls = α·λ0 (Eq. 2)

Every call records the weighted losses; every ``interval`` calls the spread of the
records decides α: ALWA_1 compares mean + std, ALWA_2 std alone, and if the
classification score is the larger one, α = score_reg / score_cls. The update
*replaces* α (it does not multiply it), so α stays in (0, 1] and can swing back.
The new weight applies from the next call.

Hyper-parameters: :class:`ALWASettings` (each field's description). Two of them
choose between the paper and the released code:

``convention``, when the updates happen and which std:
    "official"  the released code (``AnchorHead.loss``): the k-th call (k = 1, 2, ...)
                updates when k % C == 0, over the C records since the last update,
                with the sample std (``np.std(..., ddof=1)``).
    "paper"     Algorithm 1 as printed: with i = k − 1, update when i % C == 0, over
                the records since the last update (the first update uses the single
                record of i = 0), with the population std (ddof = 0).

``lambda0_mode``, what becomes of λ0 in the classification weight:
    "paper"     Eq. 2: w_cls = α·λ0 at every call (λ0 = 1: w_cls = α).
    "released"  ``AnchorHead.loss``: the head's ``cls_weight`` (the constructor
                argument, λ0) multiplies the per-level cls losses until an update
                finds CLS > BBOX; then ``cls_weight = 1 − (CLS − BBOX)/CLS``, i.e.
                w_cls = α itself, λ0 dropped. The regression weight (``bbox_weight``)
                stays λ0. The released configs (``configs/alwa/voc/*``,
                ``configs/alwa/coco/*``) leave both at their default 1.0, where the
                two modes coincide; they differ only in the λ0 ablation (Table 6).
                The records are the weighted losses w_cls·L̂cls and λ0·L̂reg in
                both modes, so the ratio α of the next update sees w_cls.
                In both modes the buffer ``alpha`` is the last ratio
                score_reg / score_cls that replaced α (1 before any) and the
                buffer ``cls_weight`` is w_cls.

A window of a single record (interval 1, or the paper convention's first window)
has std 0 in both conventions: the sample std of one value is undefined (NaN), and a
NaN score would silently freeze α.

No host synchronisation: the records live in a preallocated float64 buffer of
2 × ``interval`` values, α and w_cls are float64 buffers updated with
``torch.where``, and whether a call updates depends only on the call count (host
state, saved through ``get_extra_state``). ``float(alwa.alpha)`` is a sync (a read,
when asked). Statistics are computed in float64.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.distributed as dist
from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError
from torch import Tensor

from trainers.weighting.base import LossWeighting, WeightingSettings

MAX_INTERVAL = 1_000_000  # the window holds 2 × interval float64 values (16 MB at the bound)


def _exact_int(value):
    # Literal[1, 2] alone accepts True and 1.0 (equal, hashing alike) even in strict mode.
    if type(value) is not int:
        raise PydanticCustomError("int_type", "Input should be the integer 1 or 2")
    return value


class ALWASettings(WeightingSettings):
    method: Literal["alwa"] = "alwa"
    variant: Annotated[Literal[1, 2], BeforeValidator(_exact_int)] = Field(
        1, description="1: ALWA_1 compares mean + std of the records; 2: ALWA_2 compares the std alone.")
    lambda0: float = Field(1.0, gt=0, description="λ0, the initial weight shared by both terms (Eq. 2); "
                           "the paper recommends λ0 <= 1.")
    interval: int = Field(100, ge=1, le=MAX_INTERVAL, description="C, the number of calls (iterations) "
                          "between updates; the paper recommends C in [100, 500].")
    convention: Literal["official", "paper"] = Field(
        "official", description="'official': update after every C-th call with the sample std, as released "
        "(anchor_head.py, AnchorHead.loss); 'paper': Algorithm 1 as printed (update at i % C == 0 from "
        "i = 0, population std).")
    records: Literal["weighted", "raw"] = Field(
        "weighted", description="'weighted': record w_cls·L̂cls and λ0·L̂reg, as released; 'raw': record "
        "the unweighted losses (an ablation beyond the paper).")
    sync_records: bool = Field(
        False, description="false: statistics per GPU, as released; true: under torch.distributed, "
        "average the window's records across ranks before the statistics (beyond the released code).")
    lambda0_mode: Literal["paper", "released"] = Field(
        "paper", description="'paper': w_cls = α·λ0 (Eq. 2); 'released': w_cls = λ0 until the first "
        "update that lowers it, then α itself (anchor_head.py, AnchorHead.loss sets cls_weight = "
        "1 - (CLS - BBOX)/CLS). Identical at λ0 = 1.")


# Settings a saved state must share to continue: sync_records may change between runs
# without changing the meaning of the per-rank sequence, and head is the engine's.
RESUME_KEYS = ("variant", "lambda0", "interval", "convention", "records", "lambda0_mode")


class ALWA(LossWeighting):
    name = "alwa"
    Settings = ALWASettings

    def __init__(self, settings: ALWASettings | None = None, **kwargs):
        super().__init__(settings, **kwargs)
        s = self.settings
        self._ddof = 1 if s.convention == "official" else 0
        self._host.calls = 0  # k: calls so far, counted across epochs (never reset)
        self._host.count = 0  # records since the last update
        self._host.cls_factor = None  # cls_weight in the loss dtype and device
        # Row 0: classification records, row 1: regression records.
        self.register_buffer("window", torch.zeros(2, s.interval, dtype=torch.float64))
        self.register_buffer("alpha", torch.ones((), dtype=torch.float64))
        self.register_buffer("cls_weight", torch.full((), s.lambda0, dtype=torch.float64))

    def forward(self, cls_loss: Tensor, reg_loss: Tensor, kpis: dict | None = None) -> tuple[Tensor, Tensor]:
        self._follow(cls_loss)
        host = self._host
        factor = host.cls_factor
        if factor is None or factor.dtype != cls_loss.dtype or factor.device != cls_loss.device:
            factor = host.cls_factor = self.cls_weight.to(cls_loss.device, cls_loss.dtype)
        lambda0 = self.settings.lambda0
        cls_weighted = factor * cls_loss
        reg_weighted = lambda0 * reg_loss

        recorded = (cls_weighted, reg_weighted) if self.settings.records == "weighted" else (cls_loss, reg_loss)
        window = self.window
        window[0, host.count] = recorded[0].detach()
        window[1, host.count] = recorded[1].detach()
        host.count += 1
        host.calls += 1

        host.last = {"cls": factor, "reg": lambda0, "alpha": self.alpha}
        if self._update_due(host.calls):
            host.last.update(self._update())
        return cls_weighted, reg_weighted

    def _update_due(self, k: int) -> bool:
        i = k if self.settings.convention == "official" else k - 1
        return i % self.settings.interval == 0

    def _update(self) -> dict[str, Tensor]:
        """Recompute α (and w_cls) from the window, clear it; returns the window statistics."""
        n = self._host.count
        window = self.window[:, :n].clone()
        if self.settings.sync_records and dist.is_available() and dist.is_initialized():
            # Every rank has made the same number of calls, so the windows line up.
            dist.all_reduce(window)
            window /= dist.get_world_size()
        mean = window.mean(dim=1)
        std = window.std(dim=1, correction=self._ddof) if n > 1 else torch.zeros_like(mean)
        score = mean + std if self.settings.variant == 1 else std
        cls_score, reg_score = score[0], score[1]
        lower = cls_score > reg_score
        ratio = reg_score / cls_score
        # Out of place: a logged α of an earlier call keeps its value.
        self.alpha = torch.where(lower, ratio, self.alpha)
        if self.settings.lambda0_mode == "paper":
            self.cls_weight = self.alpha * self.settings.lambda0
        else:
            self.cls_weight = torch.where(lower, ratio, self.cls_weight)
        self._host.cls_factor = None
        self._host.count = 0
        return {"window/cls_mean": mean[0], "window/cls_std": std[0],
                "window/reg_mean": mean[1], "window/reg_std": std[1]}

    def log_values(self) -> dict[str, Tensor | float]:
        """``cls`` = w_cls and ``alpha`` = α as applied by the last call, ``reg`` = λ0;
        after an updating call also ``window/{cls,reg}_{mean,std}`` (std with the
        convention's ddof)."""
        return super().log_values()

    def _resume_settings(self) -> dict:
        return {key: getattr(self.settings, key) for key in RESUME_KEYS}

    def get_extra_state(self) -> dict:
        return {"settings": self._resume_settings(), "calls": self._host.calls, "count": self._host.count}

    def set_extra_state(self, state: dict) -> None:
        self._host.calls = int(state["calls"])
        self._host.count = int(state["count"])
        self._host.cls_factor = None
        self._host.last = {}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Refuse before any buffer is overwritten: an α computed with other settings
        # cannot continue this run's sequence.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None and dict(extra["settings"]) != self._resume_settings():
            raise ValueError(f"ALWA state saved with {dict(extra['settings'])} cannot continue in an ALWA "
                             f"with {self._resume_settings()}.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
