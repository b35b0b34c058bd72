"""Box-regression losses: hand-computed values and agreement with torch / torchvision.ops."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from trainers.errors import ConfigError
from trainers.losses import (
    REGRESSION_LOSSES,
    BoxRegressionLoss,
    ciou_loss,
    diou_loss,
    giou_loss,
    l1_loss,
    paired_box_iou,
    smooth_l1_loss,
)


def random_boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 50
    wh = torch.rand(n, 2, generator=generator) * 40 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_l1_family_by_hand():
    pred = torch.tensor([[0.5, -1.0, 2.0, 0.0], [0.1, 0.2, -0.3, 0.0]])
    target = torch.zeros(2, 4)
    assert torch.allclose(l1_loss(pred, target), torch.tensor([3.5, 0.6]))
    # beta = 1: 0.5·x² inside |x| < 1, |x| − 0.5 outside.
    expected = torch.tensor([0.125 + 0.5 + 1.5, 0.005 + 0.02 + 0.045])
    assert torch.allclose(smooth_l1_loss(pred, target, beta=1.0), expected)
    # beta = 0.5: 0.5·x²/0.5 = x² inside, |x| − 0.25 outside.
    expected = torch.tensor([0.25 + 0.75 + 1.75, 0.01 + 0.04 + 0.09])
    assert torch.allclose(smooth_l1_loss(pred, target, beta=0.5), expected)


def test_l1_family_matches_torch():
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(20, 4, generator=generator), torch.randn(20, 4, generator=generator)
    assert torch.allclose(l1_loss(pred, target), F.l1_loss(pred, target, reduction="none").sum(1))
    for beta in (1.0, 1 / 9, 0.0):
        expected = F.smooth_l1_loss(pred, target, beta=beta, reduction="none").sum(1)
        assert torch.allclose(smooth_l1_loss(pred, target, beta=beta), expected)


def test_iou_family_by_hand_same_aspect_ratio():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    iou = 1 / 7  # intersection 1, union 4 + 4 − 1
    assert torch.allclose(paired_box_iou(pred, target), torch.tensor([iou]))
    # Enclosing box (0, 0, 3, 3): area 9, diagonal² 18; centres (1, 1), (2, 2): distance² 2.
    assert torch.allclose(giou_loss(pred, target), torch.tensor([1 - (iou - (9 - 7) / 9)]))
    assert torch.allclose(diou_loss(pred, target), torch.tensor([1 - iou + 2 / 18]))
    # Same aspect ratio: CIoU's v term vanishes.
    assert torch.allclose(ciou_loss(pred, target), diou_loss(pred, target))


def test_ciou_by_hand_different_aspect_ratio():
    pred = torch.tensor([[0.0, 0.0, 4.0, 2.0]])
    target = torch.tensor([[0.0, 0.0, 2.0, 4.0]])
    iou = 4 / 12
    distance = 2 / 32  # centres (2, 1) and (1, 2); enclosing box (0, 0, 4, 4)
    v = 4 / math.pi**2 * (math.atan(2 / 4) - math.atan(4 / 2)) ** 2
    alpha = v / (1 - iou + v)
    assert torch.allclose(ciou_loss(pred, target), torch.tensor([1 - iou + distance + alpha * v]))


def test_disjoint_boxes_giou_exceeds_one():
    pred = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    target = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    # IoU 0, enclosing area 3, union 2 → GIoU = −1/3.
    assert torch.allclose(giou_loss(pred, target), torch.tensor([1 + 1 / 3]))


def _reference_terms(pred, target, eps=1e-7):
    """The hand-written IoU-family formulas trainers/losses.py used before torchvision.ops."""
    x1, y1, x2, y2 = pred.unbind(-1)
    gx1, gy1, gx2, gy2 = target.unbind(-1)
    inter_w = (torch.min(x2, gx2) - torch.max(x1, gx1)).clamp(min=0)
    inter = inter_w * (torch.min(y2, gy2) - torch.max(y1, gy1)).clamp(min=0)
    union = (x2 - x1) * (y2 - y1) + (gx2 - gx1) * (gy2 - gy1) - inter
    iou = inter / (union + eps)
    ew, eh = torch.max(x2, gx2) - torch.min(x1, gx1), torch.max(y2, gy2) - torch.min(y1, gy1)
    centre = ((x1 + x2 - gx1 - gx2) ** 2 + (y1 + y2 - gy1 - gy2) ** 2) / 4
    distance = centre / (ew**2 + eh**2 + eps)
    v = (4 / math.pi**2) * (torch.atan((gx2 - gx1) / (gy2 - gy1)) - torch.atan((x2 - x1) / (y2 - y1))) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return {
        "giou": 1 - (iou - (ew * eh - union) / (ew * eh + eps)),
        "diou": 1 - iou + distance,
        "ciou": 1 - iou + distance + alpha * v,
    }


@pytest.mark.parametrize("name, ours", [("giou", giou_loss), ("diou", diou_loss), ("ciou", ciou_loss)])
def test_iou_family_agrees_with_the_former_hand_written_formulas(name, ours):
    """trainers/losses.py now calls torchvision.ops; values and gradients are those of the
    hand-written implementation it replaced."""
    generator = torch.Generator().manual_seed(1)
    target = random_boxes(64, generator)
    pred_a = (target + torch.randn(64, 4, generator=generator) * 5).detach()
    pred_a = torch.cat([pred_a[:, :2], torch.max(pred_a[:, 2:], pred_a[:, :2] + 1)], dim=1).requires_grad_(True)
    pred_b = pred_a.detach().clone().requires_grad_(True)
    loss_ours = ours(pred_a, target)
    loss_ref = _reference_terms(pred_b, target)[name]
    assert loss_ours.shape == (64,)
    assert torch.allclose(loss_ours, loss_ref, atol=1e-5)
    loss_ours.sum().backward()
    loss_ref.sum().backward()
    assert torch.allclose(pred_a.grad, pred_b.grad, atol=1e-5)


def test_paired_box_iou_is_the_diagonal_of_box_iou():
    generator = torch.Generator().manual_seed(2)
    a, b = random_boxes(30, generator), random_boxes(30, generator)
    assert torch.allclose(paired_box_iou(a, b), torch.diagonal(box_iou(a, b)), atol=1e-6)


def test_regression_losses_by_name():
    generator = torch.Generator().manual_seed(0)
    deltas, target_deltas = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    assert set(REGRESSION_LOSSES) == {"l1", "smooth_l1", "giou", "diou", "ciou"}
    assert torch.equal(BoxRegressionLoss("l1").delta_loss(deltas, target_deltas), l1_loss(deltas, target_deltas))
    assert torch.equal(BoxRegressionLoss("smooth_l1", beta=0.3).delta_loss(deltas, target_deltas),
                       smooth_l1_loss(deltas, target_deltas, 0.3))


def test_box_regression_loss_encodes_or_decodes_with_the_coder():
    generator = torch.Generator().manual_seed(4)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchors, gt = random_boxes(8, generator), random_boxes(8, generator)
    deltas = torch.randn(8, 4, generator=generator) * 0.1

    l1 = BoxRegressionLoss("l1", loss_weight=2.0)(deltas, anchors, gt, coder)
    assert torch.allclose(l1, 2.0 * (deltas - coder.encode_single(gt, anchors)).abs().sum(1))

    giou = BoxRegressionLoss("giou", loss_weight=10.0)(deltas, anchors, gt, coder)
    decoded = coder.decode_single(deltas, anchors)
    assert torch.allclose(giou, 10.0 * _reference_terms(decoded, gt)["giou"], atol=1e-5)


def test_box_regression_loss_config_validation():
    assert BoxRegressionLoss.from_config(None, "model.losses.rpn_reg") == BoxRegressionLoss("l1", 1.0, 1.0)
    spec = BoxRegressionLoss.from_config({"type": "smooth_l1", "beta": 0.5, "loss_weight": 2}, "x")
    assert (spec.type, spec.beta, spec.loss_weight, spec.uses_decoded_boxes) == ("smooth_l1", 0.5, 2.0, False)
    assert BoxRegressionLoss.from_config({"type": "ciou"}, "x").uses_decoded_boxes

    with pytest.raises(ConfigError) as error:
        BoxRegressionLoss.from_config({"type": "iou"}, "model.losses.roi_reg")
    message = str(error.value)
    assert "model.losses.roi_reg.type" in message
    for allowed in ("l1", "smooth_l1", "giou", "diou", "ciou"):
        assert allowed in message
    with pytest.raises(ConfigError, match="model.losses.roi_reg.weight"):
        BoxRegressionLoss.from_config({"type": "l1", "weight": 2}, "model.losses.roi_reg")
    with pytest.raises(ConfigError, match="model.losses.roi_reg.beta"):
        BoxRegressionLoss.from_config({"type": "smooth_l1", "beta": -1}, "model.losses.roi_reg")
    with pytest.raises(ConfigError, match="model.losses.roi_reg.loss_weight"):
        BoxRegressionLoss.from_config({"loss_weight": "ten"}, "model.losses.roi_reg")
    with pytest.raises(ConfigError, match="model.losses.roi_reg"):
        BoxRegressionLoss.from_config("l1", "model.losses.roi_reg")


def test_half_precision_deltas_on_large_boxes_stay_finite():
    """Under AMP the heads emit fp16 deltas; a 600×1000 box's area overflows fp16."""
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    anchors = torch.tensor([[0.0, 0.0, 1000.0, 600.0], [100.0, 50.0, 900.0, 580.0]])
    gt = torch.tensor([[10.0, 5.0, 990.0, 590.0], [90.0, 60.0, 920.0, 570.0]])
    deltas = (torch.randn(2, 4) * 0.05).half()
    for loss_type in ("l1", "giou", "diou", "ciou"):
        loss = BoxRegressionLoss(loss_type)(deltas, anchors, gt, coder)
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all(), loss_type
        expected = BoxRegressionLoss(loss_type)(deltas.float(), anchors, gt, coder)
        assert torch.allclose(loss, expected)
