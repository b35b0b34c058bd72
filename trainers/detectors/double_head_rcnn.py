"""Double-Head R-CNN (Wu et al., "Rethinking Classification and Localization for
Object Detection", CVPR 2020) as a variant of our torchvision Faster R-CNN.

The ROI box head splits in two, as in mmdetection's ``DoubleHeadRoIHead`` with
``DoubleConvFCBBoxHead`` (``dh_faster_rcnn_r50_fpn_1x``):

- the **fc head** (two 1024-d fully connected layers) classifies, from the 7×7 ROI
  features;
- the **conv head** (a residual block lifting 256 → 1024 channels, four ResNet
  bottlenecks, average pooling) regresses the class-specific box deltas, from ROI
  features pooled on the ROI enlarged 1.3× about its centre
  (``reg_roi_scale_factor``; the FPN level is the one of the original ROI).

The losses (paper, Eq. 1–3, with the Double-Head-Ext "unfocused" tasks):

    roi_cls = ω_fc·λ_fc·CE(fc) + ω_conv·(1 − λ_conv)·CE(conv)
    roi_reg = ω_fc·(1 − λ_fc)·REG(fc) + ω_conv·λ_conv·REG(conv)

REG is the configured ``model.losses.roi_reg`` (default smooth L1, β = 1, as the
config), normalised like the Faster R-CNN ROI head. The defaults are mmdetection's
config, the one the ALWA code base ran: ω_fc = 2.0 (``loss_cls.loss_weight``),
ω_conv = 2.0 (``loss_bbox.loss_weight``), λ_fc = λ_conv = 1 (each head does only its
focused task). ``model.double_head`` may set the paper's Double-Head-Ext instead
(λ_fc = 0.7, λ_conv = 0.8, ω_fc = 2.0, ω_conv = 2.5): the fc head then also
regresses and the conv head also classifies, and at test time the two classifiers
are fused as s = s_fc + s_conv·(1 − s_fc) (the paper's complementary fusion); boxes
always come from the conv head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import MultiScaleRoIAlign, boxes as box_ops

from trainers.detectors.two_stage import FasterRCNNWithHeadLosses, RoIHeadsWithHeadLosses
from trainers.errors import ConfigError, choice_error
from trainers.losses import BoxRegressionLoss

REG_ROI_SCALE_FACTOR = 1.3  # mmdetection's DoubleHeadRoIHead
ROI_FEATURE_SIZE = 7
# torchvision's MultiScaleRoIAlign default level mapping: level 4 for a 224-px box.
CANONICAL_SCALE = 224


@dataclass(frozen=True)
class DoubleHeadLossWeights:
    """``model.double_head``: ω_fc, ω_conv (``fc_weight``, ``conv_weight``) and λ_fc, λ_conv."""

    fc_weight: float = 2.0
    conv_weight: float = 2.0
    lambda_fc: float = 1.0
    lambda_conv: float = 1.0

    KEYS = ("fc_weight", "conv_weight", "lambda_fc", "lambda_conv")

    @property
    def fc_regresses(self) -> bool:
        return self.lambda_fc < 1

    @property
    def conv_classifies(self) -> bool:
        return self.lambda_conv < 1

    @classmethod
    def from_config(cls, config: Optional[dict], where: str = "model.double_head") -> "DoubleHeadLossWeights":
        if config is None:
            return cls()
        if not isinstance(config, dict):
            raise ConfigError(where, f"expected a mapping like {{lambda_fc: 0.7}}, got {config!r}.")
        for key in config:
            if not isinstance(key, str) or key not in cls.KEYS:
                raise choice_error(f"{where}.{key}", key, cls.KEYS)
        values = {}
        for key, value in config.items():
            bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            if bad or value < 0 or (key.startswith("lambda") and value > 1):
                allowed = "a number in [0, 1]" if key.startswith("lambda") else "a finite number >= 0"
                raise ConfigError(f"{where}.{key}", f"expected {allowed}, got {value!r}.")
            values[key] = float(value)
        return cls(**values)


def enlarge_boxes(boxes: Tensor, factor: float) -> Tensor:
    """Scale (x1, y1, x2, y2) boxes by ``factor`` about their centres."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    half_sizes = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)
    return torch.cat([centres - half_sizes, centres + half_sizes], dim=1)


class DoubleHeadRoIPool(MultiScaleRoIAlign):
    """Pools every ROI twice: as it is (fc head) and enlarged (conv head).

    The enlarged box is √area·factor larger; a level mapper whose canonical scale is
    multiplied by the same factor picks the level of the original box, as
    mmdetection's ``SingleRoIExtractor`` (levels from the ROIs before rescaling).
    A MultiScaleRoIAlign itself (the fc head's pool), because torchvision's
    FasterRCNN accepts nothing else as ``box_roi_pool``.
    """

    def __init__(self, featmap_names=("0", "1", "2", "3"), sampling_ratio: int = 2,
                 scale_factor: float = REG_ROI_SCALE_FACTOR):
        super().__init__(list(featmap_names), ROI_FEATURE_SIZE, sampling_ratio)
        self.scale_factor = scale_factor
        self.reg_pool = MultiScaleRoIAlign(
            list(featmap_names), ROI_FEATURE_SIZE, sampling_ratio, canonical_scale=CANONICAL_SCALE * scale_factor
        )

    def forward(self, features, proposals: list[Tensor], image_shapes) -> tuple[Tensor, Tensor]:
        enlarged = [enlarge_boxes(p, self.scale_factor) for p in proposals]
        return super().forward(features, proposals, image_shapes), self.reg_pool(features, enlarged, image_shapes)


class ResidualLift(nn.Module):
    """mmdetection's ``BasicResBlock``: 3×3 conv, 1×1 conv to ``out_channels``, plus a
    1×1 projection of the input; BatchNorm after every conv, ReLU at the end."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.identity = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.main(x) + self.identity(x))


class DoubleConvFCHead(nn.Module):
    """(cls features, reg features) → (fc representation, conv representation).

    ``xavier_fc``: mmdetection initialises the fc branch Xavier-uniform. The tiny
    backbone keeps torchvision's default Linear init instead (like the tiny Faster
    R-CNN's TwoMLPHead): on its 32-channel, unnormalised features Xavier's ~2× larger
    weights made the classifier diverge within 100 iterations at lr 0.02.
    """

    def __init__(self, in_channels: int, fc_channels: int = 1024, conv_channels: int = 1024,
                 num_fcs: int = 2, num_convs: int = 4, xavier_fc: bool = True):
        super().__init__()
        fcs: list[nn.Module] = [nn.Flatten()]
        for i in range(num_fcs):
            fc = nn.Linear(in_channels * ROI_FEATURE_SIZE**2 if i == 0 else fc_channels, fc_channels)
            if xavier_fc:
                nn.init.xavier_uniform_(fc.weight)
                nn.init.zeros_(fc.bias)
            fcs += [fc, nn.ReLU(inplace=True)]
        self.fc_branch = nn.Sequential(*fcs)
        self.conv_branch = nn.Sequential(
            ResidualLift(in_channels, conv_channels),
            *[Bottleneck(conv_channels, conv_channels // Bottleneck.expansion) for _ in range(num_convs)],
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc_channels, self.conv_channels = fc_channels, conv_channels

    def forward(self, pooled: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        cls_features, reg_features = pooled
        return self.fc_branch(cls_features), self.conv_branch(reg_features)


def _linear(in_features: int, out_features: int, std: float) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


class DoubleHeadPredictor(nn.Module):
    """The focused outputs (fc → class logits, conv → class-specific deltas) and, for
    Double-Head-Ext, the unfocused ones. Returns a dict: ``fc_cls``, ``conv_reg``
    (+ ``fc_reg``, ``conv_cls``)."""

    def __init__(self, fc_channels: int, conv_channels: int, num_classes: int, weights: DoubleHeadLossWeights):
        super().__init__()
        # mmdetection: classifier N(0, 0.01), regressor N(0, 0.001).
        self.fc_cls = _linear(fc_channels, num_classes, 0.01)
        self.conv_reg = _linear(conv_channels, num_classes * 4, 0.001)
        self.fc_reg = _linear(fc_channels, num_classes * 4, 0.001) if weights.fc_regresses else None
        self.conv_cls = _linear(conv_channels, num_classes, 0.01) if weights.conv_classifies else None

    def forward(self, representations: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        fc, conv = representations
        outputs = {"fc_cls": self.fc_cls(fc), "conv_reg": self.conv_reg(conv)}
        if self.fc_reg is not None:
            outputs["fc_reg"] = self.fc_reg(fc)
        if self.conv_cls is not None:
            outputs["conv_cls"] = self.conv_cls(conv)
        return outputs


class DoubleHeadRoIHeads(RoIHeadsWithHeadLosses):
    """ROI heads of Double-Head R-CNN: losses composed as in the module docstring."""

    def __init__(self, *args, loss_weights: DoubleHeadLossWeights = DoubleHeadLossWeights(), **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_weights = loss_weights

    @classmethod
    def from_torchvision(cls, roi_heads, reg_loss: BoxRegressionLoss,
                         loss_weights: DoubleHeadLossWeights = DoubleHeadLossWeights()) -> "DoubleHeadRoIHeads":
        heads = super().from_torchvision(roi_heads, reg_loss)
        heads.loss_weights = loss_weights
        return heads

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        outputs = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals, image_shapes)))
        if not self.training:
            return self.detections(self.class_scores(outputs), outputs["conv_reg"], proposals, image_shapes), {}
        matched_gt_boxes = [
            t["boxes"][idxs] if t["boxes"].numel() > 0 else torch.zeros_like(p)
            for t, idxs, p in zip(targets, matched_idxs, proposals)
        ]
        return [], self.double_head_losses(outputs, proposals, labels, regression_targets, matched_gt_boxes)

    def double_head_losses(self, outputs, proposals, labels, regression_targets, matched_gt_boxes):
        """roi_cls / roi_reg composed from the focused (and unfocused) tasks' losses."""
        w = self.loss_weights
        # The focused pair is the one used at test time: it sets the KPIs.
        focused = self.compute_head_losses(
            outputs["fc_cls"], outputs["conv_reg"], proposals, labels, regression_targets, matched_gt_boxes
        )
        roi_cls = w.fc_weight * w.lambda_fc * focused["roi_cls"]
        roi_reg = w.conv_weight * w.lambda_conv * focused["roi_reg"]
        if w.fc_regresses or w.conv_classifies:
            kpis = self.kpis
            unfocused = self.compute_head_losses(
                outputs.get("conv_cls", outputs["fc_cls"]), outputs.get("fc_reg", outputs["conv_reg"]),
                proposals, labels, regression_targets, matched_gt_boxes,
            )
            self.kpis = kpis
            if w.conv_classifies:
                roi_cls = roi_cls + w.conv_weight * (1 - w.lambda_conv) * unfocused["roi_cls"]
            if w.fc_regresses:
                roi_reg = roi_reg + w.fc_weight * (1 - w.lambda_fc) * unfocused["roi_reg"]
        return {"roi_cls": roi_cls, "roi_reg": roi_reg}

    def class_scores(self, outputs: dict[str, Tensor]) -> Tensor:
        """Softmax of the fc head; with a conv classifier, the complementary fusion."""
        scores = F.softmax(outputs["fc_cls"].float(), dim=-1)
        if "conv_cls" in outputs:
            scores = scores + F.softmax(outputs["conv_cls"].float(), dim=-1) * (1 - scores)
        return scores

    def detections(self, scores: Tensor, box_regression: Tensor, proposals, image_shapes) -> list[dict[str, Tensor]]:
        """torchvision's ``postprocess_detections`` from class scores (not logits, which the
        fused scores have none of): per class, score > ``score_thresh``, NMS, top ``detections_per_img``."""
        num_classes = scores.shape[-1]
        boxes_per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        results = []
        for boxes, image_scores, image_shape in zip(
            pred_boxes.split(boxes_per_image), scores.split(boxes_per_image), image_shapes
        ):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)[:, 1:].reshape(-1, 4)  # drop background
            labels = torch.arange(1, num_classes, device=scores.device).repeat(image_scores.shape[0])
            image_scores = image_scores[:, 1:].reshape(-1)
            keep = torch.where(image_scores > self.score_thresh)[0]
            boxes, image_scores, labels = boxes[keep], image_scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, image_scores, labels = boxes[keep], image_scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, image_scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "labels": labels[keep], "scores": image_scores[keep]})
        return results


class DoubleHeadRCNNWithHeadLosses(FasterRCNNWithHeadLosses):
    """Faster R-CNN whose box head is Double-Head's; train forward → {rpn_cls, rpn_reg,
    roi_cls, roi_reg}. ``fc_channels`` / ``conv_channels`` / ``num_convs`` size the head
    (1024 / 1024 / 4 in the config); ``xavier_fc`` see :class:`DoubleConvFCHead`."""

    def __init__(
        self,
        backbone,
        num_classes: int,
        rpn_reg_loss: BoxRegressionLoss,
        roi_reg_loss: BoxRegressionLoss,
        loss_weights: DoubleHeadLossWeights = DoubleHeadLossWeights(),
        fc_channels: int = 1024,
        conv_channels: int = 1024,
        num_convs: int = 4,
        xavier_fc: bool = True,
        **kwargs,
    ):
        box_head = DoubleConvFCHead(
            backbone.out_channels, fc_channels, conv_channels, num_convs=num_convs, xavier_fc=xavier_fc
        )
        super().__init__(
            backbone,
            None,  # the predictor below has the outputs
            rpn_reg_loss,
            roi_reg_loss,
            box_roi_pool=DoubleHeadRoIPool(),
            box_head=box_head,
            box_predictor=DoubleHeadPredictor(fc_channels, conv_channels, num_classes, loss_weights),
            **kwargs,
        )
        self.roi_heads = DoubleHeadRoIHeads.from_torchvision(self.roi_heads, roi_reg_loss, loss_weights)
