"""Libra R-CNN (Pang et al., "Libra R-CNN: Towards Balanced Learning for Object
Detection", CVPR 2019) as a variant of our torchvision Faster R-CNN.

Set up like mmdetection's ``libra_faster_rcnn_r50_fpn_1x`` config, the three pieces
of the paper:

- **balanced feature pyramid** (:class:`BalancedFeaturePyramid`): the neck becomes
  [FPN, BFP]; the five FPN levels are resized to the refine level (P4, ``refine_level
  = 2``), averaged, refined by an embedded-Gaussian non-local block and added back to
  every level;
- **IoU-balanced sampling** (:class:`IoUBalancedSampler`) of the ROI head's 512 ROIs:
  negatives drawn evenly from IoU bins (``floor_thr = -1, floor_fraction = 0,
  num_bins = 3``), positives balanced over ground-truth instances (mmdetection's
  ``InstanceBalancedPosSampler``);
- **Balanced L1** in the ROI box head (trainers/losses.py; α = 0.5, γ = 1.5, β = 1):
  the default ``model.losses.roi_reg`` of this detector.

The config also caps the RPN's negatives at 5 × its positives (``neg_pos_ub = 5``,
:class:`RPNSamplerWithNegativeCap`). Everything else is the Faster R-CNN of
two_stage.py, so the raw losses are the same four keys.

The samplers decide on the device: random ranks instead of ``randperm`` on index
lists, so that no count has to be read back on the host.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from trainers.detectors.two_stage import FasterRCNNWithHeadLosses, RoIHeadsWithHeadLosses
from trainers.losses import BoxRegressionLoss

# mmdetection's libra_faster_rcnn_r50_fpn_1x
BFP_REFINE_LEVEL = 2
RPN_NEG_POS_UB = 5
IOU_BALANCED = dict(floor_thr=-1.0, floor_fraction=0.0, num_bins=3)


# ---------------------------------------------------------------- sampling helpers


def random_subset(candidates: Tensor, count) -> Tensor:
    """A uniformly random subset of ``min(count, #candidates)`` of the True entries.

    ``candidates`` is a bool mask, ``count`` an int or a 0-d tensor (so the size can be
    decided on the device). Every candidate gets a random rank; the first ``count``
    ranks are kept.
    """
    keys = torch.rand(candidates.shape, device=candidates.device)
    keys = torch.where(candidates, keys, torch.full_like(keys, 2.0))  # non-candidates rank last
    order = keys.argsort()
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return candidates & (rank < count)


def max_iou_per_proposal(proposals: Tensor, gt_boxes: Tensor) -> Tensor:
    """Each proposal's highest IoU with a ground-truth box (0 in an image without any)."""
    if gt_boxes.numel() == 0:
        return torch.zeros(proposals.shape[0], dtype=proposals.dtype, device=proposals.device)
    return box_iou(gt_boxes, proposals).max(dim=0).values


class RPNSamplerWithNegativeCap:
    """torchvision's ``BalancedPositiveNegativeSampler`` plus mmdetection's ``neg_pos_ub``:
    at most ``neg_pos_ub`` × max(#positives, 1) negatives per image."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float, neg_pos_ub: int = RPN_NEG_POS_UB):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.neg_pos_ub = neg_pos_ub

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        positives, negatives = [], []
        for labels_in_image in labels:
            positive = random_subset(labels_in_image >= 1, int(self.batch_size_per_image * self.positive_fraction))
            num_pos = positive.sum()
            num_neg = torch.minimum(self.batch_size_per_image - num_pos, self.neg_pos_ub * num_pos.clamp(min=1))
            positives.append(positive)
            negatives.append(random_subset(labels_in_image == 0, num_neg))
        return positives, negatives


class IoUBalancedSampler:
    """The ROI sampler of Libra R-CNN (mmdetection's ``CombinedSampler`` of
    ``InstanceBalancedPosSampler`` and ``IoUBalancedNegSampler``).

    Positives (``batch × positive_fraction`` at most): when there are more, each
    ground-truth instance keeps at most round(expected / #instances) + 1 of its
    proposals, then random positives fill up to the expected number.

    Negatives (the rest of the batch): with ``floor_thr = -1`` (the config) all
    negatives take part in the IoU bins; ``num_bins`` bins split
    [floor_thr, max IoU of the image's proposals) evenly, each bin gives at most
    ``expected // num_bins`` random negatives, and random negatives fill up the rest.
    As in mmdetection, the bins span from ``floor_thr`` (−1, so the first bin is empty)
    to the image's highest IoU (1.0, the ground truth added as proposals): with three
    bins the negatives (IoU < 0.5) fall into [−1/3, 1/3) and [1/3, 1). With
    ``floor_thr ≥ 0`` a ``floor_fraction`` of the negatives is drawn at random below it.
    """

    def __init__(
        self,
        batch_size_per_image: int,
        positive_fraction: float,
        floor_thr: float = -1.0,
        floor_fraction: float = 0.0,
        num_bins: int = 3,
    ):
        if not (floor_thr == -1 or floor_thr >= 0) or not 0 <= floor_fraction <= 1 or num_bins < 1:
            raise ValueError("IoUBalancedSampler: floor_thr must be -1 or >= 0, floor_fraction in [0, 1], "
                             "num_bins >= 1")
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.floor_thr = floor_thr
        self.floor_fraction = floor_fraction
        self.num_bins = num_bins

    def __call__(
        self, labels: list[Tensor], matched_idxs: list[Tensor], max_overlaps: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: labels (> 0 positive, 0 negative, −1 ignored), the matched
        ground-truth index and the max IoU of every proposal → (positive, negative) masks."""
        positives, negatives = [], []
        for labels_in_image, matched, overlaps in zip(labels, matched_idxs, max_overlaps):
            positive = self.sample_positives(labels_in_image >= 1, matched)
            num_neg = self.batch_size_per_image - positive.sum()
            positives.append(positive)
            negatives.append(self.sample_negatives(labels_in_image == 0, overlaps, num_neg))
        return positives, negatives

    def sample_positives(self, positive: Tensor, matched: Tensor) -> Tensor:
        expected = int(self.batch_size_per_image * self.positive_fraction)
        # Group the positives by instance; the non-positives form one extra, last group.
        # Matched indices are < #proposals, a bound known on the host; scatter_add (not
        # bincount) keeps the counting on the device.
        num_groups = positive.numel()
        group = torch.where(positive, matched, torch.full_like(matched, num_groups))
        counts = torch.zeros(num_groups + 1, dtype=torch.long, device=group.device)
        counts.scatter_add_(0, group, torch.ones_like(group))
        num_instances = (counts[:num_groups] > 0).sum().clamp(min=1)
        per_instance = torch.round(expected / num_instances.double()) + 1  # mmdetection: round(n / #gt) + 1
        # Rank inside each group: sort by group, ties broken at random.
        order = (group.double() + torch.rand(group.shape, dtype=torch.float64, device=group.device)).argsort()
        starts = counts.cumsum(0) - counts
        rank_sorted = torch.arange(order.numel(), device=order.device) - starts[group[order]]
        rank = torch.empty_like(order).scatter_(0, order, rank_sorted)
        balanced = positive & (rank < per_instance)
        chosen = random_subset(balanced, expected)
        return chosen | random_subset(positive & ~balanced, (expected - chosen.sum()).clamp(min=0))

    def sample_negatives(self, negative: Tensor, overlaps: Tensor, expected: Tensor) -> Tensor:
        if negative.numel() == 0:
            return negative
        if self.floor_thr > 0:
            floor_set = (overlaps >= 0) & (overlaps < self.floor_thr)
            iou_set = overlaps >= self.floor_thr
        elif self.floor_thr == 0:
            floor_set = overlaps == 0
            iou_set = overlaps > 0
        else:
            floor_set = torch.zeros_like(negative)
            iou_set = overlaps > self.floor_thr
        expected_iou = torch.floor(expected * (1 - self.floor_fraction))
        if self.num_bins >= 2:
            chosen = self.sample_via_interval(negative & iou_set, overlaps, expected_iou)
        else:
            chosen = random_subset(negative & iou_set, expected_iou)
        chosen = chosen | random_subset(negative & floor_set, expected - chosen.sum())
        # Fewer candidates than expected in the bins and below the floor: fill at random.
        return chosen | random_subset(negative & ~chosen, expected - chosen.sum())

    def sample_via_interval(self, candidates: Tensor, overlaps: Tensor, expected: Tensor) -> Tensor:
        interval = (overlaps.max() - self.floor_thr) / self.num_bins
        per_bin = torch.floor(expected / self.num_bins)
        chosen = torch.zeros_like(candidates)
        for i in range(self.num_bins):
            start = self.floor_thr + i * interval
            end = self.floor_thr + (i + 1) * interval
            in_bin = candidates & (overlaps >= start) & (overlaps < end)
            chosen = chosen | random_subset(in_bin, per_bin)
        return chosen | random_subset(candidates & ~chosen, expected - chosen.sum())


# ---------------------------------------------------------------- balanced feature pyramid


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al., CVPR 2018) as BFP configures it:
    no channel reduction, no 1/√C scaling, residual output x + W_z(y)."""

    def __init__(self, channels: int):
        super().__init__()
        self.theta = nn.Conv2d(channels, channels, 1)
        self.phi = nn.Conv2d(channels, channels, 1)
        self.g = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (n, hw, c)
        phi = self.phi(x).flatten(2)  # (n, c, hw)
        g = self.g(x).flatten(2).transpose(1, 2)  # (n, hw, c)
        # float32 even under AMP: θ·φ sums 256 products of FPN activations and can pass
        # fp16's 65504, which would turn the softmax into NaN.
        with torch.autocast(x.device.type, enabled=False):
            attention = torch.softmax(theta.float() @ phi.float(), dim=-1)  # (n, hw, hw)
            y = (attention @ g.float()).transpose(1, 2).reshape(n, c, h, w)
        return x + self.out(y.to(x.dtype))


class BalancedFeaturePyramid(nn.Module):
    """BFP: integrate the pyramid at one level, refine it, add it back to every level.

    Integrate: levels finer than ``refine_level`` are max-pooled to its size, coarser
    ones upsampled (nearest), and all are averaged. Refine: a non-local block. Scatter:
    the refined map is resized back (nearest up, max-pool down) and added to each level.
    Input and output are the FPN's OrderedDict of maps.
    """

    def __init__(self, channels: int, refine_level: int = BFP_REFINE_LEVEL):
        super().__init__()
        self.refine_level = refine_level
        self.refine = NonLocalBlock(channels)
        # mmdetection's BFP.init_weights: Xavier-uniform for every conv, the non-local ones too.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        levels = list(features.values())
        size = levels[self.refine_level].shape[-2:]
        gathered = [
            F.adaptive_max_pool2d(x, size) if i < self.refine_level else F.interpolate(x, size=size, mode="nearest")
            for i, x in enumerate(levels)
        ]
        balanced = self.refine(sum(gathered) / len(gathered))
        outputs = OrderedDict()
        for i, (name, x) in enumerate(features.items()):
            if i < self.refine_level:
                residual = F.interpolate(balanced, size=x.shape[-2:], mode="nearest")
            else:
                residual = F.adaptive_max_pool2d(balanced, x.shape[-2:])
            outputs[name] = x + residual
        return outputs


# ---------------------------------------------------------------- the detector


class LibraRoIHeads(RoIHeadsWithHeadLosses):
    """ROI heads whose sampler sees each proposal's max IoU and matched instance."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fg_bg_sampler = IoUBalancedSampler(
            self.fg_bg_sampler.batch_size_per_image, self.fg_bg_sampler.positive_fraction, **IOU_BALANCED
        )
        self._assignment: tuple[list[Tensor], list[Tensor]] | None = None

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        matched_idxs, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        overlaps = [max_iou_per_proposal(p, g) for p, g in zip(proposals, gt_boxes)]
        self._assignment = (list(matched_idxs), overlaps)  # for subsample, called next
        return matched_idxs, labels

    def subsample(self, labels: list[Tensor]) -> list[Tensor]:
        matched_idxs, overlaps = self._assignment
        self._assignment = None
        positives, negatives = self.fg_bg_sampler(labels, matched_idxs, overlaps)
        return [torch.where(p | n)[0] for p, n in zip(positives, negatives)]


class LibraRCNNWithHeadLosses(FasterRCNNWithHeadLosses):
    """Faster R-CNN + BFP neck + IoU-balanced ROI sampling (+ Balanced L1 from the config);
    train forward → {rpn_cls, rpn_reg, roi_cls, roi_reg}."""

    def __init__(
        self, backbone, num_classes, rpn_reg_loss: BoxRegressionLoss, roi_reg_loss: BoxRegressionLoss, **kwargs
    ):
        # mmdetection's neck=[FPN, BFP]: both of our backbones end in ``.fpn``.
        backbone.fpn = nn.Sequential(backbone.fpn, BalancedFeaturePyramid(backbone.out_channels))
        super().__init__(backbone, num_classes, rpn_reg_loss, roi_reg_loss, **kwargs)
        sampler = self.rpn.fg_bg_sampler
        self.rpn.fg_bg_sampler = RPNSamplerWithNegativeCap(sampler.batch_size_per_image, sampler.positive_fraction)
        self.roi_heads = LibraRoIHeads.from_torchvision(self.roi_heads, roi_reg_loss)
