"""The interface every loss-weighting method implements, and the settings they share.

A weighting method acts on the (classification, regression) loss pair of one
detection head. It is a ``torch.nn.Module``: the engine calls it once per training
iteration with the two unweighted scalar losses and back-propagates the two weighted
losses it returns, so ``forward`` runs in the hot loop and must not synchronise with
the device (no ``Tensor.item``, ``float(tensor)``, ``bool(tensor)``, ``Tensor.cpu``).
Whatever a method decides on the host (whether an update happens) depends on call
counts only.

State, the nn.Module way: learnable weights are ``nn.Parameter``s, device state is in
registered buffers, host-side counters go through ``get_extra_state`` /
``set_extra_state`` (plain Python values). So ``state_dict()`` / ``load_state_dict()``
hold everything a resumed run needs to continue the identical weight sequence,
``torch.load(weights_only=True)`` reads it back, and ``.to(device)`` moves it all.
Floating buffers are float64; ``.to(dtype)`` would cast them, so move only devices.

Each method's hyper-parameters are a frozen pydantic model (its ``Settings``),
subclassing :class:`WeightingSettings`: the defaults, ranges and documentation are
written there once. A method is built as ``ALWA(settings)`` or ``ALWA(interval=20)``
(keywords validated through the settings model).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn


class WeightOverflowError(ArithmeticError):
    """A weighting method produced a non-finite weight (DWA's exponent overflowed).

    The engine catches it and records the run's status as ``overflow``, the word the
    paper's Table 4 uses for DWA.
    """


class WeightingSettings(BaseModel):
    """The settings every method shares (the config section ``weighting``)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    head: Literal["auto", "rpn", "roi", "retina"] = Field(
        "auto", description="The head whose (cls, reg) loss pair is weighted. 'auto': the detector's "
        "anchor head, as in the released ALWA code (the RPN of two-stage detectors, RetinaNet's head).")


class LossWeighting(nn.Module):
    """Turns a head's unweighted (cls, reg) losses into the weighted pair to train on."""

    name: ClassVar[str]
    Settings: ClassVar[type[WeightingSettings]]

    def __init__(self, settings: WeightingSettings | None = None, **kwargs):
        super().__init__()
        if settings is None:
            settings = self.Settings(**kwargs)
        elif kwargs:
            raise TypeError(f"{type(self).__name__}: pass either a settings object or keywords, not both.")
        elif type(settings) is not self.Settings:
            raise TypeError(f"{type(self).__name__} needs {self.Settings.__name__}, got {type(settings).__name__}.")
        self.settings = settings
        # Host-side state changed per call lives in a plain namespace: nn.Module's
        # __setattr__ costs microseconds per assignment in the hot loop.
        self._host = SimpleNamespace(last={})
        self._state_device: torch.device | None = None  # where buffers and parameters live

    def forward(self, cls_loss: Tensor, reg_loss: Tensor, kpis: dict | None = None) -> tuple[Tensor, Tensor]:
        """Scalar tensors in, weighted scalar tensors out (autograd graph kept).

        ``kpis`` (used by DTP only) holds detached scalar tensors the detector computes
        for the weighted head: ``cls_acc`` and ``reg_iou``, both in (0, 1).
        """
        raise NotImplementedError

    def log_values(self) -> dict[str, Tensor | float]:
        """Values to log for the last call, without a host sync.

        Always the multipliers ``cls`` and ``reg`` that the last call applied (empty
        before the first call); methods add their own keys (ALWA: ``alpha`` and, right
        after an update, the ``window/...`` statistics).
        """
        return dict(self._host.last)

    def on_epoch_end(self, epoch: int) -> None:
        """Called by the engine after each epoch (DWA with per-epoch periods uses it)."""

    def _follow(self, loss: Tensor) -> None:
        """Move the state to the loss's device if it lives elsewhere (a one-time move
        when the caller did not ``.to(device)``; a device check is host metadata)."""
        if self._state_device is None:
            state = next(itertools.chain(self.buffers(), self.parameters()), None)
            if state is None:
                return
            self._state_device = state.device
        if self._state_device != loss.device:
            self.to(loss.device)

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), ...: the state's device is looked up again at the next call.
        self._state_device = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.settings.model_dump().items())
