"""RetinaNet (torchvision) with raw head losses normalised as in mmdetection 2.x.

Overridden: ``RetinaNetHead.compute_loss`` (the losses and KPIs), plus two small
hooks on the model (publish the KPIs, keep the background column out of detections).

Differences from torchvision, all to match mmdetection 2.x (the paper's code):
- Normalisation over the batch, not per image: torchvision averages
  (per-image loss / per-image #positives) over images; mmdetection divides the batch
  sums by Σ_img max(#positives, 1). Both ``retina_cls`` (sigmoid focal loss, α 0.25,
  γ 2, summed over non-ignored anchors × classes) and ``retina_reg`` (per-box loss
  summed over positives) use that normaliser.
- The model has K+1 classification outputs so that label indices line up with the
  datasets (1..K, torchvision's convention), but column 0 ("background") is never a
  positive for a sigmoid classifier. torchvision trains it as an always-negative
  class, which adds focal terms mmdetection does not have; we leave it out of the
  loss and mask it out of the detections.
- The box loss is configurable (``bbox_reg_loss_type`` exists in torchvision too, with
  the per-image normalisation).

KPIs (``model.kpis``, detached, computed on the device): ``reg_iou``, the mean IoU of
the positives' decoded boxes with their ground truth; ``cls_acc``, the *balanced*
accuracy over non-ignored anchors, (accuracy on positives + accuracy on negatives) / 2,
where an anchor's prediction is its best class if that class's probability exceeds
0.5, else background. RetinaNet has no sampler: ~99.9 % of its anchors are
background, so plain accuracy would read ≈ 1 from the first iteration; averaging the
two parts plays the role of the two-stage RPN's balanced 256-anchor sample.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import box_iou, sigmoid_focal_loss

from trainers.detectors.mmdet_parity import RETINA_ASSIGNER, max_iou_assign
from trainers.losses import BoxRegressionLoss, paired_box_iou

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


class RetinaNetHeadWithHeadLosses(RetinaNetHead):
    """torchvision's RetinaNet head whose loss is ``{retina_cls, retina_reg}``."""

    def __init__(
        self, in_channels: int, num_anchors: int, num_classes: int, reg_loss: BoxRegressionLoss, norm_layer=None
    ):
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        self.reg_loss = reg_loss
        self.box_coder = self.regression_head.box_coder
        self.kpis: dict[str, Tensor] = {}

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, Tensor]:
        # float32: under AMP the head runs in fp16, where box areas and focal sums overflow.
        cls_logits = head_outputs["cls_logits"].float()  # (N, A, K+1)
        bbox_regression = head_outputs["bbox_regression"]  # (N, A, 4)
        matched = torch.stack(matched_idxs)  # (N, A): gt index, or -1 background, -2 ignored
        foreground = matched >= 0
        valid = matched != Matcher.BETWEEN_THRESHOLDS
        labels = torch.stack(
            [
                t["labels"][m.clamp(min=0)] * f if t["labels"].numel() > 0 else torch.zeros_like(m)
                for t, m, f in zip(targets, matched, foreground)
            ]
        )  # (N, A), 0 for background
        num_positives = foreground.sum(dim=1).clamp(min=1).sum()
        pos_image, pos_anchor = torch.where(foreground)

        # Focal loss over the K object classes (column 0 excluded, see module docstring).
        object_logits = cls_logits[..., 1:]
        class_targets = torch.zeros_like(object_logits)
        class_targets[pos_image, pos_anchor, labels[pos_image, pos_anchor] - 1] = 1.0
        focal = sigmoid_focal_loss(object_logits, class_targets, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="none")
        cls_loss = (focal * valid.unsqueeze(-1)).sum() / num_positives

        pos_deltas = bbox_regression[pos_image, pos_anchor].float()
        pos_anchors = torch.stack(anchors)[pos_image, pos_anchor]
        pos_gt_boxes = torch.cat(
            [t["boxes"][m[f]] for t, m, f in zip(targets, matched, foreground)]
        )  # same order as torch.where: image-major, then anchor
        pos_boxes = self.box_coder.decode_single(pos_deltas, pos_anchors)  # IoU losses and the KPI
        per_box = self.reg_loss(pos_deltas, pos_anchors, pos_gt_boxes, self.box_coder, pred_boxes=pos_boxes)
        reg_loss = per_box.sum() / num_positives

        with torch.no_grad():
            self.kpis = {
                "cls_acc": _balanced_accuracy(cls_logits.detach(), labels, foreground, valid),
                "reg_iou": paired_box_iou(pos_boxes.detach(), pos_gt_boxes).sum() / max(pos_gt_boxes.shape[0], 1),
            }
        return {"retina_cls": cls_loss, "retina_reg": reg_loss}


def _balanced_accuracy(cls_logits: Tensor, labels: Tensor, foreground: Tensor, valid: Tensor) -> Tensor:
    best_logit, best_class = cls_logits[..., 1:].max(dim=-1)
    predicted = torch.where(best_logit > 0, best_class + 1, torch.zeros_like(best_class))  # p > 0.5 ⇔ logit > 0
    correct = predicted == labels
    background = valid & ~foreground
    positive_accuracy = (correct & foreground).sum() / foreground.sum().clamp(min=1)
    negative_accuracy = (correct & background).sum() / background.sum().clamp(min=1)
    return (positive_accuracy + negative_accuracy).float() / 2


class RetinaNetWithHeadLosses(RetinaNet):
    """torchvision RetinaNet; train forward → {retina_cls, retina_reg}."""

    def __init__(
        self, backbone, num_classes: int, anchor_generator, reg_loss: BoxRegressionLoss, head_norm_layer=None,
        parity: str = "torchvision", **kwargs
    ):
        head = RetinaNetHeadWithHeadLosses(
            backbone.out_channels, anchor_generator.num_anchors_per_location()[0], num_classes, reg_loss,
            norm_layer=head_norm_layer,
        )
        super().__init__(backbone, num_classes, anchor_generator=anchor_generator, head=head, **kwargs)
        self.weighted_head = "retina"
        self.parity = parity
        self.kpis: dict[str, Tensor] = {}

    def compute_loss(self, targets, head_outputs, anchors):
        if self.parity == "mmdet":
            # MaxIoUAssigner(0.5, 0.4, min_pos_iou=0) over the valid anchors; invalid ones
            # are "between thresholds" (-2), so they leave the focal loss (mmdet_parity.py).
            matched_idxs = [
                max_iou_assign(box_iou(t["boxes"], a), valid=v, **RETINA_ASSIGNER)
                for t, a, v in zip(targets, anchors, self.anchor_generator.valid_flags)
            ]
            losses = self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)
        else:
            losses = super().compute_loss(targets, head_outputs, anchors)
        self.kpis = self.head.kpis
        return losses

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        # Column 0 is background (never trained, see module docstring): score it 0.
        logits = head_outputs["cls_logits"]
        background = torch.zeros(logits[0].shape[-1], dtype=torch.bool, device=logits[0].device)
        background[0] = True
        masked = dict(head_outputs)
        masked["cls_logits"] = [level.masked_fill(background, float("-inf")) for level in logits]
        return super().postprocess_detections(masked, anchors, image_shapes)
