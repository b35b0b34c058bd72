"""Table 3 detectors: Libra R-CNN, Dynamic R-CNN, Double-Head R-CNN.

Each distinguishing piece against an independent computation (Balanced L1 against its
formula and gradient, the IoU-balanced sampler's bins, BFP and the non-local block,
Dynamic R-CNN's updates against numpy on known sequences, the Double-Head loss
composition), then every detector × regression loss × weighting method on the tiny
backbone, the ResNet backbones, the config, and one short engine run per detector.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from trainers.config import parse_model
from trainers.detectors import DETECTORS, build_detector
from trainers.detectors.build import head_losses
from trainers.detectors.double_head_rcnn import DoubleHeadLossWeights, DoubleHeadRoIPool, enlarge_boxes
from trainers.detectors.dynamic_rcnn import DynamicRoIHeads
from trainers.detectors.libra_rcnn import (
    BalancedFeaturePyramid,
    IoUBalancedSampler,
    NonLocalBlock,
    RPNSamplerWithNegativeCap,
)
from trainers.engine import train
from trainers.errors import ConfigError
from trainers.losses import (
    BalancedL1RegressionLoss,
    BoxRegressionLoss,
    balanced_l1_loss,
    regression_loss_from_config,
    smooth_l1_loss_tensor_beta,
)
from trainers.weighting import WEIGHTINGS, build_weighting

TABLE3 = ("libra_rcnn", "dynamic_rcnn", "double_head_rcnn")
LOSS_TYPES = ("l1", "smooth_l1", "giou", "diou", "ciou", "balanced_l1")
NUM_CLASSES = 3


def tiny_model_config(detector, **extra):
    config = {"detector": detector, "backbone": "tiny", "pretrained": "none", "num_classes": NUM_CLASSES,
              "min_size": 96, "max_size": 96}
    config.update(extra)
    return config


def tiny_batch():
    """Two 96 × 96 images with hand-placed boxes (labels 1..3)."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=generator) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[8.0, 10.0, 50.0, 60.0], [40.0, 30.0, 90.0, 75.0]]), "labels": torch.tensor([2, 1])},
        {"boxes": torch.tensor([[20.0, 15.0, 70.0, 70.0]]), "labels": torch.tensor([3])},
    ]
    return images, targets


# ---------------------------------------------------------------- Balanced L1


def test_balanced_l1_matches_its_formula_and_gradient():
    alpha, gamma, beta = 0.5, 1.5, 1.0
    b = math.exp(gamma / alpha) - 1  # from α·ln(b + 1) = γ

    def reference(x):
        x = abs(x)
        if x < beta:
            return alpha / b * (b * x + 1) * math.log(b * x / beta + 1) - alpha * x
        return gamma * x + gamma / b - alpha * beta

    diffs = torch.tensor([[0.0, 0.01, -0.2, 0.5], [-0.99, 1.0, 1.7, -3.0]], dtype=torch.float64, requires_grad=True)
    target = torch.zeros_like(diffs)
    loss = balanced_l1_loss(diffs, target, alpha, gamma, beta)
    expected = torch.tensor([sum(reference(x) for x in row) for row in diffs.tolist()], dtype=torch.float64)
    assert torch.allclose(loss, expected)

    # Paper, Eq. 8: ∂L/∂x = α·ln(b|x| + 1) inside, γ outside (times the sign of x).
    loss.sum().backward()
    x = diffs.detach()
    inside = alpha * torch.log(b * x.abs() + 1)
    expected_grad = torch.where(x.abs() < beta, inside, torch.full_like(x, gamma)) * torch.sign(x)
    assert torch.allclose(diffs.grad, expected_grad)
    # Continuous at |x| = β, in value and gradient.
    assert reference(beta - 1e-9) == pytest.approx(reference(beta), abs=1e-7)
    assert alpha * math.log(b * beta + 1) == pytest.approx(gamma)


def test_balanced_l1_as_a_box_loss_and_its_config():
    generator = torch.Generator().manual_seed(1)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    xy = torch.rand(6, 2, generator=generator) * 40
    proposals = torch.cat([xy, xy + 20 + torch.rand(6, 2, generator=generator) * 20], dim=1)
    gt = proposals + torch.randn(6, 4, generator=generator) * 3
    deltas = torch.randn(6, 4, generator=generator) * 0.5
    loss = regression_loss_from_config({"type": "balanced_l1", "loss_weight": 2.0}, "model.losses.roi_reg")
    assert isinstance(loss, BalancedL1RegressionLoss) and isinstance(loss, BoxRegressionLoss)
    assert not loss.uses_decoded_boxes
    expected = 2.0 * balanced_l1_loss(deltas, coder.encode_single(gt, proposals))
    assert torch.allclose(loss(deltas, proposals, gt, coder), expected)

    assert regression_loss_from_config({"type": "ciou"}, "x") == BoxRegressionLoss("ciou")
    for bad, field in [({"type": "balanced_l1", "alpha": 0}, "x.alpha"),
                       ({"type": "balanced_l1", "delta": 1}, "x.delta"),
                       ({"type": "balanced"}, "x.type"), ({"type": "l1", "gamma": 1.0}, "x.gamma")]:
        with pytest.raises(ConfigError) as error:
            regression_loss_from_config(bad, "x")
        assert str(error.value).startswith(field)
    assert "balanced_l1" in str(pytest.raises(ConfigError, regression_loss_from_config, {"type": "iou"}, "x").value)


def test_smooth_l1_with_a_tensor_beta_equals_torch_smooth_l1():
    generator = torch.Generator().manual_seed(2)
    pred, target = torch.randn(7, 4, generator=generator), torch.randn(7, 4, generator=generator)
    for beta in (0.05, 0.4, 1.0):
        expected = F.smooth_l1_loss(pred, target, beta=beta, reduction="none").sum(1)
        assert torch.allclose(smooth_l1_loss_tensor_beta(pred, target, torch.tensor(beta)), expected)


# ---------------------------------------------------------------- Libra R-CNN samplers


def sampler_inputs(groups):
    """Concatenate (count, label, IoU range, matched gt) groups into one image's inputs."""
    labels, overlaps, matched = [], [], []
    generator = torch.Generator().manual_seed(3)
    for count, label, (low, high), gt_index in groups:
        labels.append(torch.full((count,), label))
        overlaps.append(low + (high - low) * torch.rand(count, generator=generator))
        matched.append(torch.full((count,), gt_index))
    return torch.cat(labels), torch.cat(overlaps), torch.cat(matched)


def test_iou_balanced_negatives_fill_each_bin_up_to_its_share():
    """mmdetection's config (floor_thr −1, 3 bins): with the ground truth among the
    proposals the bins are [−1, −1/3), [−1/3, 1/3), [1/3, 1); the expected 492 negatives
    give each bin 164, the rest is drawn at random from what is left."""
    torch.manual_seed(0)
    sampler = IoUBalancedSampler(512, 0.25)
    labels, overlaps, matched = sampler_inputs([
        (19, 1, (0.5, 0.95), 0), (1, 1, (1.0, 1.0), 0),   # positives, the ground truth itself
        (600, 0, (0.0, 0.3), 0), (30, 0, (0.34, 0.49), 0),  # negatives: easy, hard
        (5, -1, (0.4, 0.45), 0),                          # ignored
    ])
    positives, negatives = sampler([labels], [matched], [overlaps])
    pos, neg = positives[0], negatives[0]
    assert pos.sum() == 20 and bool((labels[pos] == 1).all())
    assert neg.sum() == 512 - 20 and bool((labels[neg] == 0).all())
    hard = overlaps >= 1 / 3
    assert (neg & hard).sum() == 30  # the hard bin has fewer than 164: all of them
    assert (neg & ~hard).sum() == 462  # 164 + the 298 drawn to fill up

    # Both bins over-full: each gives at least its 164 (random sampling: ~89 hard ones).
    labels, overlaps, matched = sampler_inputs([(1, 1, (1.0, 1.0), 0), (900, 0, (0.0, 0.3), 0),
                                                (200, 0, (0.34, 0.49), 0)])
    neg = sampler([labels], [matched], [overlaps])[1][0]
    hard = overlaps >= 1 / 3
    assert neg.sum() == 511 and (neg & hard).sum() >= 170 and (neg & ~hard).sum() >= 170  # 511 // 3 = 170

    # Fewer negatives than expected: all of them.
    labels, overlaps, matched = sampler_inputs([(3, 1, (0.6, 1.0), 0), (40, 0, (0.0, 0.45), 0)])
    neg = sampler([labels], [matched], [overlaps])[1][0]
    assert torch.equal(neg, labels == 0)


def test_iou_balanced_negatives_with_a_floor():
    """floor_thr 0.1, floor_fraction 0.5: half the negatives at random below 0.1, the other
    half from bins [0.1, 0.4), [0.4, 0.7), [0.7, 1.0) of 82 each (246 // 3)."""
    torch.manual_seed(1)
    sampler = IoUBalancedSampler(512, 0.25, floor_thr=0.1, floor_fraction=0.5, num_bins=3)
    labels, overlaps, matched = sampler_inputs([
        (20, 1, (1.0, 1.0), 0), (600, 0, (0.0, 0.1), 0), (300, 0, (0.1, 0.4), 0), (100, 0, (0.4, 0.5), 0),
    ])
    neg = sampler([labels], [matched], [overlaps])[1][0]
    assert neg.sum() == 492
    assert (neg & (overlaps < 0.1)).sum() == 246
    assert (neg & (overlaps >= 0.4)).sum() >= 82 and (neg & (overlaps >= 0.1) & (overlaps < 0.4)).sum() >= 82


def test_instance_balanced_positives():
    """round(128 / #instances) + 1 per instance, then random positives up to 128."""
    torch.manual_seed(2)
    sampler = IoUBalancedSampler(512, 0.25)
    labels, overlaps, matched = sampler_inputs([(200, 1, (0.5, 1.0), 0), (10, 2, (0.5, 1.0), 1),
                                                (400, 0, (0.0, 0.4), 0)])
    pos = sampler([labels], [matched], [overlaps])[0][0]
    # 65 per instance: instance 1 keeps its 10, instance 0 gets 65 + the 53 that fill up to 128.
    assert pos.sum() == 128 and (pos & (matched == 1)).sum() == 10
    assert (pos & (matched == 0) & (labels > 0)).sum() == 118

    labels, overlaps, matched = sampler_inputs([(100, 1, (0.5, 1.0), 0), (100, 1, (0.5, 1.0), 1),
                                                (100, 1, (0.5, 1.0), 2)])
    pos = sampler([labels], [matched], [overlaps])[0][0]
    per_instance = [int((pos & (matched == g)).sum()) for g in range(3)]
    # 44 each (round(42.7) + 1) = 132 > 128: four of them dropped at random.
    assert sum(per_instance) == 128 and all(40 <= n <= 44 for n in per_instance)


def test_rpn_negatives_are_capped_at_five_per_positive():
    torch.manual_seed(3)
    sampler = RPNSamplerWithNegativeCap(256, 0.5)
    labels = [
        torch.cat([torch.ones(3), torch.zeros(1000), -torch.ones(10)]),
        torch.zeros(500),
        torch.cat([torch.ones(200), torch.zeros(1000)]),
    ]
    positives, negatives = sampler(labels)
    assert [int(p.sum()) for p in positives] == [3, 0, 128]
    assert [int(n.sum()) for n in negatives] == [15, 5, 128]
    for label, p, n in zip(labels, positives, negatives):
        assert bool((label[p] == 1).all()) and bool((label[n] == 0).all())


# ---------------------------------------------------------------- balanced feature pyramid


def _block_max(x, factor):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // factor, factor, w // factor, factor).amax(dim=(3, 5))


def _repeat(x, factor):
    return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def test_bfp_integrates_at_p4_and_adds_back_to_every_level():
    torch.manual_seed(4)
    sizes = (16, 8, 4, 2, 1)
    features = {str(i): torch.randn(2, 4, s, s) for i, s in enumerate(sizes)}
    bfp = BalancedFeaturePyramid(4)
    bfp.refine = nn.Identity()  # the integrate / scatter paths alone
    out = bfp(features)

    levels = list(features.values())
    gathered = [_block_max(levels[0], 4), _block_max(levels[1], 2), levels[2],
                _repeat(levels[3], 2), _repeat(levels[4], 4)]
    balanced = sum(gathered) / 5
    residuals = [_repeat(balanced, 4), _repeat(balanced, 2), balanced, _block_max(balanced, 2), _block_max(balanced, 4)]
    assert list(out) == list(features)
    for name, level, residual in zip(out, levels, residuals):
        assert torch.allclose(out[name], level + residual, atol=1e-6)


def test_non_local_block_is_embedded_gaussian_attention():
    torch.manual_seed(5)
    block = NonLocalBlock(3)
    x = torch.randn(2, 3, 2, 3)

    def project(conv, z):  # a 1×1 conv as a matrix product per position: (n, positions, c)
        return torch.einsum("oc,ncp->npo", conv.weight[:, :, 0, 0], z.flatten(2)) + conv.bias

    theta, phi, g = project(block.theta, x), project(block.phi, x), project(block.g, x)
    expected = torch.empty(2, 6, 3)
    for n in range(2):
        for i in range(6):
            weights = torch.softmax(torch.stack([theta[n, i] @ phi[n, j] for j in range(6)]), dim=0)
            expected[n, i] = sum(weights[j] * g[n, j] for j in range(6))
    out = x.flatten(2).transpose(1, 2) + project(block.out, expected.transpose(1, 2))
    out = out.transpose(1, 2).reshape(2, 3, 2, 3)
    assert torch.allclose(block(x), out, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the attention itself stays float32
        assert torch.allclose(block(x).float(), out, atol=5e-2)


def test_libra_rcnn_is_faster_rcnn_with_bfp_and_libra_samplers():
    model = build_detector(tiny_model_config("libra_rcnn"))
    assert isinstance(model, torchvision.models.detection.FasterRCNN)
    assert isinstance(model.backbone.fpn[1], BalancedFeaturePyramid)
    assert isinstance(model.rpn.fg_bg_sampler, RPNSamplerWithNegativeCap) and model.rpn.fg_bg_sampler.neg_pos_ub == 5
    sampler = model.roi_heads.fg_bg_sampler
    assert isinstance(sampler, IoUBalancedSampler)
    assert (sampler.floor_thr, sampler.floor_fraction, sampler.num_bins) == (-1, 0, 3)
    assert model.roi_heads.reg_loss == BalancedL1RegressionLoss(alpha=0.5, gamma=1.5, beta=1.0, loss_weight=1.0)


# ---------------------------------------------------------------- Dynamic R-CNN


def test_dynamic_updates_on_known_sequences():
    """Every 100 iterations: IoU threshold = max(0.4, mean), beta = min(1.0, median) unless
    the median is below 1e-15 — numpy's mean and median as in mmdetection."""
    model = build_detector(tiny_model_config("dynamic_rcnn"))
    heads = model.roi_heads
    assert isinstance(heads, DynamicRoIHeads) and heads.update_interval == 100
    assert (float(heads.iou_threshold), float(heads.beta)) == (0.5, 1.0)  # the base config's start
    rng = np.random.default_rng(0)
    windows = [
        (0.45 + 0.2 * rng.random(100), 0.05 + 0.5 * rng.random(100)),  # mean > 0.4, median < 1
        (0.1 + 0.2 * rng.random(100), np.zeros(100)),                  # floor 0.4; median 0: beta stays
        (0.5 + 0.3 * rng.random(100), 1.5 + rng.random(100)),          # beta capped at 1.0
    ]
    expected_beta = 1.0
    for ious, betas in windows:
        before = (float(heads.iou_threshold), float(heads.beta))
        for i, (iou, beta) in enumerate(zip(ious, betas)):
            heads.record_and_update(torch.tensor(iou, dtype=torch.float32), torch.tensor(beta, dtype=torch.float32))
            if i < 99:
                assert (float(heads.iou_threshold), float(heads.beta)) == before
        assert int(heads.history_length) == 0
        ious32, betas32 = ious.astype(np.float32), betas.astype(np.float32)
        assert float(heads.iou_threshold) == pytest.approx(max(0.4, np.mean(ious32)), rel=1e-5)
        if np.median(betas32) >= 1e-15:
            expected_beta = min(1.0, float(np.median(betas32)))
        assert float(heads.beta) == pytest.approx(expected_beta, rel=1e-6)


def test_dynamic_state_is_in_the_state_dict_and_resumes_the_window():
    torch.manual_seed(6)
    model = build_detector(tiny_model_config("dynamic_rcnn"))
    values = torch.rand(230, 2)
    for iou, beta in values[:137]:
        model.roi_heads.record_and_update(iou, beta)
    state = model.state_dict()
    for key in ("iou_threshold", "beta", "iou_history", "beta_history", "history_length"):
        assert f"roi_heads.{key}" in state
    resumed = build_detector(tiny_model_config("dynamic_rcnn"))
    resumed.load_state_dict(state)
    assert int(resumed.roi_heads.history_length) == 37
    for model_ in (model, resumed):
        for iou, beta in values[137:]:
            model_.roi_heads.record_and_update(iou, beta)
    for key in ("iou_threshold", "beta", "iou_history", "history_length"):
        assert torch.equal(getattr(model.roi_heads, key), getattr(resumed.roi_heads, key))
    assert int(model.roi_heads.history_length) == 30  # updated at 100 and 200
    assert float(model.roi_heads.iou_threshold) == pytest.approx(max(0.4, float(values[100:200, 0].mean())), rel=1e-5)


def test_dynamic_statistics_of_one_iteration():
    """K_I-th largest IoU per image averaged over images; K_β·#images-th smallest mean
    |(dx, dy)| target of the positives; smooth L1 with the current beta."""
    model = build_detector(tiny_model_config("dynamic_rcnn"))
    heads = model.roi_heads
    heads.iou_topk, heads.beta_topk = 2, 1
    gt = [torch.tensor([[10.0, 10.0, 50.0, 50.0]]), torch.zeros(0, 4)]
    proposals = [torch.tensor([[10.0, 10.0, 50.0, 50.0], [12.0, 10.0, 50.0, 52.0], [0.0, 0.0, 30.0, 30.0],
                               [30.0, 30.0, 70.0, 70.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    heads.assign_targets_to_proposals(proposals, gt, [torch.tensor([1]), torch.zeros(0, dtype=torch.long)])
    second_largest = box_iou(gt[0], proposals[0])[0].sort(descending=True).values[1]
    assert torch.allclose(heads._statistics["iou"], (second_largest + 0.0) / 2)

    num_outputs = NUM_CLASSES + 1
    rois = [torch.tensor([[0.0, 0, 10, 10], [5, 5, 25, 20], [3, 3, 9, 12]]),
            torch.tensor([[1.0, 2, 30, 40], [0, 0, 5, 5]])]
    labels = [torch.tensor([2, 0, 3]), torch.tensor([1, 0])]
    targets = [torch.tensor([[0.3, -0.3, 0.1, 0.0], [9.0, 9.0, 0.0, 0.0], [0.1, 0.1, 0.5, 0.5]]),
               torch.tensor([[-0.5, 0.5, 0.0, 0.2], [7.0, 7.0, 0.0, 0.0]])]
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(5, num_outputs, generator=generator)
    regression = torch.randn(5, num_outputs * 4, generator=generator)
    heads.beta.fill_(0.3)
    losses = heads.compute_head_losses(logits, regression, rois, labels, targets, [r + 1 for r in rois])
    # positives' mean |(dx, dy)|: 0.3, 0.1, 0.5 → k = min(1 · 2 images, 3) → 0.3
    assert torch.allclose(heads._statistics["beta"], torch.tensor(0.3))
    flat_labels, flat_targets = torch.cat(labels), torch.cat(targets)
    per_class = regression.reshape(5, num_outputs, 4)
    expected = sum(F.smooth_l1_loss(per_class[i, flat_labels[i]], flat_targets[i], beta=0.3, reduction="sum")
                   for i in (0, 2, 3)) / 5
    assert torch.allclose(losses["roi_reg"], expected)

    no_positive = [torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long)]
    heads.compute_head_losses(logits, regression, rois, no_positive, targets, rois)
    assert torch.allclose(heads._statistics["beta"], heads.beta)  # no positive: the current beta


def test_dynamic_threshold_drives_the_label_assignment():
    """The proposals labelled positive are those whose max IoU (ground truth included as
    proposals) reaches the current threshold; the forward records one iteration."""
    torch.manual_seed(8)
    model = build_detector(tiny_model_config("dynamic_rcnn"))
    heads = model.roi_heads
    images, targets = tiny_batch()
    image_list, targets = model.transform(images, targets)
    features = model.backbone(image_list.tensors)
    shifts = torch.tensor([[0.0, 0, 0, 0], [2, 2, 2, 2], [6, 0, 6, 0], [10, 8, 10, 8], [15, 12, 15, 12]])
    proposals = [(t["boxes"][:, None] + shifts).reshape(-1, 4) for t in targets]
    seen = []
    sampler = heads.fg_bg_sampler

    def recording_sampler(labels):
        seen.append([int((label > 0).sum()) for label in labels])
        return sampler(labels)

    heads.fg_bg_sampler = recording_sampler
    heads.train()
    for threshold in (0.5, 0.7):
        heads.iou_threshold.fill_(threshold)
        heads(features, [p.clone() for p in proposals], image_list.image_sizes, targets)
        expected = [int((box_iou(t["boxes"], torch.cat([p, t["boxes"]])).max(0).values >= threshold).sum())
                    for p, t in zip(proposals, targets)]
        assert seen[-1] == expected
    assert seen[0] != seen[1]
    assert int(heads.history_length) == 2


# ---------------------------------------------------------------- Double-Head R-CNN


def test_double_head_loss_composition():
    """roi_cls = ω_fc·λ_fc·CE(fc) + ω_conv·(1−λ_conv)·CE(conv);
    roi_reg = ω_fc·(1−λ_fc)·SL1(fc) + ω_conv·λ_conv·SL1(conv), SL1 normalised by #ROIs."""
    num_outputs = NUM_CLASSES + 1
    rois = [torch.tensor([[0.0, 0, 10, 10], [5, 5, 25, 20], [3, 3, 9, 12]]),
            torch.tensor([[1.0, 2, 30, 40], [0, 0, 5, 5]])]
    labels = [torch.tensor([2, 0, 3]), torch.tensor([1, 0])]
    gt = [r + torch.tensor([1.0, -1.0, 2.0, 0.5]) for r in rois]
    generator = torch.Generator().manual_seed(9)
    sizes = {"fc_cls": num_outputs, "conv_cls": num_outputs, "fc_reg": 4 * num_outputs, "conv_reg": 4 * num_outputs}
    outputs = {name: torch.randn(5, size, generator=generator) for name, size in sizes.items()}
    flat_labels = torch.cat(labels)

    def smooth_l1(regression, heads):
        targets = heads.box_coder.encode_single(torch.cat(gt), torch.cat(rois))
        per_class = regression.reshape(5, num_outputs, 4)
        return sum(F.smooth_l1_loss(per_class[i, flat_labels[i]], targets[i], beta=1.0, reduction="sum")
                   for i in (0, 2, 3)) / 5

    for weights in (None, {"lambda_fc": 0.7, "lambda_conv": 0.8, "fc_weight": 2.0, "conv_weight": 2.5}):
        extra = {} if weights is None else {"double_head": weights}
        heads = build_detector(tiny_model_config("double_head_rcnn", **extra)).roi_heads
        w = heads.loss_weights
        targets = [heads.box_coder.encode_single(g, r) for g, r in zip(gt, rois)]
        present = {k: v for k, v in outputs.items() if k in ("fc_cls", "conv_reg")
                   or (k == "fc_reg" and w.fc_regresses) or (k == "conv_cls" and w.conv_classifies)}
        losses = heads.double_head_losses(present, rois, labels, targets, gt)
        expected_cls = w.fc_weight * w.lambda_fc * F.cross_entropy(outputs["fc_cls"], flat_labels)
        expected_reg = w.conv_weight * w.lambda_conv * smooth_l1(outputs["conv_reg"], heads)
        if weights is None:
            assert (w.fc_weight, w.conv_weight, w.lambda_fc, w.lambda_conv) == (2.0, 2.0, 1.0, 1.0)
            assert heads.box_predictor.fc_reg is None and heads.box_predictor.conv_cls is None
        else:
            expected_cls = expected_cls + 2.5 * 0.2 * F.cross_entropy(outputs["conv_cls"], flat_labels)
            expected_reg = expected_reg + 2.0 * 0.3 * smooth_l1(outputs["fc_reg"], heads)
        assert torch.allclose(losses["roi_cls"], expected_cls)
        assert torch.allclose(losses["roi_reg"], expected_reg, rtol=1e-5)
        # KPIs from the pair used at test time (fc classifier, conv regressor).
        assert torch.allclose(heads.kpis["cls_acc"], (outputs["fc_cls"].argmax(1) == flat_labels).float().mean())


def test_double_head_pools_the_regression_roi_enlarged_on_the_original_level():
    torch.manual_seed(10)
    features = {str(i): torch.randn(1, 2, 64 // 2**i, 64 // 2**i) for i in range(4)}
    # √area 100 → level floor(4 + log2(100/224)) = 2 (stride 4); enlarged (130) it would map to 3.
    boxes = [torch.tensor([[10.0, 12.0, 110.0, 112.0], [40.0, 40.0, 240.0, 240.0]])]
    pool = DoubleHeadRoIPool(sampling_ratio=2)
    cls_features, reg_features = pool(features, boxes, [(256, 256)])
    enlarged = enlarge_boxes(boxes[0], 1.3)
    assert torch.allclose(enlarged[0], torch.tensor([-5.0, -3.0, 125.0, 127.0]))
    for i, level in enumerate((0, 1)):  # stride 4 for the first box, 8 for the second (√area 200)
        scale = 1 / 2 ** (level + 2)
        rois = torch.cat([torch.zeros(1, 1), enlarged[i : i + 1]], dim=1)
        expected = torchvision.ops.roi_align(features[str(level)], rois, 7, scale, 2)
        assert torch.allclose(reg_features[i : i + 1], expected, atol=1e-6)
        rois = torch.cat([torch.zeros(1, 1), boxes[0][i : i + 1]], dim=1)
        expected = torchvision.ops.roi_align(features[str(level)], rois, 7, scale, 2)
        assert torch.allclose(cls_features[i : i + 1], expected, atol=1e-6)


def test_double_head_scores_and_detections():
    model = build_detector(tiny_model_config("double_head_rcnn"))
    heads = model.roi_heads
    generator = torch.Generator().manual_seed(11)
    num_outputs = NUM_CLASSES + 1
    logits = torch.randn(12, num_outputs, generator=generator) * 3
    conv_logits = torch.randn(12, num_outputs, generator=generator)
    regression = torch.randn(12, 4 * num_outputs, generator=generator) * 0.2
    proposals = [torch.rand(7, 2, generator=generator).repeat(1, 2) * 50 + torch.tensor([0, 0, 30, 30.0]),
                 torch.rand(5, 2, generator=generator).repeat(1, 2) * 50 + torch.tensor([0, 0, 20, 40.0])]
    shapes = [(96, 96), (90, 80)]
    ours = heads.detections(heads.class_scores({"fc_cls": logits}), regression, proposals, shapes)
    boxes, scores, labels = heads.postprocess_detections(logits, regression, proposals, shapes)  # torchvision's
    for detection, b, s, l in zip(ours, boxes, scores, labels):
        assert torch.allclose(detection["boxes"], b) and torch.allclose(detection["scores"], s)
        assert torch.equal(detection["labels"], l)
    fused = heads.class_scores({"fc_cls": logits, "conv_cls": conv_logits})
    s_fc, s_conv = logits.softmax(1), conv_logits.softmax(1)
    assert torch.allclose(fused, s_fc + s_conv * (1 - s_fc))


def test_double_head_config():
    assert DoubleHeadLossWeights(**parse_model(tiny_model_config("double_head_rcnn")).double_head) \
        == DoubleHeadLossWeights()
    resolved = parse_model(tiny_model_config("double_head_rcnn", double_head={"lambda_fc": 0.7}))
    assert DoubleHeadLossWeights(**resolved.double_head) == DoubleHeadLossWeights(lambda_fc=0.7)
    for extra, field in [({"double_head": {"lambda_fc": 1.2}}, "model.double_head.lambda_fc"),
                         ({"double_head": {"lambda": 0.5}}, "model.double_head.lambda"),
                         ({"double_head": {"fc_weight": -1}}, "model.double_head.fc_weight"),
                         ({"detector": "faster_rcnn", "double_head": {}}, "model.double_head")]:
        with pytest.raises(ConfigError) as error:
            parse_model({**tiny_model_config("double_head_rcnn"), **extra})
        assert str(error.value).startswith(field)


# ---------------------------------------------------------------- all detectors


def test_default_roi_losses_and_how_a_user_override_merges():
    losses = {d: head_losses(parse_model(tiny_model_config(d))) for d in TABLE3}
    assert losses["libra_rcnn"]["roi_reg"] == BalancedL1RegressionLoss()
    assert losses["dynamic_rcnn"]["roi_reg"] == BoxRegressionLoss("smooth_l1", beta=1.0)
    assert losses["double_head_rcnn"]["roi_reg"] == BoxRegressionLoss("smooth_l1", beta=1.0)
    assert all(losses[d]["rpn_reg"] == BoxRegressionLoss("l1") for d in TABLE3)  # the RPN keeps L1
    merged = parse_model(tiny_model_config("libra_rcnn", losses={"roi_reg": {"loss_weight": 2.0}}))
    assert head_losses(merged)["roi_reg"] == BalancedL1RegressionLoss(loss_weight=2.0)
    replaced = parse_model(tiny_model_config("libra_rcnn", losses={"roi_reg": {"type": "giou"}}))
    assert head_losses(replaced)["roi_reg"] == BoxRegressionLoss("giou")
    # Faster R-CNN keeps its L1 default.
    assert head_losses(parse_model(tiny_model_config("faster_rcnn")))["roi_reg"] == BoxRegressionLoss("l1")
    with pytest.raises(ConfigError, match="model.losses.roi_reg.beta"):
        parse_model(tiny_model_config("dynamic_rcnn", losses={"roi_reg": {"beta": 0}}))
    assert set(TABLE3) <= set(DETECTORS)
    assert "libra_rcnn" in str(pytest.raises(ConfigError, parse_model, {"detector": "ssd"}).value)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("detector", TABLE3)
def test_train_step_and_eval(detector, loss_type):
    torch.manual_seed(0)
    model = build_detector(tiny_model_config(detector, losses={"roi_reg": {"type": loss_type}}))
    images, targets = tiny_batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"rpn_cls", "rpn_reg", "roi_cls", "roi_reg"}
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    sum(losses.values()).backward()
    first_conv = model.backbone.stem[0].weight
    assert first_conv.grad is not None and torch.isfinite(first_conv.grad).all() and first_conv.grad.abs().sum() > 0
    assert set(model.kpis) == {"cls_acc", "reg_iou"}

    model.eval()
    with torch.no_grad():
        detections = model(images)
    for detection in detections:
        assert detection["boxes"].shape[0] > 0
        assert ((detection["labels"] >= 1) & (detection["labels"] <= NUM_CLASSES)).all()


@pytest.mark.parametrize("detector", TABLE3)
def test_every_weighting_method_on_either_head(detector):
    torch.manual_seed(0)
    extra = {"double_head": {"lambda_fc": 0.7, "lambda_conv": 0.8}} if detector == "double_head_rcnn" else {}
    model = build_detector(tiny_model_config(detector, **extra))
    images, targets = tiny_batch()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}  # an empty image too
    model.train()
    for head in ("rpn", "roi"):
        model.weighted_head = head
        losses = model(images, targets)
        assert model.kpis is (model.rpn if head == "rpn" else model.roi_heads).kpis
        total = 0
        for method in WEIGHTINGS:
            weighting = build_weighting({"method": method, "head": head})
            cls_w, reg_w = weighting(losses[f"{head}_cls"], losses[f"{head}_reg"], kpis=model.kpis)
            assert torch.isfinite(cls_w) and torch.isfinite(reg_w), method
            total = total + cls_w + reg_w
        model.zero_grad()
        total.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
@pytest.mark.parametrize("detector", TABLE3)
def test_resnet_backbones(detector, backbone):
    torch.manual_seed(0)
    model = build_detector({"detector": detector, "backbone": backbone, "pretrained": "none", "num_classes": 20,
                            "min_size": 64, "max_size": 96})
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    if detector == "double_head_rcnn":
        head = model.roi_heads.box_head
        assert head.fc_channels == head.conv_channels == 1024 and len(head.conv_branch) == 1 + 4 + 2
        assert model.roi_heads.box_predictor.fc_cls.out_features == 21
    if detector == "dynamic_rcnn":
        assert model.rpn.nms_thresh == 0.85
    if backbone == "resnet50":
        model.train()
        losses = model([torch.rand(3, 64, 96)], [{"boxes": torch.tensor([[10.0, 8.0, 60.0, 50.0]]),
                                                  "labels": torch.tensor([4])}])
        assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("detector, weighting", [
    ("libra_rcnn", {"method": "alwa", "variant": 1, "interval": 20}),
    ("dynamic_rcnn", {"method": "alwa", "variant": 2, "interval": 20}),
    ("double_head_rcnn", {"method": "none"}),
])
def test_short_training_run_learns(synthetic_voc, tmp_path, detector, weighting):
    config = {
        "dataset": {"kind": "voc", "root": synthetic_voc["root"], "train_sets": synthetic_voc["train_sets"],
                    "test_sets": synthetic_voc["test_sets"], "scale": [128, 128], "num_workers": 0},
        "model": {"detector": detector, "backbone": "tiny", "pretrained": "none"},
        "weighting": weighting,
        "schedule": {"unit": "iter", "max_iters": 60, "steps": [50], "warmup_iters": 20},
        "train": {"batch_size": 4, "log_every": 20, "eval_every": 0},
    }
    result = train(config, workdir=tmp_path)
    assert result.status == "ok" and result.iterations == 60
    assert result.metrics["val/map"] > 0.05
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)["model"]
    if detector == "dynamic_rcnn":
        # 60 iterations recorded, no update yet (every 100): the window is checkpointed.
        assert int(state["roi_heads.history_length"]) == 60
        assert bool((state["roi_heads.iou_history"][:60] > 0).all()) and float(state["roi_heads.iou_threshold"]) == 0.5
    if detector == "libra_rcnn":
        assert any(key.startswith("backbone.fpn.1.refine.") for key in state)
