"""``model.parity: mmdet``: the mmdetection 2.x behaviours the released ALWA code trains with.

Our detectors are torchvision's; where torchvision and mmdetection 2.7 (the paper's
code base) differ in a way that changes training, ``parity: mmdet`` switches to
mmdetection's behaviour, one small piece each (docs/fidelity.md lists them all with
their measured effect; ``parity: torchvision`` keeps torchvision's):

- :class:`ValidFlagAnchorGenerator`: anchors whose feature-map location lies outside the
  image's own extent padded to 32 px are *invalid*: never assigned, never sampled, no
  loss (mmdet ``AnchorGenerator.valid_flags`` on ``img_meta['pad_shape']``; with the
  released ``allowed_border=-1``, ``anchor_inside_flags`` adds nothing). torchvision
  assigns every anchor of the padded batch, so in a batch of a portrait and a landscape
  image the padding of each adds easy negatives (and can take sampled slots).
- :func:`max_iou_assign`: mmdet's ``MaxIoUAssigner``: a gt's best anchors become
  positives only if their IoU ≥ ``min_pos_iou`` (RPN 0.3, RetinaNet 0), they are
  assigned to *that* gt (torchvision keeps the anchor's own best gt), later gts win ties.
- :class:`NormEvalBatchNorm2d`: ResNet BatchNorm as ``norm_eval=True`` with
  ``requires_grad=True``: running statistics frozen (always in eval mode), affine
  parameters trained in stages 2–4 (``frozen_stages=1`` freezes the stem and stage 1).
  torchvision's ``FrozenBatchNorm2d`` freezes the affine parameters too.
- :class:`AlignedMultiScaleRoIAlign`: RoIAlign with ``aligned=True`` (half-pixel
  offset) and ``sampling_ratio=0`` (adaptive), mmcv's defaults used by the configs;
  torchvision's ``MultiScaleRoIAlign`` uses ``aligned=False, sampling_ratio=2``.
- :func:`init_box_head_like_mmdet`: ``Shared2FCBBoxHead`` init: Xavier-uniform shared
  fcs, N(0, 0.01) classifier, N(0, 0.001) box regressor, zero biases (torchvision:
  PyTorch's default ``nn.Linear`` init).
- :func:`init_fpn_like_mmdet`: FPN convs Xavier-uniform, zero bias (torchvision:
  Kaiming-uniform with a = 1; the two differ on the lateral convs from C3–C5).
- :class:`LastLevelP6P7NoReLU`: RetinaNet's P6 = conv(C5) (``add_extra_convs='on_input'``,
  as torchvision) and P7 = conv(P6) *without* the ReLU torchvision applies
  (``relu_before_extra_convs=False``).

Batches grouped by aspect ratio (mmdet's ``GroupSampler``) are a data-loading matter:
:class:`trainers.sampling.GroupedEpochSampler`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from trainers.errors import choice_error

PARITIES = ("torchvision", "mmdet")
PAD_DIVISOR = 32  # mmdet Pad(size_divisor=32) in every released pipeline

# mmdet MaxIoUAssigner settings of the released configs (models/*.py, train_cfg)
RPN_ASSIGNER = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True)
RETINA_ASSIGNER = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0, match_low_quality=True)

NEGATIVE, IGNORED = -1, -2  # torchvision Matcher's BELOW_LOW_THRESHOLD / BETWEEN_THRESHOLDS


def parity_of(model_cfg: dict) -> str:
    """``model.parity`` of a model config (default torchvision), checked."""
    parity = model_cfg.get("parity", "torchvision")
    if parity is None:
        return "torchvision"
    if not isinstance(parity, str) or parity not in PARITIES:
        raise choice_error("model.parity", parity, PARITIES)
    return parity


# ---------------------------------------------------------------- anchors


def single_level_valid_flags(feature_size: tuple[int, int], stride: tuple[int, int], num_anchors: int,
                             image_size: tuple[int, int], device=None) -> Tensor:
    """Valid flags of one level's anchors for one image, location-major with the
    ``num_anchors`` anchors of a location contiguous (torchvision's and mmdet's order).

    A location (y, x) is valid when x < ceil(pad_w / stride_w) and y < ceil(pad_h /
    stride_h), pad_* the image's size rounded up to a multiple of 32.
    """
    feat_h, feat_w = int(feature_size[0]), int(feature_size[1])
    pad_h = math.ceil(image_size[0] / PAD_DIVISOR) * PAD_DIVISOR
    pad_w = math.ceil(image_size[1] / PAD_DIVISOR) * PAD_DIVISOR
    valid_h = min(math.ceil(pad_h / stride[0]), feat_h)
    valid_w = min(math.ceil(pad_w / stride[1]), feat_w)
    rows = torch.arange(feat_h, device=device) < valid_h
    cols = torch.arange(feat_w, device=device) < valid_w
    valid = rows[:, None] & cols[None, :]
    return valid.reshape(-1, 1).expand(-1, num_anchors).reshape(-1)


class ValidFlagAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator that also records each image's valid flags.

    After each forward, ``valid_flags`` holds one bool tensor per image, aligned with
    the anchors returned (all levels concatenated).
    """

    def __init__(self, sizes, aspect_ratios):
        super().__init__(sizes, aspect_ratios)
        self.valid_flags: list[Tensor] = []

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        anchors = super().forward(image_list, feature_maps)
        batch_h, batch_w = image_list.tensors.shape[-2:]
        device = feature_maps[0].device
        per_location = self.num_anchors_per_location()
        levels = [(f.shape[-2], f.shape[-1]) for f in feature_maps]
        strides = [(batch_h // h, batch_w // w) for h, w in levels]
        self.valid_flags = [
            torch.cat([single_level_valid_flags(size, stride, n, tuple(image_size), device)
                       for size, stride, n in zip(levels, strides, per_location)])
            for image_size in image_list.image_sizes
        ]
        return anchors


# ---------------------------------------------------------------- assignment


def max_iou_assign(iou: Tensor, *, pos_iou_thr: float, neg_iou_thr: float, min_pos_iou: float,
                   match_low_quality: bool = True, valid: Tensor | None = None) -> Tensor:
    """mmdet 2.x ``MaxIoUAssigner`` (``gt_max_assign_all=True``, no ignore regions).

    ``iou``: (G, A) IoU of the gts with the anchors; ``valid``: (A,) bool, invalid
    anchors are neither assigned nor compared. Returns (A,) long: the gt index of
    positives, :data:`NEGATIVE` (-1) for background, :data:`IGNORED` (-2) for anchors
    between the thresholds and invalid anchors (torchvision Matcher's convention).
    """
    num_gts, num_anchors = iou.shape
    device = iou.device
    valid = torch.ones(num_anchors, dtype=torch.bool, device=device) if valid is None else valid
    assigned = torch.full((num_anchors,), IGNORED, dtype=torch.long, device=device)
    if num_gts == 0:
        assigned[valid] = NEGATIVE
        return assigned
    overlaps = iou[:, valid]
    result = torch.full((overlaps.shape[1],), IGNORED, dtype=torch.long, device=device)
    if overlaps.shape[1] == 0:
        return assigned
    max_overlaps, argmax_overlaps = overlaps.max(dim=0)
    result[(max_overlaps >= 0) & (max_overlaps < neg_iou_thr)] = NEGATIVE
    positive = max_overlaps >= pos_iou_thr
    result[positive] = argmax_overlaps[positive]
    if match_low_quality:
        gt_max = overlaps.max(dim=1).values
        # Anchors that tie a gt's best IoU, for gts whose best reaches min_pos_iou; the
        # last such gt wins (mmdet loops over the gts in order and overwrites).
        ties = (overlaps == gt_max[:, None]) & (gt_max >= min_pos_iou)[:, None]
        has_tie = ties.any(dim=0)
        last_gt = num_gts - 1 - ties.flip(0).to(torch.uint8).argmax(dim=0)
        result[has_tie] = last_gt[has_tie]
    assigned[valid] = result
    return assigned


# ---------------------------------------------------------------- backbone and necks


class NormEvalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that stays in eval mode (running statistics never updated) while its
    affine parameters can train: mmdet ResNet's ``norm_eval=True`` with
    ``norm_cfg=dict(type='BN', requires_grad=True)``."""

    def train(self, mode: bool = True):
        return super().train(False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # ImageNet files of torchvision have no num_batches_tracked (never read in eval).
        state_dict.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class LastLevelP6P7NoReLU(ExtraFPNBlock):
    """P6 = conv3x3/2(C5), P7 = conv3x3/2(P6): mmdet FPN ``add_extra_convs='on_input'``,
    ``relu_before_extra_convs=False`` (torchvision's LastLevelP6P7 puts a ReLU before P7)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for module in (self.p6, self.p7):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]):
        p6 = self.p6(c[-1])
        p7 = self.p7(p6)
        return p + [p6, p7], names + ["p6", "p7"]


def init_fpn_like_mmdet(fpn: nn.Module) -> None:
    """Xavier-uniform weights, zero biases for every conv of an FPN (mmdet FPN.init_weights)."""
    for module in fpn.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


# ---------------------------------------------------------------- ROI head


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign with ``aligned=True`` and ``sampling_ratio=0`` (mmcv RoIAlign as
    in mmdet's SingleRoIExtractor); the level mapping is torchvision's, which equals
    mmdet's ``floor(log2(sqrt(wh) / 56))`` clamped to P2–P5."""

    def __init__(self, featmap_names: list[str], output_size: int):
        super().__init__(featmap_names, output_size, sampling_ratio=0)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        x_filtered = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                x_filtered, image_shapes, self.canonical_scale, self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        first = x_filtered[0]
        result = first.new_zeros((rois.shape[0], first.shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(x_filtered, self.scales)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[index], self.output_size, spatial_scale=scale,
                               sampling_ratio=0, aligned=True)
            result.index_put_((index,), pooled.to(result.dtype))
        return result


def init_box_head_like_mmdet(box_head: nn.Module, box_predictor: nn.Module) -> None:
    """mmdet Shared2FCBBoxHead init: Xavier-uniform fcs, N(0, 0.01) cls, N(0, 0.001) reg, zero biases."""
    for module in box_head.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(box_predictor.cls_score.weight, 0.0, 0.01)
    nn.init.zeros_(box_predictor.cls_score.bias)
    nn.init.normal_(box_predictor.bbox_pred.weight, 0.0, 0.001)
    nn.init.zeros_(box_predictor.bbox_pred.bias)
