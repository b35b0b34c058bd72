"""``model:`` config → detector. One plain dict from name to builder, validated up front.

```yaml
model:
  detector: faster_rcnn      # faster_rcnn | retinanet | mask_rcnn | libra_rcnn | dynamic_rcnn | double_head_rcnn
  backbone: resnet50         # tiny | resnet50 | resnet101
  pretrained: imagenet       # none | imagenet (read from the torch hub cache, never downloaded)
  num_classes: 20            # object classes without background; models get K+1 outputs
  min_size: 600              # GeneralizedRCNNTransform: short side ...
  max_size: 1000             # ... and long-side cap (mmdetection's scale (1000, 600))
  losses:                    # regression loss per head (trainers/losses.py)
    rpn_reg: {type: l1}      # two-stage detectors
    roi_reg: {type: l1}      # two-stage detectors
    retina_reg: {type: l1}   # RetinaNet
  double_head: {...}         # double_head_rcnn only: loss weights (double_head_rcnn.py)
```
Settings of the R50/R101 models follow mmdetection's configs used by the paper
(sampling 256 anchors at 0.7/0.3 IoU in the RPN, 512 ROIs with 25 % positives,
1000 proposals per image, 100 detections at score ≥ 0.05 and NMS 0.5). The tiny
backbone keeps the same layout with smaller heads and anchors.

The Table 3 detectors (libra_rcnn.py, dynamic_rcnn.py, double_head_rcnn.py) are
Faster R-CNN variants. Their ROI box loss defaults to their mmdetection config's
(``DEFAULT_LOSSES``); a user's ``model.losses.roi_reg`` is merged over that default
key by key, so ``{loss_weight: 2}`` keeps the type and ``{type: l1}`` replaces it.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial
from typing import Callable

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from trainers.detectors.backbones import (
    anchor_generator,
    build_backbone,
    imagenet_weights_path,
    load_imagenet_state_dict,
)
from trainers.detectors.double_head_rcnn import DoubleHeadLossWeights, DoubleHeadRCNNWithHeadLosses
from trainers.detectors.dynamic_rcnn import DynamicRCNNWithHeadLosses
from trainers.detectors.libra_rcnn import LibraRCNNWithHeadLosses
from trainers.detectors.mmdet_parity import AlignedMultiScaleRoIAlign, init_box_head_like_mmdet, parity_of
from trainers.detectors.retinanet import RetinaNetWithHeadLosses
from trainers.detectors.two_stage import FasterRCNNWithHeadLosses, MaskRCNNWithHeadLosses
from trainers.errors import ConfigError
from trainers.losses import regression_loss_from_config

LOSS_KEYS_BY_DETECTOR = {
    "faster_rcnn": ("rpn_reg", "roi_reg"),
    "mask_rcnn": ("rpn_reg", "roi_reg"),
    "retinanet": ("retina_reg",),
    "libra_rcnn": ("rpn_reg", "roi_reg"),
    "dynamic_rcnn": ("rpn_reg", "roi_reg"),
    "double_head_rcnn": ("rpn_reg", "roi_reg"),
}
# The box loss of each detector's mmdetection config where it is not the paper's L1
# (the RPN keeps L1 everywhere, as in the ALWA release).
DEFAULT_LOSSES = {
    "libra_rcnn": {"roi_reg": {"type": "balanced_l1", "alpha": 0.5, "gamma": 1.5, "beta": 1.0}},
    "dynamic_rcnn": {"roi_reg": {"type": "smooth_l1", "beta": 1.0}},  # the starting beta
    "double_head_rcnn": {"roi_reg": {"type": "smooth_l1", "beta": 1.0}},
}


def resolve_model_losses(detector: str, losses: dict, double_head: dict | None) -> tuple[dict, dict | None]:
    """Each regression head's loss settings (the detector's default merged under the
    user's) and Double-Head's loss weights, as plain dicts; ConfigError on bad values.
    Called once, by the typed config (``trainers.config.ModelConfig``)."""
    allowed = LOSS_KEYS_BY_DETECTOR[detector]
    for head in losses:
        if head not in allowed:
            raise ConfigError(f"model.losses.{head}", f"no such regression head in {detector}.",
                              f"Allowed keys: {', '.join(allowed)}.")
    defaults = DEFAULT_LOSSES.get(detector, {})
    resolved = {head: regression_loss_from_config(_over_default(defaults.get(head), losses.get(head)),
                                                  f"model.losses.{head}")
                for head in allowed}
    roi_loss = resolved.get("roi_reg")
    if detector == "dynamic_rcnn" and roi_loss.type == "smooth_l1" and roi_loss.beta == 0:
        raise ConfigError(
            "model.losses.roi_reg.beta", "is the starting beta Dynamic R-CNN adapts: it must be > 0.",
            "Use the config's 1.0, or type: l1 for a loss without beta.",
        )
    if double_head is not None and detector != "double_head_rcnn":
        raise ConfigError("model.double_head", f"is a setting of double_head_rcnn, not of {detector}.",
                          "Remove it.")
    weights = None
    if detector == "double_head_rcnn":
        weights = dataclasses.asdict(DoubleHeadLossWeights.from_config(double_head, "model.double_head"))
    return {head: dataclasses.asdict(loss) for head, loss in resolved.items()}, weights


def _over_default(default: dict | None, user):
    """The user's loss settings merged over the detector's default, key by key; a user
    entry of another type replaces the default (its hyper-parameters would not apply)."""
    if user is None:
        return dict(default) if default is not None else None
    if default is None or not isinstance(user, dict) or user.get("type", default["type"]) != default["type"]:
        return user  # from_config checks it
    return {**default, **user}


def head_losses(model) -> dict:
    """Each regression head's :class:`~trainers.losses.BoxRegressionLoss` (resolved settings)."""
    return {head: regression_loss_from_config(loss, f"model.losses.{head}") for head, loss in model.losses.items()}


def check_pretrained_weights(model) -> None:
    """ImageNet weights, when asked for, must be in this machine's torch hub cache
    (nothing is downloaded): a ConfigError saying where the file goes otherwise."""
    if model.pretrained == "imagenet" and not os.path.isfile(imagenet_weights_path(model.backbone)):
        load_imagenet_state_dict(model.backbone)  # raises the ConfigError naming the file


def build_detector(model) -> nn.Module:
    """The detector of a ``model`` section (a :class:`~trainers.config.ModelConfig`, or
    a mapping, parsed into one); train forward → dict of raw head losses."""
    from trainers.config import parse_model

    model = parse_model(model)
    if model.num_classes is None:
        raise ConfigError(
            "model.num_classes", "is required to build a detector.", "Set it to the number of object classes."
        )
    cfg = model.model_dump()
    cfg["min_size"] = model.min_size or 600
    cfg["max_size"] = model.max_size or 1000
    cfg["losses"] = head_losses(model)
    if model.double_head is not None:
        cfg["double_head"] = DoubleHeadLossWeights(**model.double_head)
    return DETECTORS[model.detector](cfg)


def _two_stage_settings(cfg: dict, with_masks: bool) -> dict:
    """Keyword arguments of torchvision's FasterRCNN / MaskRCNN for this backbone."""
    num_outputs = cfg["num_classes"] + 1  # + background (index 0), torchvision's convention
    parity = parity_of(cfg)
    settings = dict(
        min_size=cfg["min_size"],
        max_size=cfg["max_size"],
        rpn_anchor_generator=anchor_generator(cfg["backbone"], for_retinanet=False, parity=parity),
        # mmdetection: 2000 per level before NMS, 1000 kept after (torchvision: 2000).
        rpn_post_nms_top_n_train=1000,
        box_detections_per_img=100,
        parity=parity,
    )
    if parity == "mmdet":  # RoIAlign(aligned=True, sampling_ratio=0), mmcv's defaults in the configs
        settings["box_roi_pool"] = AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 7)
        if with_masks:
            settings["mask_roi_pool"] = AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 14)
    if cfg["backbone"] == "tiny":
        # Small images: fewer proposals and ROIs, a narrow box head (speed on CPU).
        channels, representation = 32, 256
        settings.update(
            rpn_pre_nms_top_n_train=500,
            rpn_pre_nms_top_n_test=500,
            rpn_post_nms_top_n_train=300,
            rpn_post_nms_top_n_test=300,
            box_batch_size_per_image=64,
            box_head=TwoMLPHead(channels * 7 * 7, representation),
            box_predictor=FastRCNNPredictor(representation, num_outputs),
            num_classes=None,
        )
        if with_masks:
            settings.update(
                mask_head=MaskRCNNHeads(channels, (channels, channels), 1),
                mask_predictor=MaskRCNNPredictor(channels, channels, num_outputs),
            )
    else:
        settings["num_classes"] = num_outputs
    return settings


def _mmdet_box_head_init(model: nn.Module, cfg: dict) -> nn.Module:
    """Under parity mmdet, a Shared2FC box head starts as mmdetection's (mmdet_parity.py)."""
    heads = model.roi_heads
    if parity_of(cfg) == "mmdet" and isinstance(heads.box_head, TwoMLPHead) and isinstance(
        heads.box_predictor, FastRCNNPredictor
    ):
        init_box_head_like_mmdet(heads.box_head, heads.box_predictor)
    return model


def _build_two_stage(cfg: dict, model_class, with_masks: bool) -> nn.Module:
    backbone = build_backbone(cfg["backbone"], cfg["pretrained"], for_retinanet=False, parity=parity_of(cfg))
    settings = _two_stage_settings(cfg, with_masks=with_masks)
    num_classes = settings.pop("num_classes")
    model = model_class(backbone, num_classes, cfg["losses"]["rpn_reg"], cfg["losses"]["roi_reg"], **settings)
    return _mmdet_box_head_init(model, cfg)


def build_faster_rcnn(cfg: dict) -> nn.Module:
    return _build_two_stage(cfg, FasterRCNNWithHeadLosses, with_masks=False)


def build_mask_rcnn(cfg: dict) -> nn.Module:
    return _build_two_stage(cfg, MaskRCNNWithHeadLosses, with_masks=True)


def build_retinanet(cfg: dict) -> nn.Module:
    parity = parity_of(cfg)
    backbone = build_backbone(cfg["backbone"], cfg["pretrained"], for_retinanet=True, parity=parity)
    # The head's four convs start from N(0, 0.01) weights, sized for 256 channels
    # (mmdetection's and torchvision's head has no norm). On the tiny backbone's 32
    # channels each conv shrinks activations ~6×, so the tower's output and gradients
    # vanish and the classifier barely learns: GroupNorm after each conv keeps them
    # at scale there (torchvision's RetinaNet v2 head does the same).
    head_norm_layer = partial(nn.GroupNorm, 8) if cfg["backbone"] == "tiny" else None
    return RetinaNetWithHeadLosses(
        backbone,
        cfg["num_classes"] + 1,  # column 0 unused (background), so labels 1..K line up
        anchor_generator(cfg["backbone"], for_retinanet=True, parity=parity),
        cfg["losses"]["retina_reg"],
        head_norm_layer=head_norm_layer,
        parity=parity,
        min_size=cfg["min_size"],
        max_size=cfg["max_size"],
        detections_per_img=100,  # mmdetection max_per_img (torchvision: 300)
    )


def _table3_settings(cfg: dict) -> tuple[nn.Module, int, dict]:
    """Backbone, number of outputs and FasterRCNN settings shared by the Table 3 detectors."""
    backbone = build_backbone(cfg["backbone"], cfg["pretrained"], for_retinanet=False, parity=parity_of(cfg))
    settings = _two_stage_settings(cfg, with_masks=False)
    settings.pop("num_classes")
    num_outputs = cfg["num_classes"] + 1
    return backbone, num_outputs, settings


def build_libra_rcnn(cfg: dict) -> nn.Module:
    backbone, num_outputs, settings = _table3_settings(cfg)
    num_classes = None if "box_predictor" in settings else num_outputs
    model = LibraRCNNWithHeadLosses(
        backbone, num_classes, cfg["losses"]["rpn_reg"], cfg["losses"]["roi_reg"], **settings
    )
    return _mmdet_box_head_init(model, cfg)


def build_dynamic_rcnn(cfg: dict) -> nn.Module:
    backbone, num_outputs, settings = _table3_settings(cfg)
    num_classes = None if "box_predictor" in settings else num_outputs
    model = DynamicRCNNWithHeadLosses(
        backbone, num_classes, cfg["losses"]["rpn_reg"], cfg["losses"]["roi_reg"], **settings
    )
    return _mmdet_box_head_init(model, cfg)


def build_double_head_rcnn(cfg: dict) -> nn.Module:
    backbone, num_outputs, settings = _table3_settings(cfg)
    settings.pop("box_head", None)
    settings.pop("box_predictor", None)
    settings.pop("box_roi_pool", None)  # its own two pools (torchvision RoIAlign under both parities)
    if cfg["backbone"] == "tiny":
        # Narrow and one bottleneck deep (4 in the config): CPU speed, like the tiny Faster R-CNN head.
        head_size = dict(fc_channels=256, conv_channels=64, num_convs=1, xavier_fc=False)
    else:
        head_size = dict(fc_channels=1024, conv_channels=1024, num_convs=4)  # mmdetection's DoubleConvFCBBoxHead
    weights = cfg.get("double_head") or DoubleHeadLossWeights()
    return DoubleHeadRCNNWithHeadLosses(
        backbone, num_outputs, cfg["losses"]["rpn_reg"], cfg["losses"]["roi_reg"],
        loss_weights=weights, **head_size, **settings,
    )


DETECTORS: dict[str, Callable[[dict], nn.Module]] = {
    "faster_rcnn": build_faster_rcnn,
    "retinanet": build_retinanet,
    "mask_rcnn": build_mask_rcnn,
    "libra_rcnn": build_libra_rcnn,
    "dynamic_rcnn": build_dynamic_rcnn,
    "double_head_rcnn": build_double_head_rcnn,
}
