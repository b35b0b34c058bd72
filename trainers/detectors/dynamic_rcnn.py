"""Dynamic R-CNN (Zhang et al., "Dynamic R-CNN: Towards High Quality Object Detection
via Dynamic Training", ECCV 2020) as a variant of our torchvision Faster R-CNN.

Two hyper-parameters of the ROI head follow the proposals' quality during training,
as in mmdetection's ``DynamicRoIHead`` and ``dynamic_rcnn_r50_fpn_1x`` config:

- **dynamic label assignment**: every iteration records, per image, the K_I-th
  largest IoU of the proposals with the ground truth (K_I = ``iou_topk`` = 75; the
  ground truth boxes are among the proposals), averaged over the images; every
  ``update_interval`` = 100 iterations the ROI IoU threshold (positive and negative
  at once) becomes max(``initial_iou`` = 0.4, mean of the records). It starts at the
  base config's 0.5.
- **dynamic SmoothL1 beta**: every iteration records the K_β-th smallest (K_β =
  ``beta_topk`` = 10 per image) regression error of the positive ROIs, the mean
  |target| of their encoded (dx, dy); at each update beta becomes
  min(``initial_beta`` = 1.0, median of the records) — unless that median is below
  1e-15, when beta stays. It starts at the configured smooth L1 beta (1.0).

The new values apply from the next iteration on. The config also raises the RPN's
NMS IoU threshold to 0.85 (training and test).

Checkpoints: the threshold, beta, both record windows and their fill level are
registered buffers of the ROI head, so ``state_dict()`` carries them and a resumed
run continues the same windows. Everything runs on the device: the update is a
``torch.where`` on the fill level, not a host-side branch.

``model.losses.roi_reg``: the default is ``{type: smooth_l1, beta: 1.0}`` and only
smooth L1 has its beta adapted. Another type (l1, balanced_l1, giou, …) keeps its
fixed settings; the IoU threshold still adapts and beta is still tracked (unused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from trainers.detectors.libra_rcnn import max_iou_per_proposal
from trainers.detectors.two_stage import FasterRCNNWithHeadLosses, RoIHeadsWithHeadLosses
from trainers.losses import BoxRegressionLoss, smooth_l1_loss_tensor_beta

# mmdetection's dynamic_rcnn_r50_fpn_1x (train_cfg.rcnn.dynamic_rcnn, rpn nms)
IOU_TOPK = 75
BETA_TOPK = 10
UPDATE_INTERVAL = 100
INITIAL_IOU = 0.4
INITIAL_BETA = 1.0
RPN_NMS_THRESH = 0.85
BETA_EPS = 1e-15


@dataclass(frozen=True)
class SmoothL1WithCurrentBeta(BoxRegressionLoss):
    """The smooth L1 box loss, its beta read from the Dynamic ROI head at every call."""

    type: str = "smooth_l1"
    current_beta: Optional[Callable[[], Tensor]] = None  # → 0-d tensor

    def delta_loss(self, pred_deltas: Tensor, target_deltas: Tensor) -> Tensor:
        return smooth_l1_loss_tensor_beta(pred_deltas, target_deltas, self.current_beta())


def median_of_even_or_odd(values: Tensor) -> Tensor:
    """numpy's median: the mean of the two middle values when the count is even
    (``torch.median`` returns the lower one)."""
    ordered = values.sort().values
    middle = values.numel() // 2
    if values.numel() % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


class DynamicRoIHeads(RoIHeadsWithHeadLosses):
    """ROI heads with the dynamic IoU threshold and smooth L1 beta (module docstring)."""

    def __init__(
        self,
        *args,
        reg_loss: BoxRegressionLoss = BoxRegressionLoss("smooth_l1"),
        iou_topk: int = IOU_TOPK,
        beta_topk: int = BETA_TOPK,
        update_interval: int = UPDATE_INTERVAL,
        initial_iou: float = INITIAL_IOU,
        initial_beta: float = INITIAL_BETA,
        **kwargs,
    ):
        super().__init__(*args, reg_loss=reg_loss, **kwargs)
        self.iou_topk, self.beta_topk, self.update_interval = iou_topk, beta_topk, update_interval
        self.initial_iou, self.initial_beta = initial_iou, initial_beta
        self.adapts_beta = reg_loss.type == "smooth_l1"
        start_beta = reg_loss.beta if self.adapts_beta else initial_beta
        if self.adapts_beta:
            if start_beta <= 0:
                raise ValueError("Dynamic R-CNN adapts the smooth L1 beta: it must start > 0")
            self.reg_loss = SmoothL1WithCurrentBeta(loss_weight=reg_loss.loss_weight,
                                                    current_beta=self.current_beta)
        self.register_buffer("iou_threshold", torch.tensor(float(self.proposal_matcher.high_threshold)))
        self.register_buffer("beta", torch.tensor(float(start_beta)))
        self.register_buffer("iou_history", torch.zeros(update_interval))
        self.register_buffer("beta_history", torch.zeros(update_interval))
        self.register_buffer("history_length", torch.zeros((), dtype=torch.long))
        self._statistics: dict[str, Tensor] = {}

    def current_beta(self) -> Tensor:
        # A copy: the buffer is updated in place after the loss is built, and autograd
        # keeps beta for the backward pass.
        return self.beta.clone()

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        # torchvision's Matcher compares with its thresholds: 0-d tensors work as well.
        self.proposal_matcher.high_threshold = self.iou_threshold
        self.proposal_matcher.low_threshold = self.iou_threshold
        result, losses = super().forward(features, proposals, image_shapes, targets)
        self.record_and_update(self._statistics.pop("iou"), self._statistics.pop("beta"))
        return result, losses

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        matched_idxs, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        with torch.no_grad():
            kth_largest = []
            for proposals_in_image, gt_in_image in zip(proposals, gt_boxes):
                overlaps = max_iou_per_proposal(proposals_in_image, gt_in_image)
                k = min(self.iou_topk, overlaps.numel())
                kth_largest.append(overlaps.topk(k).values[-1])
            self._statistics["iou"] = torch.stack(kth_largest).float().mean()
        return matched_idxs, labels

    def compute_head_losses(
        self, class_logits, box_regression, proposals, labels, regression_targets, matched_gt_boxes
    ):
        with torch.no_grad():
            positive = torch.cat(labels) > 0
            errors = torch.cat(regression_targets)[:, :2].abs().mean(dim=1).float()
            errors = torch.where(positive, errors, torch.full_like(errors, float("inf")))
            num_pos = positive.sum()
            # The k-th smallest error, k = min(K_β · #images, #positives), gathered on the device.
            k = num_pos.clamp(max=self.beta_topk * len(proposals))
            kth = errors.sort().values.gather(0, (k - 1).clamp(min=0).view(1)).squeeze(0)
            # No positive in the whole batch (mmdetection would fail): record the current beta.
            self._statistics["beta"] = torch.where(num_pos > 0, kth, self.beta)
        return super().compute_head_losses(
            class_logits, box_regression, proposals, labels, regression_targets, matched_gt_boxes
        )

    @torch.no_grad()
    def record_and_update(self, iou_statistic: Tensor, beta_statistic: Tensor) -> None:
        """Append this iteration's records; on the ``update_interval``-th, update the
        threshold and beta from the window and empty it."""
        slot = torch.arange(self.update_interval, device=self.iou_history.device) == self.history_length
        self.iou_history.copy_(torch.where(slot, iou_statistic, self.iou_history))
        self.beta_history.copy_(torch.where(slot, beta_statistic, self.beta_history))
        self.history_length += 1
        update = self.history_length == self.update_interval
        new_iou = self.iou_history.mean().clamp(min=self.initial_iou)
        median = median_of_even_or_odd(self.beta_history)
        new_beta = torch.where(median < BETA_EPS, self.beta, median.clamp(max=self.initial_beta))
        self.iou_threshold.copy_(torch.where(update, new_iou, self.iou_threshold))
        self.beta.copy_(torch.where(update, new_beta, self.beta))
        self.history_length.copy_(torch.where(update, torch.zeros_like(self.history_length), self.history_length))


class DynamicRCNNWithHeadLosses(FasterRCNNWithHeadLosses):
    """Faster R-CNN with Dynamic R-CNN's ROI head and the config's RPN NMS at 0.85;
    train forward → {rpn_cls, rpn_reg, roi_cls, roi_reg}."""

    def __init__(
        self, backbone, num_classes, rpn_reg_loss: BoxRegressionLoss, roi_reg_loss: BoxRegressionLoss, **kwargs
    ):
        kwargs.setdefault("rpn_nms_thresh", RPN_NMS_THRESH)
        super().__init__(backbone, num_classes, rpn_reg_loss, roi_reg_loss, **kwargs)
        self.roi_heads = DynamicRoIHeads.from_torchvision(self.roi_heads, roi_reg_loss)
