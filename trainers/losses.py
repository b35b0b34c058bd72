"""Box-regression losses for the detectors' heads, one value per box.

Two families, as in mmdetection 2.x (the code the paper's results come from):

- the L1 family (``l1``, ``smooth_l1``) compares the *encoded* deltas (dx, dy, dw, dh)
  that the head predicts with the deltas that encode the ground truth box, and sums
  the four coordinates: one number per box;
- the IoU family (``giou``, ``diou``, ``ciou``) first *decodes* the predicted deltas
  with the head's box coder against the anchors (or proposals) and compares the
  decoded box with the ground truth box: again one number per box
  (mmdetection: ``reg_decoded_bbox=True``).

Every function here returns the per-box losses, shape ``(N,)``; summing over the
positives and dividing by the head's normaliser is the head's job
(trainers/detectors), because that normaliser differs between heads.

Why ``loss_weight``: one L1 box loss sums four coordinates of deltas that are
normalised by the coder's weights, an IoU loss is a single number in [0, 2], so the
two are on different scales. mmdetection's IoU configs compensate with a
``loss_weight`` (10.0 in the GIoU configs, 12.0 in ``faster_rcnn_r50_fpn_ciou``);
the ALWA release's commented-out CIoU setting uses 1.0. We expose the same knob per
head (default 1.0) and apply it inside :class:`BoxRegressionLoss`, so the head
losses the detectors return already include it. The ALWA/fixed loss weights of the
weighting methods are separate multipliers applied by the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from trainers.errors import ConfigError, choice_error

# torchvision.ops uses 1e-7 in its IoU losses; mmdetection 2.x uses 1e-6. The
# difference only matters for degenerate (zero-area) boxes.
IOU_EPS = 1e-7


def l1_loss(pred_deltas: Tensor, target_deltas: Tensor) -> Tensor:
    """|pred - target| summed over the four deltas of each box."""
    return (pred_deltas - target_deltas).abs().sum(dim=-1)


def smooth_l1_loss(pred_deltas: Tensor, target_deltas: Tensor, beta: float = 1.0) -> Tensor:
    """Smooth L1 (Huber / beta) summed over the four deltas of each box.

    0.5·x²/beta where |x| < beta, |x| − 0.5·beta elsewhere; beta = 0 is plain L1.
    torchvision's RPN and ROI heads hard-code beta = 1/9; mmdetection's SmoothL1Loss
    defaults to beta = 1.0, which is what the paper's SmoothL1 rows use.
    """
    return F.smooth_l1_loss(pred_deltas, target_deltas, beta=beta, reduction="none").sum(dim=-1)


def paired_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = IOU_EPS) -> Tensor:
    """IoU of boxes1[i] with boxes2[i] (x1, y1, x2, y2), shape (N,).

    torchvision.ops.box_iou gives the full N×M matrix; the losses and KPIs need only
    the diagonal.
    """
    top_left = torch.max(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    return intersection / (area1 + area2 - intersection + eps)


# The IoU family is torchvision.ops' (per box, reduction "none"). CIoU's trade-off
# factor α = v / (1 − IoU + v) carries no gradient there (as in the CIoU paper);
# mmdetection 2.7's ciou_loss lets the gradient flow through α (docs/fidelity.md).


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor, eps: float = IOU_EPS) -> Tensor:
    """1 − GIoU (Rezatofighi et al., CVPR 2019): torchvision.ops.generalized_box_iou_loss."""
    return generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none", eps=eps)


def diou_loss(pred_boxes: Tensor, target_boxes: Tensor, eps: float = IOU_EPS) -> Tensor:
    """1 − IoU + ρ²/c² (Zheng et al., AAAI 2020): torchvision.ops.distance_box_iou_loss."""
    return distance_box_iou_loss(pred_boxes, target_boxes, reduction="none", eps=eps)


def ciou_loss(pred_boxes: Tensor, target_boxes: Tensor, eps: float = IOU_EPS) -> Tensor:
    """1 − IoU + ρ²/c² + α·v (Zheng et al., AAAI 2020): torchvision.ops.complete_box_iou_loss."""
    return complete_box_iou_loss(pred_boxes, target_boxes, reduction="none", eps=eps)


# name -> per-box loss. The L1 family takes (pred_deltas, target_deltas[, beta]),
# the IoU family takes (pred_boxes, target_boxes).
REGRESSION_LOSSES: dict[str, Callable[..., Tensor]] = {
    "l1": l1_loss,
    "smooth_l1": smooth_l1_loss,
    "giou": giou_loss,
    "diou": diou_loss,
    "ciou": ciou_loss,
}
DECODED_BOX_LOSSES = frozenset({"giou", "diou", "ciou"})


LOSS_CONFIG_KEYS = ("type", "beta", "loss_weight")


@dataclass(frozen=True)
class BoxRegressionLoss:
    """The configured regression loss of one head: ``{type, beta, loss_weight}``.

    Calling it returns ``loss_weight`` × the per-box loss of the positives, decoding
    the predicted deltas only when the loss type needs boxes. ``beta`` is read by
    ``smooth_l1`` only; other types accept and ignore it, so a sweep can vary ``type``
    over a base config that sets ``beta``.
    """

    type: str = "l1"
    beta: float = 1.0
    loss_weight: float = 1.0

    @property
    def uses_decoded_boxes(self) -> bool:
        return self.type in DECODED_BOX_LOSSES

    @classmethod
    def from_config(cls, config: Optional[dict], where: str) -> "BoxRegressionLoss":
        """Validate one ``model.losses.<head>`` entry; ``where`` names it in errors."""
        if config is None:
            return cls()
        if not isinstance(config, dict):
            raise ConfigError(where, f"expected a mapping like {{type: l1}}, got {config!r}.")
        for key in config:
            if not isinstance(key, str) or key not in LOSS_CONFIG_KEYS:
                raise choice_error(f"{where}.{key}", key, LOSS_CONFIG_KEYS)
        loss_type = config.get("type", "l1")
        if not isinstance(loss_type, str) or loss_type not in REGRESSION_LOSSES:
            raise choice_error(f"{where}.type", loss_type, REGRESSION_LOSSES)
        beta = _non_negative_number(config.get("beta", 1.0), f"{where}.beta")
        loss_weight = _non_negative_number(config.get("loss_weight", 1.0), f"{where}.loss_weight")
        return cls(type=loss_type, beta=beta, loss_weight=loss_weight)

    def __call__(
        self,
        pred_deltas: Tensor,
        reference_boxes: Tensor,
        target_boxes: Tensor,
        box_coder,
        target_deltas: Optional[Tensor] = None,
        pred_boxes: Optional[Tensor] = None,
    ) -> Tensor:
        """Per-box weighted loss for positives.

        ``reference_boxes`` are the anchors (or proposals) the deltas are relative to,
        ``box_coder`` the head's ``det_utils.BoxCoder``. ``target_deltas`` and
        ``pred_boxes`` may be passed when the caller already has them.
        """
        # float32 throughout: under AMP the deltas arrive in fp16, and fp16 box areas
        # overflow (65504 < 300 × 300 px).
        pred_deltas = pred_deltas.float()
        if self.uses_decoded_boxes:
            if pred_boxes is None:
                pred_boxes = box_coder.decode_single(pred_deltas, reference_boxes.float())
            per_box = REGRESSION_LOSSES[self.type](pred_boxes.float(), target_boxes.float())
        else:
            if target_deltas is None:
                target_deltas = box_coder.encode_single(target_boxes.float(), reference_boxes.float())
            per_box = self.delta_loss(pred_deltas, target_deltas.float())
        return self.loss_weight * per_box

    def delta_loss(self, pred_deltas: Tensor, target_deltas: Tensor) -> Tensor:
        """Per-box loss of an L1-family type on encoded deltas (subclasses override)."""
        if self.type == "smooth_l1":
            return smooth_l1_loss(pred_deltas, target_deltas, beta=self.beta)
        return l1_loss(pred_deltas, target_deltas)


def _non_negative_number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(where, f"expected a finite number >= 0, got {value!r}.")
    return float(value)


# ---------------------------------------------------------------- Table 3 detectors
# Balanced L1 (Libra R-CNN) has two more hyper-parameters than the losses above, and
# Dynamic R-CNN changes the smooth L1 beta while training, so both live in their own
# callables below; ``regression_loss_from_config`` picks the class from ``type``.

BALANCED_L1 = "balanced_l1"
REGRESSION_LOSS_TYPES = (*REGRESSION_LOSSES, BALANCED_L1)


def balanced_l1_loss(
    pred_deltas: Tensor, target_deltas: Tensor, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0
) -> Tensor:
    """Balanced L1 (Pang et al., Libra R-CNN, CVPR 2019, Eq. 7-9) summed over the four deltas.

    With x = |pred − target| and b chosen so that α·ln(b + 1) = γ (the gradient is
    continuous at x = β):
        x < β:  α/b · (b·x + 1) · ln(b·x/β + 1) − α·x
        x ≥ β:  γ·x + γ/b − α·β
    Its gradient α·ln(b·x/β + 1) lifts the small errors of the inliers, whose share of
    the total gradient is what Libra R-CNN balances. α = 0.5, γ = 1.5, β = 1 are the
    paper's and mmdetection's settings.
    """
    b = math.exp(gamma / alpha) - 1
    diff = (pred_deltas - target_deltas).abs()
    inlier = alpha / b * (b * diff + 1) * torch.log(b * diff / beta + 1) - alpha * diff
    outlier = gamma * diff + gamma / b - alpha * beta
    return torch.where(diff < beta, inlier, outlier).sum(dim=-1)


def smooth_l1_loss_tensor_beta(pred_deltas: Tensor, target_deltas: Tensor, beta: Tensor) -> Tensor:
    """:func:`smooth_l1_loss` with ``beta`` a (positive) 0-d tensor.

    ``F.smooth_l1_loss`` takes a Python float; Dynamic R-CNN's beta is computed on the
    device every 100 iterations and reading it back would sync the host each step.
    """
    diff = (pred_deltas - target_deltas).abs()
    return torch.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta).sum(dim=-1)


@dataclass(frozen=True)
class BalancedL1RegressionLoss(BoxRegressionLoss):
    """``{type: balanced_l1, alpha, gamma, beta, loss_weight}``: Libra R-CNN's box loss.

    An L1-family loss (it compares encoded deltas), callable like every
    :class:`BoxRegressionLoss`.
    """

    type: str = BALANCED_L1
    alpha: float = 0.5
    gamma: float = 1.5

    CONFIG_KEYS = ("type", "alpha", "gamma", "beta", "loss_weight")

    @classmethod
    def from_config(cls, config: Optional[dict], where: str) -> "BalancedL1RegressionLoss":
        config = dict(config or {})
        for key in config:
            if not isinstance(key, str) or key not in cls.CONFIG_KEYS:
                raise choice_error(f"{where}.{key}", key, cls.CONFIG_KEYS)
        alpha = _non_negative_number(config.get("alpha", 0.5), f"{where}.alpha")
        gamma = _non_negative_number(config.get("gamma", 1.5), f"{where}.gamma")
        beta = _non_negative_number(config.get("beta", 1.0), f"{where}.beta")
        for name, value in (("alpha", alpha), ("gamma", gamma), ("beta", beta)):
            if value == 0:
                raise ConfigError(f"{where}.{name}", "must be > 0 for balanced_l1.")
        loss_weight = _non_negative_number(config.get("loss_weight", 1.0), f"{where}.loss_weight")
        return cls(beta=beta, loss_weight=loss_weight, alpha=alpha, gamma=gamma)

    def delta_loss(self, pred_deltas: Tensor, target_deltas: Tensor) -> Tensor:
        return balanced_l1_loss(pred_deltas, target_deltas, self.alpha, self.gamma, self.beta)


def regression_loss_from_config(config: Optional[dict], where: str) -> BoxRegressionLoss:
    """Validate one ``model.losses.<head>`` entry of any type, balanced_l1 included."""
    loss_type = config.get("type", "l1") if isinstance(config, dict) else None
    if loss_type == BALANCED_L1:
        return BalancedL1RegressionLoss.from_config(config, where)
    if isinstance(loss_type, str) and loss_type not in REGRESSION_LOSSES:
        raise choice_error(f"{where}.type", loss_type, REGRESSION_LOSS_TYPES)
    return BoxRegressionLoss.from_config(config, where)
