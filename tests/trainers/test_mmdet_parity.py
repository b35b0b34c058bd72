"""``model.parity: mmdet`` pieces (trainers/detectors/mmdet_parity.py), each against an
independent computation on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import box_iou

from trainers.detectors import backbones, build_detector
from trainers.detectors.mmdet_parity import (
    AlignedMultiScaleRoIAlign,
    LastLevelP6P7NoReLU,
    NormEvalBatchNorm2d,
    ValidFlagAnchorGenerator,
    init_box_head_like_mmdet,
    init_fpn_like_mmdet,
    max_iou_assign,
    parity_of,
)
from trainers.errors import ConfigError


# ---------------------------------------------------------------- valid flags


def test_valid_flags_are_anchors_centred_inside_the_images_padded_extent():
    generator = ValidFlagAnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),) * 2)
    batch = torch.zeros(2, 3, 128, 128)
    sizes = [(70, 100), (128, 41)]  # padded to 32: (96, 128) and (128, 64)
    features = [torch.zeros(2, 8, 16, 16), torch.zeros(2, 8, 8, 8)]  # strides 8 and 16
    anchors = generator(ImageList(batch, sizes), features)
    for (h, w), image_anchors, valid in zip(sizes, anchors, generator.valid_flags):
        pad_h, pad_w = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
        centres = (image_anchors[:, :2] + image_anchors[:, 2:]) / 2  # torchvision: the grid location
        expected = (centres[:, 0] < pad_w) & (centres[:, 1] < pad_h)
        assert valid.shape == expected.shape and torch.equal(valid, expected)
    assert not generator.valid_flags[1].all() and generator.valid_flags[1].sum() == 3 * (16 * 8 + 8 * 4)


# ---------------------------------------------------------------- MaxIoUAssigner


def _mmdet_assign_loop(iou: np.ndarray, pos: float, neg: float, min_pos: float, valid: np.ndarray) -> list[int]:
    """mmdet 2.x MaxIoUAssigner.assign_wrt_overlaps as its loops read (1-based, 0 = bg, -1 = ignore)."""
    overlaps = iou[:, valid]
    assigned = [-1] * overlaps.shape[1]
    for a in range(overlaps.shape[1]):
        best = overlaps[:, a].max()
        if 0 <= best < neg:
            assigned[a] = 0
        if best >= pos:
            assigned[a] = int(overlaps[:, a].argmax()) + 1
    for g in range(overlaps.shape[0]):
        gt_best = overlaps[g].max()
        if gt_best >= min_pos:
            for a in range(overlaps.shape[1]):
                if overlaps[g, a] == gt_best:
                    assigned[a] = g + 1
    full = [-2] * iou.shape[1]
    for slot, a in enumerate(np.where(valid)[0]):
        full[a] = {0: -1, -1: -2}.get(assigned[slot], assigned[slot] - 1)
    return full


def test_max_iou_assign_needs_min_pos_iou_for_a_gts_best_anchor():
    # gt 0's best anchor has IoU 0.25 < 0.3: not a positive (torchvision's Matcher would
    # make it one); anchor 1 and 2 sit between the thresholds.
    iou = torch.tensor([[0.25, 0.10, 0.00], [0.80, 0.50, 0.50]])
    assert max_iou_assign(iou, pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3).tolist() == [1, -2, -2]
    # gt 0's best (0.35) reaches 0.3: that anchor becomes gt 0's positive.
    iou = torch.tensor([[0.10, 0.00, 0.35], [0.80, 0.50, 0.20]])
    assert max_iou_assign(iou, pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3).tolist() == [1, -2, 0]
    # Invalid anchors are ignored and never compared: gt 1's best valid anchor is then 1.
    valid = torch.tensor([False, True, True])
    assert max_iou_assign(iou, pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, valid=valid).tolist() == [-2, 1, 0]
    # No gt: every valid anchor is background.
    empty = torch.zeros(0, 3)
    no_gt = max_iou_assign(empty, pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, valid=valid)
    assert no_gt.tolist() == [-2, -1, -1]


@pytest.mark.parametrize("seed", range(5))
def test_max_iou_assign_equals_mmdets_loops_with_ties(seed):
    rng = np.random.default_rng(seed)
    iou = rng.choice([0.0, 0.1, 0.25, 0.3, 0.35, 0.5, 0.7, 0.9], size=(4, 40))  # many ties
    valid = rng.random(40) > 0.2
    for pos, neg, min_pos in ((0.7, 0.3, 0.3), (0.5, 0.4, 0.0)):
        got = max_iou_assign(torch.tensor(iou), pos_iou_thr=pos, neg_iou_thr=neg, min_pos_iou=min_pos,
                             valid=torch.tensor(valid))
        assert got.tolist() == _mmdet_assign_loop(iou, pos, neg, min_pos, valid)


def test_rpn_under_parity_mmdet_never_labels_an_invalid_anchor():
    model = build_detector({"detector": "faster_rcnn", "backbone": "tiny", "num_classes": 2,
                            "min_size": 128, "max_size": 128, "parity": "mmdet"})
    images = [torch.rand(3, 128, 48), torch.rand(3, 64, 128)]
    targets = [{"boxes": torch.tensor([[4.0, 10.0, 40.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 5.0, 100.0, 60.0]]), "labels": torch.tensor([2])}]
    image_list, targets = model.transform(images, targets)
    features = list(model.backbone(image_list.tensors).values())
    anchors = model.rpn.anchor_generator(image_list, features)
    valid = model.rpn.anchor_generator.valid_flags
    labels, matched = model.rpn.assign_targets_mmdet(anchors, targets, valid)
    for label, flags, anchor, target in zip(labels, valid, anchors, targets):
        assert (~flags).any() and (label[~flags] == -1).all()
        iou = box_iou(target["boxes"], anchor)[0]
        positives = label == 1
        assert positives.any() and (iou[positives] >= 0.3 - 1e-6).all()
        assert (iou[label == 0] < 0.3).all()


# ---------------------------------------------------------------- BatchNorm


def test_norm_eval_batchnorm_uses_running_stats_and_trains_its_affine_params():
    torch.manual_seed(0)
    bn = NormEvalBatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    mean_before = bn.running_mean.clone()
    bn.train()
    assert not bn.training
    x = torch.randn(2, 4, 5, 5) * 3 + 1
    out = bn(x)
    expected = (x - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps)
    expected = expected * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()
    assert torch.equal(bn.running_mean, mean_before)
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0


def test_resnet_under_parity_mmdet_freezes_stage1_and_bn_stats_only(monkeypatch):
    from torchvision.models import resnet50

    weights = {k: v for k, v in resnet50().state_dict().items() if not k.endswith("num_batches_tracked")}
    monkeypatch.setattr(backbones, "load_imagenet_state_dict", lambda name: weights)
    model = backbones.resnet_fpn("resnet50", pretrained=True, for_retinanet=False, parity="mmdet")
    model.train()
    body = model.body
    bns = [m for m in body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, NormEvalBatchNorm2d) and not m.training for m in bns)
    assert not body.bn1.weight.requires_grad and not body.conv1.weight.requires_grad
    assert not body.layer1[0].bn1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    for stage in (body.layer2, body.layer3, body.layer4):
        assert stage[0].bn1.weight.requires_grad and stage[0].bn1.bias.requires_grad
    assert torch.equal(body.layer2[0].bn1.running_mean, weights["layer2.0.bn1.running_mean"])


# ---------------------------------------------------------------- RoIAlign


def _bilinear(feature: np.ndarray, y: float, x: float) -> np.ndarray:
    """Caffe2/mmcv RoIAlign bilinear sample (zero outside [-1, H] × [-1, W])."""
    height, width = feature.shape[-2:]
    if y < -1 or y > height or x < -1 or x > width:
        return np.zeros(feature.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * feature[:, y0, x0] + (1 - ly) * lx * feature[:, y0, x1]
            + ly * (1 - lx) * feature[:, y1, x0] + ly * lx * feature[:, y1, x1])


def _roi_align_aligned_adaptive(feature: np.ndarray, box, scale: float, out: int) -> np.ndarray:
    x1, y1, x2, y2 = (c * scale - 0.5 for c in box)
    bin_h, bin_w = (y2 - y1) / out, (x2 - x1) / out
    grid_h, grid_w = math.ceil((y2 - y1) / out), math.ceil((x2 - x1) / out)
    result = np.zeros((feature.shape[0], out, out))
    for i in range(out):
        for j in range(out):
            total = 0
            for iy in range(grid_h):
                for ix in range(grid_w):
                    y = y1 + i * bin_h + (iy + 0.5) * bin_h / grid_h
                    x = x1 + j * bin_w + (ix + 0.5) * bin_w / grid_w
                    total = total + _bilinear(feature, y, x)
            result[:, i, j] = total / (grid_h * grid_w)
    return result


def test_aligned_roi_align_matches_a_direct_computation_on_mmdets_levels():
    torch.manual_seed(0)
    image_size = (256, 256)
    features = {str(k): torch.randn(1, 2, 256 // 2 ** (k + 2), 256 // 2 ** (k + 2)) for k in range(4)}
    boxes = torch.tensor([[10.3, 20.7, 50.1, 70.9],      # √wh ≈ 45  → P2
                          [5.0, 5.0, 155.0, 135.0],      # ≈ 140     → P3
                          [0.0, 10.0, 250.0, 240.0],     # ≈ 240     → P4
                          [3.0, 4.0, 21.0, 12.0]])       # ≈ 12      → P2
    pooler = AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 3)
    pooled = pooler(features, [boxes], [image_size])
    for box, got in zip(boxes.tolist(), pooled):
        size = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
        level = min(max(math.floor(math.log2(size / 56 + 1e-6)), 0), 3)  # mmdet map_roi_levels
        feature = features[str(level)][0].numpy().astype(np.float64)
        expected = _roi_align_aligned_adaptive(feature, box, 1 / 2 ** (level + 2), 3)
        assert np.allclose(got.numpy(), expected, atol=1e-5)


# ---------------------------------------------------------------- inits and P7


def test_box_head_init_is_mmdets():
    torch.manual_seed(0)
    head, predictor = TwoMLPHead(256 * 7 * 7, 1024), FastRCNNPredictor(1024, 21)
    init_box_head_like_mmdet(head, predictor)
    for fc in (head.fc6, head.fc7):
        fan_out, fan_in = fc.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))  # Xavier-uniform: U(-b, b), std b/√3
        assert fc.weight.abs().max() <= bound and abs(fc.weight.std().item() - bound / math.sqrt(3)) < 0.02 * bound
        assert not fc.bias.any()
    assert abs(predictor.cls_score.weight.std().item() - 0.01) < 0.0005
    assert abs(predictor.bbox_pred.weight.std().item() - 0.001) < 0.00005
    assert not predictor.cls_score.bias.any() and not predictor.bbox_pred.bias.any()


def test_fpn_init_is_xavier_uniform():
    from torchvision.ops import FeaturePyramidNetwork

    torch.manual_seed(0)
    fpn = FeaturePyramidNetwork([512, 1024, 2048], 256)
    init_fpn_like_mmdet(fpn)
    convs = [m for m in fpn.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        out_c, in_c, kh, kw = conv.weight.shape
        bound = math.sqrt(6 / ((in_c + out_c) * kh * kw))
        assert conv.weight.abs().max() <= bound and not conv.bias.any()
        assert abs(conv.weight.std().item() - bound / math.sqrt(3)) < 0.03 * bound


def test_p7_has_no_relu_and_p6_comes_from_c5():
    torch.manual_seed(0)
    block = LastLevelP6P7NoReLU(8, 4)
    c5 = torch.randn(1, 8, 8, 8)
    p = [torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8, 8)]
    outputs, names = block(p, [torch.randn(1, 6, 16, 16), c5], ["p4", "p5"])
    p6 = F.conv2d(c5, block.p6.weight, block.p6.bias, stride=2, padding=1)
    p7 = F.conv2d(p6, block.p7.weight, block.p7.bias, stride=2, padding=1)
    assert names == ["p4", "p5", "p6", "p7"]
    assert torch.allclose(outputs[2], p6) and torch.allclose(outputs[3], p7)
    with_relu = F.conv2d(p6.relu(), block.p7.weight, block.p7.bias, stride=2, padding=1)
    assert (p6 < 0).any() and not torch.allclose(outputs[3], with_relu)


def test_retinanet_backbone_under_parity_mmdet_uses_the_no_relu_block():
    model = build_detector({"detector": "retinanet", "backbone": "tiny", "num_classes": 2, "parity": "mmdet"})
    assert isinstance(model.backbone.fpn.extra_blocks, LastLevelP6P7NoReLU)
    assert isinstance(model.anchor_generator, ValidFlagAnchorGenerator)
    default = build_detector({"detector": "retinanet", "backbone": "tiny", "num_classes": 2})
    assert not isinstance(default.backbone.fpn.extra_blocks, LastLevelP6P7NoReLU)


def test_parity_value_is_checked():
    assert parity_of({}) == "torchvision" and parity_of({"parity": "mmdet"}) == "mmdet"
    with pytest.raises(ConfigError, match="model.parity"):
        build_detector({"detector": "faster_rcnn", "backbone": "tiny", "num_classes": 2, "parity": "mmdetection"})
