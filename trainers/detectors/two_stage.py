"""Faster R-CNN and Mask R-CNN (torchvision) with raw head losses normalised as in mmdetection 2.x.

What is overridden, and why (everything else is torchvision's code):

- ``RegionProposalNetwork.forward`` (training branch only): torchvision's
  ``compute_loss`` never sees the anchors or the matched ground-truth boxes, which the
  IoU losses (decoded boxes) and the KPIs need. The loss itself:
    * ``rpn_cls``: BCE averaged over the sampled anchors (256 per image) — same as
      torchvision and mmdetection;
    * ``rpn_reg``: Σ over sampled positives of the per-box loss / the number of
      sampled anchors. mmdetection counts Σ_img max(#pos, 1) + Σ_img max(#neg, 1),
      torchvision the plain count; we follow mmdetection. torchvision's loss is
      smooth L1 with beta = 1/9; here it is the configured loss (default L1, as the
      paper's configs).
- ``RoIHeads.forward`` (training branch only): torchvision's module-level
  ``fastrcnn_loss`` hard-codes smooth L1 (beta 1/9) and has no access to the
  proposals. ``roi_cls`` = cross-entropy averaged over the sampled ROIs (512 per
  image); ``roi_reg`` = Σ over positive ROIs of the class-specific box loss / number of
  sampled ROIs (mmdetection's ``avg_factor = bbox_targets.size(0)``, torchvision's
  ``labels.numel()``: the same). The mask loss is torchvision's ``maskrcnn_loss``
  (BCE averaged over the positive ROIs' 28×28 targets, as mmdetection).

The returned losses are *unweighted* except for the per-head ``loss_weight`` of the
regression loss config (trainers/losses.py); the engine applies the loss-weighting
method (ALWA, fixed weights, …) to ``{weighted_head}_cls`` / ``{weighted_head}_reg``.

After every training forward, ``model.kpis`` holds detached scalar tensors for the
weighted head (for DTP): ``cls_acc``, the accuracy of the sampled anchors' (ROIs')
predictions, and ``reg_iou``, the mean IoU of the positives' decoded boxes with their
ground truth (0 when there are no positives). Both are computed on the device.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

from torchvision.ops import box_iou

from trainers.detectors.mmdet_parity import RPN_ASSIGNER, max_iou_assign
from trainers.losses import BoxRegressionLoss, paired_box_iou


class RPNWithHeadLosses(RegionProposalNetwork):
    """torchvision's RPN returning ``rpn_cls`` / ``rpn_reg`` with a pluggable box loss."""

    def __init__(self, *args, reg_loss: BoxRegressionLoss = BoxRegressionLoss(), parity: str = "torchvision",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.reg_loss = reg_loss
        self.parity = parity
        self.kpis: dict[str, Tensor] = {}

    @classmethod
    def from_torchvision(cls, rpn: RegionProposalNetwork, reg_loss: BoxRegressionLoss,
                         parity: str = "torchvision") -> "RPNWithHeadLosses":
        """The same RPN (same submodules and settings) with our loss."""
        return cls(
            rpn.anchor_generator,
            rpn.head,
            rpn.proposal_matcher.high_threshold,
            rpn.proposal_matcher.low_threshold,
            rpn.fg_bg_sampler.batch_size_per_image,
            rpn.fg_bg_sampler.positive_fraction,
            rpn._pre_nms_top_n,
            rpn._post_nms_top_n,
            rpn.nms_thresh,
            score_thresh=rpn.score_thresh,
            reg_loss=reg_loss,
            parity=parity,
        )

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        if not self.training:
            return super().forward(images, features, targets)
        if targets is None:
            raise ValueError("targets should not be None in training mode")
        # As torchvision's forward up to the loss.
        features_list = list(features.values())
        objectness, pred_bbox_deltas = self.head(features_list)
        anchors = self.anchor_generator(images, features_list)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)

        if self.parity == "mmdet":
            labels, matched_gt_boxes = self.assign_targets_mmdet(anchors, targets, self.anchor_generator.valid_flags)
        else:
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
        losses = self.compute_head_losses(objectness, pred_bbox_deltas, anchors, labels, matched_gt_boxes)
        return boxes, losses

    @staticmethod
    def assign_targets_mmdet(
        anchors: list[Tensor], targets: list[dict[str, Tensor]], valid_flags: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """mmdet's RPN assignment: MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3) over the valid
        anchors only. Labels 1 / 0 / -1 (ignored: between thresholds or invalid)."""
        labels, matched_gt_boxes = [], []
        for anchors_per_image, target, valid in zip(anchors, targets, valid_flags):
            gt_boxes = target["boxes"]
            matched = max_iou_assign(box_iou(gt_boxes, anchors_per_image), valid=valid, **RPN_ASSIGNER)
            label = torch.where(matched >= 0, 1.0, torch.where(matched == -1, 0.0, -1.0))
            labels.append(label.to(anchors_per_image.dtype))
            if gt_boxes.numel() == 0:
                matched_gt_boxes.append(torch.zeros_like(anchors_per_image))
            else:
                matched_gt_boxes.append(gt_boxes[matched.clamp(min=0)])
        return labels, matched_gt_boxes

    def compute_head_losses(
        self,
        objectness: Tensor,
        pred_bbox_deltas: Tensor,
        anchors: list[Tensor],
        labels: list[Tensor],
        matched_gt_boxes: list[Tensor],
    ) -> dict[str, Tensor]:
        """Sample anchors, then the mmdetection-normalised losses (see module docstring)."""
        sampled_pos_masks, sampled_neg_masks = self.fg_bg_sampler(labels)
        # mmdetection's avg_factor: Σ_img max(#pos, 1) + Σ_img max(#neg, 1), on device.
        num_samples = sum(m.sum().clamp(min=1) for m in sampled_pos_masks) + sum(
            m.sum().clamp(min=1) for m in sampled_neg_masks
        )
        sampled_pos_inds = torch.where(torch.cat(sampled_pos_masks))[0]
        sampled_neg_inds = torch.where(torch.cat(sampled_neg_masks))[0]
        sampled_inds = torch.cat([sampled_pos_inds, sampled_neg_inds])

        objectness = objectness.flatten()
        labels = torch.cat(labels)
        cls_loss = F.binary_cross_entropy_with_logits(objectness[sampled_inds].float(), labels[sampled_inds])

        # Only the positives are encoded/decoded (torchvision encodes every anchor).
        pos_anchors = torch.cat(anchors)[sampled_pos_inds]
        pos_gt_boxes = torch.cat(matched_gt_boxes)[sampled_pos_inds]
        pos_deltas = pred_bbox_deltas[sampled_pos_inds].float()  # fp16 under AMP: box areas overflow
        pos_boxes = self.box_coder.decode_single(pos_deltas, pos_anchors)  # IoU losses and the KPI
        per_box = self.reg_loss(pos_deltas, pos_anchors, pos_gt_boxes, self.box_coder, pred_boxes=pos_boxes)
        reg_loss = per_box.sum() / num_samples

        with torch.no_grad():
            predicted_object = objectness[sampled_inds] > 0
            is_object = labels[sampled_inds] > 0.5
            self.kpis = {
                "cls_acc": (predicted_object == is_object).float().mean(),
                "reg_iou": _mean_or_zero(paired_box_iou(pos_boxes.detach(), pos_gt_boxes)),
            }
        return {"rpn_cls": cls_loss, "rpn_reg": reg_loss}


class RoIHeadsWithHeadLosses(RoIHeads):
    """torchvision's ROI heads returning ``roi_cls`` / ``roi_reg`` (+ ``mask``)."""

    def __init__(self, *args, reg_loss: BoxRegressionLoss = BoxRegressionLoss(), **kwargs):
        super().__init__(*args, **kwargs)
        self.reg_loss = reg_loss
        self.kpis: dict[str, Tensor] = {}

    @classmethod
    def from_torchvision(cls, roi_heads: RoIHeads, reg_loss: BoxRegressionLoss) -> "RoIHeadsWithHeadLosses":
        """The same ROI heads (same submodules and settings, mask branch included) with our loss."""
        return cls(
            roi_heads.box_roi_pool,
            roi_heads.box_head,
            roi_heads.box_predictor,
            roi_heads.proposal_matcher.high_threshold,
            roi_heads.proposal_matcher.low_threshold,
            roi_heads.fg_bg_sampler.batch_size_per_image,
            roi_heads.fg_bg_sampler.positive_fraction,
            roi_heads.box_coder.weights,
            roi_heads.score_thresh,
            roi_heads.nms_thresh,
            roi_heads.detections_per_img,
            mask_roi_pool=roi_heads.mask_roi_pool,
            mask_head=roi_heads.mask_head,
            mask_predictor=roi_heads.mask_predictor,
            reg_loss=reg_loss,
        )

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        matched_gt_boxes = [
            t["boxes"][idxs] if t["boxes"].numel() > 0 else torch.zeros_like(p)
            for t, idxs, p in zip(targets, matched_idxs, proposals)
        ]
        losses = self.compute_head_losses(
            class_logits, box_regression, proposals, labels, regression_targets, matched_gt_boxes
        )
        if self.has_mask():
            losses["mask"] = self.mask_loss(features, proposals, image_shapes, labels, matched_idxs, targets)
        return [], losses

    def compute_head_losses(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        labels: list[Tensor],
        regression_targets: list[Tensor],
        matched_gt_boxes: list[Tensor],
    ) -> dict[str, Tensor]:
        """Replaces torchvision's ``fastrcnn_loss`` (see module docstring)."""
        labels = torch.cat(labels)
        cls_loss = F.cross_entropy(class_logits.float(), labels)

        pos_inds = torch.where(labels > 0)[0]
        pos_labels = labels[pos_inds]
        num_rois = class_logits.shape[0]
        # Class-specific regression: each positive ROI is scored on its GT class's deltas.
        pos_deltas = box_regression.reshape(num_rois, -1, 4)[pos_inds, pos_labels].float()  # see RPN
        pos_proposals = torch.cat(proposals)[pos_inds]
        pos_gt_boxes = torch.cat(matched_gt_boxes)[pos_inds]
        pos_targets = torch.cat(regression_targets)[pos_inds]
        pos_boxes = self.box_coder.decode_single(pos_deltas, pos_proposals)  # IoU losses and the KPI
        per_box = self.reg_loss(
            pos_deltas, pos_proposals, pos_gt_boxes, self.box_coder, target_deltas=pos_targets, pred_boxes=pos_boxes
        )
        reg_loss = per_box.sum() / max(num_rois, 1)

        with torch.no_grad():
            self.kpis = {
                "cls_acc": (class_logits.argmax(dim=1) == labels).float().mean(),
                "reg_iou": _mean_or_zero(paired_box_iou(pos_boxes.detach(), pos_gt_boxes)),
            }
        return {"roi_cls": cls_loss, "roi_reg": reg_loss}

    def mask_loss(self, features, proposals, image_shapes, labels, matched_idxs, targets) -> Tensor:
        """torchvision's mask branch (training): positives only, ``maskrcnn_loss``."""
        mask_proposals, pos_matched_idxs = [], []
        for proposals_in_image, labels_in_image, matched_in_image in zip(proposals, labels, matched_idxs):
            pos = torch.where(labels_in_image > 0)[0]
            mask_proposals.append(proposals_in_image[pos])
            pos_matched_idxs.append(matched_in_image[pos])
        mask_features = self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
        mask_logits = self.mask_predictor(mask_features)
        gt_masks = [t["masks"] for t in targets]
        gt_labels = [t["labels"] for t in targets]
        return maskrcnn_loss(mask_logits, mask_proposals, gt_masks, gt_labels, pos_matched_idxs)


class TwoStageHeadLosses:
    """Mixin for FasterRCNN / MaskRCNN: swap in our RPN and ROI heads, publish KPIs.

    ``weighted_head`` names the head the loss-weighting method acts on: "rpn" as in
    the paper's code; set it to "roi" to weight the ROI head instead (the KPIs follow).
    """

    def __init__(
        self, backbone, num_classes, rpn_reg_loss: BoxRegressionLoss, roi_reg_loss: BoxRegressionLoss,
        parity: str = "torchvision", **kwargs
    ):
        super().__init__(backbone, num_classes, **kwargs)
        self.rpn = RPNWithHeadLosses.from_torchvision(self.rpn, rpn_reg_loss, parity=parity)
        self.roi_heads = RoIHeadsWithHeadLosses.from_torchvision(self.roi_heads, roi_reg_loss)
        self.weighted_head = "rpn"
        self.kpis: dict[str, Tensor] = {}

    def forward(self, images, targets=None):
        outputs = super().forward(images, targets)
        if self.training:
            head = {"rpn": self.rpn, "roi": self.roi_heads}[self.weighted_head]
            self.kpis = head.kpis
        return outputs


class FasterRCNNWithHeadLosses(TwoStageHeadLosses, FasterRCNN):
    """torchvision FasterRCNN; train forward → {rpn_cls, rpn_reg, roi_cls, roi_reg}."""


class MaskRCNNWithHeadLosses(TwoStageHeadLosses, MaskRCNN):
    """torchvision MaskRCNN; train forward → {rpn_cls, rpn_reg, roi_cls, roi_reg, mask}."""


def _mean_or_zero(values: Tensor) -> Tensor:
    """Mean without a host sync; 0 for an empty tensor."""
    return values.sum() / max(values.numel(), 1)
