"""Backbones with a feature pyramid, their anchors, and ImageNet weight loading.

- ``resnet50`` / ``resnet101``: torchvision's ResNet + FPN, set up like mmdetection's
  R50/R101-FPN configs (the paper's): with ImageNet weights the stem and ``layer1``
  are frozen and BatchNorm is frozen (``frozen_stages=1, norm_eval=True``); without
  them everything trains with ordinary BatchNorm (torchvision's convention for
  training from scratch). Two-stage detectors use P2–P6 (P6 = max-pool of P5);
  RetinaNet uses P3–P7 with P6 computed from C5 (mmdetection's
  ``add_extra_convs='on_input'``).
- ``tiny``: five stride-2 convolutions + torchvision's FeaturePyramidNetwork with
  32 channels, for tests, demos and CPU benchmarks on ~128 px images; its anchors are
  scaled down accordingly (8–128 px instead of 32–512 px).

No weights are ever downloaded (the machines that run this have no internet): ImageNet
weights are read from the torch hub cache, and a missing file is a ConfigError that
says where to put it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from urllib.parse import urlparse

import torch
from torch import nn, Tensor
from torchvision import models
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import FeaturePyramidNetwork, misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from trainers.detectors.mmdet_parity import (
    LastLevelP6P7NoReLU,
    NormEvalBatchNorm2d,
    ValidFlagAnchorGenerator,
    init_fpn_like_mmdet,
)
from trainers.errors import ConfigError

BACKBONES = ("tiny", "resnet50", "resnet101")
PRETRAINED_CHOICES = ("none", "imagenet")

# mmdetection loads 'torchvision://resnet50', i.e. torchvision's original (V1) weights.
IMAGENET_WEIGHTS = {
    "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": models.ResNet101_Weights.IMAGENET1K_V1,
}

TINY_OUT_CHANNELS = 32
RESNET_FPN_CHANNELS = 256


class TinyBackbone(nn.Module):
    """A few stride-2 conv stages (C2–C5 at strides 4–32) followed by an FPN.

    Returns an OrderedDict of feature maps like torchvision's BackboneWithFPN, so the
    detectors (and MultiScaleRoIAlign's featmap names "0"–"3") see no difference.
    """

    STAGE_CHANNELS = (24, 32, 48, 64)  # C2, C3, C4, C5

    def __init__(self, for_retinanet: bool, out_channels: int = TINY_OUT_CHANNELS, parity: str = "torchvision"):
        super().__init__()
        self.stem = misc_nn_ops.Conv2dNormActivation(3, 16, kernel_size=3, stride=2)
        stages = []
        in_channels = 16
        for channels in self.STAGE_CHANNELS:
            stages.append(misc_nn_ops.Conv2dNormActivation(in_channels, channels, kernel_size=3, stride=2))
            in_channels = channels
        self.stages = nn.ModuleList(stages)
        # Two-stage: P2-P5 + max-pooled P6. RetinaNet: P3-P5 + P6/P7 from C5.
        self.first_pyramid_stage = 1 if for_retinanet else 0
        pyramid_inputs = list(self.STAGE_CHANNELS[self.first_pyramid_stage :])
        p6p7 = LastLevelP6P7NoReLU if parity == "mmdet" else LastLevelP6P7
        extra_block = p6p7(self.STAGE_CHANNELS[-1], out_channels) if for_retinanet else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(pyramid_inputs, out_channels, extra_blocks=extra_block)
        if parity == "mmdet":
            init_fpn_like_mmdet(self.fpn)
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> "OrderedDict[str, Tensor]":
        x = self.stem(images)
        stage_outputs = OrderedDict()
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index >= self.first_pyramid_stage:
                stage_outputs[str(index - self.first_pyramid_stage)] = x
        return self.fpn(stage_outputs)


def imagenet_weights_path(backbone: str) -> str:
    """Where torch hub caches the ImageNet weights of ``backbone`` (it may not exist)."""
    filename = os.path.basename(urlparse(IMAGENET_WEIGHTS[backbone].url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def load_imagenet_state_dict(backbone: str) -> dict:
    """Read the cached ImageNet weights of ``backbone``, never downloading them."""
    field = "model.pretrained"
    if backbone not in IMAGENET_WEIGHTS:
        raise ConfigError(
            field,
            f"no ImageNet weights exist for backbone {backbone!r}.",
            f"Use pretrained: none, or a backbone among {', '.join(sorted(IMAGENET_WEIGHTS))}.",
        )
    path = imagenet_weights_path(backbone)
    if not os.path.isfile(path):
        raise ConfigError(
            field,
            f"ImageNet weights for {backbone} are not in the torch hub cache ({path} is missing) "
            "and this machine cannot download them.",
            f"Copy {os.path.basename(path)} (from {IMAGENET_WEIGHTS[backbone].url}) to {path} "
            "(or set TORCH_HOME to a folder whose hub/checkpoints/ holds it), or use pretrained: none.",
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which one
        raise ConfigError(field, f"cannot read the cached weights {path}: {error}.", "Replace the file.") from error


def resnet_fpn(backbone: str, pretrained: bool, for_retinanet: bool, parity: str = "torchvision") -> BackboneWithFPN:
    """torchvision's ResNet-FPN, optionally with the cached ImageNet weights loaded.

    ``parity="mmdet"`` (trainers/detectors/mmdet_parity.py): with ImageNet weights,
    BatchNorm keeps its statistics frozen but trains its affine parameters in stages
    2–4; the FPN convs start Xavier-uniform; RetinaNet's P7 has no ReLU before it.
    """
    # Read the weights first: a missing file should fail before the network is built.
    state_dict = load_imagenet_state_dict(backbone) if pretrained else None
    if pretrained:
        frozen_bn = NormEvalBatchNorm2d if parity == "mmdet" else misc_nn_ops.FrozenBatchNorm2d
        norm_layer, trainable_layers = frozen_bn, 3
    else:
        norm_layer, trainable_layers = nn.BatchNorm2d, 5
    if for_retinanet:
        returned_layers = [2, 3, 4]
        extra_blocks = (LastLevelP6P7NoReLU if parity == "mmdet" else LastLevelP6P7)(2048, RESNET_FPN_CHANNELS)
    else:
        returned_layers = [1, 2, 3, 4]
        extra_blocks = LastLevelMaxPool()
    model = resnet_fpn_backbone(
        backbone_name=backbone,
        weights=None,  # never the weights API's download path; loaded below from the cache
        norm_layer=norm_layer,
        trainable_layers=trainable_layers,
        returned_layers=returned_layers,
        extra_blocks=extra_blocks,
    )
    if parity == "mmdet":
        init_fpn_like_mmdet(model.fpn)
    if state_dict is not None:
        # The classifier is not part of the detection backbone.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        try:
            model.body.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise ConfigError(
                "model.pretrained",
                f"the cached file {imagenet_weights_path(backbone)} does not hold {backbone} weights: {error}",
                "Replace the file.",
            ) from error
    return model


def build_backbone(backbone: str, pretrained: str, for_retinanet: bool, parity: str = "torchvision") -> nn.Module:
    if backbone == "tiny":
        if pretrained == "imagenet":
            raise ConfigError(
                "model.pretrained", "the tiny backbone has no ImageNet weights.", "Use pretrained: none."
            )
        return TinyBackbone(for_retinanet, parity=parity)
    return resnet_fpn(backbone, pretrained == "imagenet", for_retinanet, parity=parity)


def anchor_generator(backbone: str, for_retinanet: bool, parity: str = "torchvision") -> AnchorGenerator:
    """Anchors as in mmdetection (tiny: the same layout scaled to small images).

    Two-stage: one size per level (scale 8 × strides 4–64 → 32–512 px), ratios
    0.5/1/2. RetinaNet: octave base scale 4, 3 scales per octave × strides 8–128 →
    32·2^(k/3) … , ratios 0.5/1/2 (torchvision truncates these sizes to integers;
    mmdetection keeps them fractional, so do we).
    """
    base_sizes = (8, 16, 32, 64, 128) if backbone == "tiny" else (32, 64, 128, 256, 512)
    if for_retinanet:
        sizes = tuple(tuple(base * 2 ** (k / 3) for k in range(3)) for base in base_sizes)
    else:
        sizes = tuple((base,) for base in base_sizes)
    aspect_ratios = ((0.5, 1.0, 2.0),) * len(sizes)
    if parity == "mmdet":  # also records each image's valid anchors (mmdet valid_flags)
        return ValidFlagAnchorGenerator(sizes, aspect_ratios)
    return AnchorGenerator(sizes, aspect_ratios)
