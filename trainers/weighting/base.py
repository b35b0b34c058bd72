"""The interface every loss-weighting method implements, and the shared value checks.

A weighting method acts on the (classification, regression) loss pair of one
detection head. The engine calls it once per training iteration with the two
unweighted scalar losses and back-propagates the two weighted losses it returns, so
``__call__`` runs in the hot loop: it must not synchronise with the device
(no ``Tensor.item``, ``float(tensor)``, ``bool(tensor)``, ``Tensor.cpu``). Whatever a method
needs to decide on the host (whether an update happens) depends on call counts only.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor

from trainers.errors import ConfigError, choice_error


class WeightOverflowError(ArithmeticError):
    """A weighting method produced a non-finite weight (DWA's exponent overflowed).

    The engine catches it and records the run's status as ``overflow``, the word the
    paper's Table 4 uses for DWA.
    """


class LossWeighting(abc.ABC):
    """Turns a head's unweighted (cls, reg) losses into the weighted pair to train on."""

    name: str = "base"

    @abc.abstractmethod
    def __call__(self, cls_loss: Tensor, reg_loss: Tensor, *, kpis: dict | None = None) -> tuple[Tensor, Tensor]:
        """Scalar tensors in, weighted scalar tensors out (autograd graph kept).

        ``kpis`` (used by DTP only) holds detached scalar tensors the detector computes
        for the weighted head: ``cls_acc`` and ``reg_iou``, both in (0, 1).
        """

    def parameters(self) -> list[torch.nn.Parameter]:
        """Learnable weights; the engine adds them to the optimizer."""
        return []

    def log_values(self) -> dict[str, Tensor | float]:
        """Values to log for the last call, without a host sync.

        Always the multipliers ``cls`` and ``reg`` that the last call applied (empty
        before the first call); methods add their own keys (ALWA: ``alpha`` and, right
        after an update, the ``window/...`` statistics).
        """
        return {}

    def updated(self) -> bool:
        """Whether the last call performed an update of the weights (known on the host)."""
        return False

    def to(self, device: torch.device | str) -> "LossWeighting":
        """Move learnable weights to ``device`` (optional: every method also follows the
        losses' device by itself at its first call)."""
        return self

    def on_epoch_end(self, epoch: int) -> None:
        """Called by the engine after each epoch (DWA with per-epoch periods uses it)."""

    def state_dict(self) -> dict:
        """Everything needed for a resumed run to continue the identical weight sequence.

        Only plain values and CPU tensors, so that ``torch.load(weights_only=True)``
        can read it back.
        """
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


# ---- value checks shared by the constructors (they name the config field at fault) ----

def field(key: str) -> str:
    """The dotted config field of a weighting hyper-parameter, for error messages."""
    return f"weighting.{key}"


def check_choice(key: str, value, allowed) -> None:
    # Exact types: True == 1 and 1.0 == 1 in Python, but neither is variant 1.
    if not any(type(value) is type(a) and value == a for a in allowed):
        raise choice_error(field(key), value, allowed)


def check_number(key: str, value, *, low: float, high: float = math.inf,
                 low_closed: bool = False, high_closed: bool = False) -> float:
    """A finite real number in the interval from ``low`` to ``high``; returned as float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value >= low if low_closed else value > low) and (value <= high if high_closed else value < high)
    if not ok:
        if math.isinf(high):
            bounds = f"{'>=' if low_closed else '>'} {low:g}"
        else:
            bounds = f"in {'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
        raise ConfigError(field(key), f"must be a finite number {bounds} (got {value!r}).")
    return float(value)


def check_positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(field(key), f"must be an integer >= 1 (got {value!r}).")
    return value


def check_bool(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(field(key), f"must be true or false (got {value!r}).")
    return value
