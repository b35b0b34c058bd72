"""Detectors: raw head losses, their normalisation, KPIs, config validation, weight loading.

All models here use the tiny backbone on ~96 px images (fast on CPU); one test builds
the ResNet-50 Faster R-CNN, and two build ResNet-50 backbones for weight loading.
"""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from trainers.config import parse_model
from trainers.detectors import DETECTORS, build_detector
from trainers.detectors.build import check_pretrained_weights, head_losses
from trainers.detectors.backbones import anchor_generator, imagenet_weights_path
from trainers.detectors.retinanet import RetinaNetHeadWithHeadLosses
from trainers.detectors.two_stage import RoIHeadsWithHeadLosses, RPNWithHeadLosses
from trainers.errors import ConfigError
from trainers.losses import BoxRegressionLoss, paired_box_iou

NUM_CLASSES = 3
EXPECTED_KEYS = {
    "faster_rcnn": {"rpn_cls", "rpn_reg", "roi_cls", "roi_reg"},
    "mask_rcnn": {"rpn_cls", "rpn_reg", "roi_cls", "roi_reg", "mask"},
    "retinanet": {"retina_cls", "retina_reg"},
}
WEIGHTED_HEAD = {"faster_rcnn": "rpn", "mask_rcnn": "rpn", "retinanet": "retina"}


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """These tensors are tiny: one thread is faster, and much faster on a shared CPU
    (two threads that wait for each other stall whenever a core is busy elsewhere)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(detector, loss_type="l1", **extra):
    head = "retina_reg" if detector == "retinanet" else "roi_reg"
    config = {
        "detector": detector,
        "backbone": "tiny",
        "pretrained": "none",
        "num_classes": NUM_CLASSES,
        "min_size": 96,
        "max_size": 96,
        "losses": {head: {"type": loss_type}},
    }
    config.update(extra)
    return config


def make_batch(with_masks, sizes=((96, 96), (80, 96)), boxes_per_image=((2, 1), (1, 3))):
    """Images of the given (H, W) with hand-placed boxes; masks fill the boxes."""
    generator = torch.Generator().manual_seed(0)
    layouts = [
        torch.tensor([[8.0, 10.0, 50.0, 60.0], [40.0, 30.0, 90.0, 75.0]]),
        torch.tensor([[20.0, 15.0, 70.0, 70.0]]),
    ]
    images, targets = [], []
    for (height, width), boxes, (first_label, second_label) in zip(sizes, layouts, boxes_per_image):
        images.append(torch.rand(3, height, width, generator=generator))
        labels = torch.tensor([first_label, second_label][: len(boxes)])
        target = {"boxes": boxes, "labels": labels}
        if with_masks:
            masks = torch.zeros(len(boxes), height, width, dtype=torch.uint8)
            for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
                mask[y1:y2, x1:x2] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


@pytest.mark.parametrize("loss_type", ["l1", "smooth_l1", "giou", "diou", "ciou"])
@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet", "mask_rcnn"])
def test_train_step_and_eval(detector, loss_type):
    torch.manual_seed(0)
    model = build_detector(tiny_config(detector, loss_type))
    images, targets = make_batch(with_masks=detector == "mask_rcnn")

    model.train()
    losses = model(images, targets)
    assert set(losses) == EXPECTED_KEYS[detector]
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    sum(losses.values()).backward()
    first_conv = model.backbone.stem[0].weight
    assert first_conv.grad is not None and torch.isfinite(first_conv.grad).all()
    assert first_conv.grad.abs().sum() > 0

    assert model.weighted_head == WEIGHTED_HEAD[detector]
    assert f"{model.weighted_head}_cls" in losses and f"{model.weighted_head}_reg" in losses
    assert set(model.kpis) == {"cls_acc", "reg_iou"}
    for name, value in model.kpis.items():
        assert value.dim() == 0 and not value.requires_grad, name
        assert 0.0 <= float(value) <= 1.0, name

    model.eval()
    if detector == "retinanet":
        model.score_thresh = 0.0  # untrained focal head: every score sits near the 0.01 prior
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == len(images)
    for detection, image in zip(detections, images):
        height, width = image.shape[-2:]
        assert detection["boxes"].shape[0] > 0
        # Original image coordinates (the second image is 80 px high, resized to 96).
        assert (detection["boxes"][:, [0, 2]] <= width + 1e-3).all()
        assert (detection["boxes"][:, [1, 3]] <= height + 1e-3).all()
        assert ((detection["labels"] >= 1) & (detection["labels"] <= NUM_CLASSES)).all()
        assert detection["scores"].shape == detection["labels"].shape
        if detector == "mask_rcnn":
            assert detection["masks"].shape[1:] == (1, height, width)


@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet", "mask_rcnn"])
def test_image_without_objects(detector):
    torch.manual_seed(0)
    model = build_detector(tiny_config(detector, "giou"))
    images, targets = make_batch(with_masks=detector == "mask_rcnn")
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    if detector == "mask_rcnn":
        targets[1]["masks"] = torch.zeros(0, 80, 96, dtype=torch.uint8)
    model.train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_kpis_follow_the_weighted_head():
    torch.manual_seed(0)
    model = build_detector(tiny_config("faster_rcnn"))
    images, targets = make_batch(with_masks=False)
    model.train()
    model(images, targets)
    assert model.kpis is model.rpn.kpis
    model.weighted_head = "roi"
    model(images, targets)
    assert model.kpis is model.roi_heads.kpis


def test_rpn_normalisation_matches_mmdetection():
    """rpn_reg = Σ_pos loss / (Σ_img max(#pos,1) + Σ_img max(#neg,1)); rpn_cls = BCE mean."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(5)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    # Few enough anchors that the sampler (256 per image) keeps every non-ignored one.
    anchors = [torch.tensor([[0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 30, 30], [10, 0, 40, 20], [2, 2, 8, 8.0]])] * 2
    # 1 = positive, 0 = negative, -1 = ignored; image 2 has no positive.
    labels = [torch.tensor([1.0, 0.0, 1.0, -1.0, 0.0]), torch.tensor([0.0, 0.0, -1.0, 0.0, 0.0])]
    gt = [anchors[0] + torch.tensor([1.0, -1.0, 2.0, 0.5]), torch.zeros(5, 4)]
    objectness = torch.randn(10, 1, generator=generator)
    deltas = torch.randn(10, 4, generator=generator) * 0.2

    for loss in (BoxRegressionLoss("l1"), BoxRegressionLoss("giou", loss_weight=10.0)):
        rpn = RPNWithHeadLosses(
            anchor_generator("tiny", False), torch.nn.Identity(), 0.7, 0.3, 256, 0.5,
            {"training": 100, "testing": 100}, {"training": 100, "testing": 100}, 0.7, reg_loss=loss,
        )
        losses = rpn.compute_head_losses(objectness, deltas, anchors, labels, gt)

        flat_labels = torch.cat(labels)
        flat_anchors, flat_gt = torch.cat(anchors), torch.cat(gt)
        positives = torch.tensor([0, 2])
        # 2 pos + 2 neg in image 1, max(0, 1) + 4 neg in image 2
        avg_factor = (2 + 2) + (1 + 4)
        if loss.type == "l1":
            target_deltas = coder.encode_single(flat_gt[positives], flat_anchors[positives])
            per_box = (deltas[positives] - target_deltas).abs().sum(1)
        else:
            decoded = coder.decode_single(deltas[positives], flat_anchors[positives])
            per_box = 10.0 * generalized_box_iou_loss(decoded, flat_gt[positives], reduction="none")
        assert torch.allclose(losses["rpn_reg"], per_box.sum() / avg_factor, atol=1e-6)

        sampled = flat_labels >= 0
        expected_cls = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], flat_labels[sampled])
        assert torch.allclose(losses["rpn_cls"], expected_cls)

        correct = ((objectness.flatten()[sampled] > 0).float() == flat_labels[sampled]).float().mean()
        assert torch.allclose(rpn.kpis["cls_acc"], correct)
        decoded = coder.decode_single(deltas[positives], flat_anchors[positives])
        expected_iou = torch.diagonal(torchvision.ops.box_iou(decoded, flat_gt[positives])).mean()
        assert torch.allclose(rpn.kpis["reg_iou"], expected_iou, atol=1e-6)


def test_roi_normalisation_matches_mmdetection():
    """roi_reg = Σ_pos class-specific loss / #sampled ROIs; roi_cls = CE mean."""
    torch.manual_seed(0)
    model = build_detector(tiny_config("faster_rcnn", loss_type="smooth_l1"))
    heads: RoIHeadsWithHeadLosses = model.roi_heads
    generator = torch.Generator().manual_seed(6)
    num_outputs = NUM_CLASSES + 1
    proposals = [
        torch.tensor([[0, 0, 10, 10], [5, 5, 25, 20], [3, 3, 9, 12.0]]),
        torch.tensor([[1, 2, 30, 40.0], [0, 0, 5, 5.0]]),
    ]
    gt = [p + 1.5 for p in proposals]
    labels = [torch.tensor([2, 0, 3]), torch.tensor([1, 0])]
    targets = [heads.box_coder.encode_single(g, p) for g, p in zip(gt, proposals)]
    class_logits = torch.randn(5, num_outputs, generator=generator)
    box_regression = torch.randn(5, num_outputs * 4, generator=generator) * 0.3

    losses = heads.compute_head_losses(class_logits, box_regression, proposals, labels, targets, gt)

    flat_labels = torch.cat(labels)
    per_class = box_regression.reshape(5, num_outputs, 4)
    positives = [0, 2, 3]
    per_box = [
        F.smooth_l1_loss(per_class[i, flat_labels[i]], torch.cat(targets)[i], beta=1.0, reduction="sum")
        for i in positives
    ]
    assert torch.allclose(losses["roi_reg"], sum(per_box) / 5)
    assert torch.allclose(losses["roi_cls"], F.cross_entropy(class_logits, flat_labels))
    assert torch.allclose(heads.kpis["cls_acc"], (class_logits.argmax(1) == flat_labels).float().mean())


def test_retinanet_normalisation_matches_mmdetection():
    """Both losses divided by Σ_img max(#pos, 1) over the batch; background column 0 left out."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(7)
    num_outputs, num_anchors = NUM_CLASSES + 1, 6
    head = RetinaNetHeadWithHeadLosses(8, 1, num_outputs, BoxRegressionLoss("l1"))
    anchors = [
        torch.tensor([[0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 30, 30], [10, 0, 40, 20], [2, 2, 8, 8], [1, 1, 9, 9.0]])
    ] * 2
    targets = [
        {"boxes": torch.tensor([[1, 1, 11, 11.0], [12, 1, 38, 22.0]]), "labels": torch.tensor([2, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    matched = [torch.tensor([0, -1, -2, 1, -1, 0]), torch.full((num_anchors,), -1)]
    outputs = {
        "cls_logits": torch.randn(2, num_anchors, num_outputs, generator=generator),
        "bbox_regression": torch.randn(2, num_anchors, 4, generator=generator) * 0.2,
    }
    losses = head.compute_loss(targets, outputs, anchors, matched)

    avg_factor = 3 + 1  # image 1: three positives; image 2: none → max(0, 1)
    class_target = torch.zeros(2, num_anchors, NUM_CLASSES)
    class_target[0, 0, 1] = class_target[0, 5, 1] = class_target[0, 3, 2] = 1  # labels 2, 2, 3 → columns 1, 1, 2
    valid = torch.ones(2, num_anchors, dtype=torch.bool)
    valid[0, 2] = False
    object_logits = outputs["cls_logits"][..., 1:]
    focal = sigmoid_focal_loss(object_logits[valid], class_target[valid], alpha=0.25, gamma=2, reduction="sum")
    assert torch.allclose(losses["retina_cls"], focal / avg_factor)

    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    positive_anchors = anchors[0][[0, 3, 5]]
    positive_gt = targets[0]["boxes"][[0, 1, 0]]
    expected_targets = coder.encode_single(positive_gt, positive_anchors)
    l1 = (outputs["bbox_regression"][0, [0, 3, 5]] - expected_targets).abs().sum()
    assert torch.allclose(losses["retina_reg"], l1 / avg_factor)

    decoded = coder.decode_single(outputs["bbox_regression"][0, [0, 3, 5]], positive_anchors)
    assert torch.allclose(head.kpis["reg_iou"], paired_box_iou(decoded, positive_gt).mean())
    # Balanced accuracy by hand: best object class if its logit > 0, else background.
    logits = outputs["cls_logits"][..., 1:]
    background = torch.zeros(2, num_anchors, dtype=torch.long)
    predicted = torch.where(logits.max(-1).values > 0, logits.argmax(-1) + 1, background)
    truth = torch.zeros(2, num_anchors, dtype=torch.long)
    truth[0, 0], truth[0, 3], truth[0, 5] = 2, 3, 2
    positive = truth > 0
    negative = valid & ~positive
    expected = ((predicted == truth)[positive].float().mean() + (predicted == truth)[negative].float().mean()) / 2
    assert torch.allclose(head.kpis["cls_acc"], expected)


def test_resnet50_faster_rcnn_forward():
    torch.manual_seed(0)
    model = build_detector(
        {"detector": "faster_rcnn", "backbone": "resnet50", "pretrained": "none", "num_classes": 20,
         "min_size": 64, "max_size": 96}
    )
    anchor_sizes = [s[0] for s in model.rpn.anchor_generator.sizes]
    assert anchor_sizes == [32, 64, 128, 256, 512]
    assert model.rpn.fg_bg_sampler.batch_size_per_image == 256
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    assert model.roi_heads.fg_bg_sampler.positive_fraction == 0.25
    assert model.roi_heads.box_predictor.cls_score.out_features == 21
    images = [torch.rand(3, 64, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 8.0, 60.0, 50.0]]), "labels": torch.tensor([4])}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == EXPECTED_KEYS["faster_rcnn"]
    assert all(torch.isfinite(v) for v in losses.values())


def test_retinanet_anchor_layout():
    generator = anchor_generator("resnet50", for_retinanet=True)
    assert generator.num_anchors_per_location() == [9] * 5
    assert generator.sizes[0] == pytest.approx((32, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)))


def test_imagenet_weights_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError) as error:
        build_detector({"detector": "faster_rcnn", "backbone": "resnet50", "pretrained": "imagenet", "num_classes": 20})
    message = str(error.value)
    assert "model.pretrained" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message
    assert "pretrained: none" in message

    config = {"detector": "mask_rcnn", "backbone": "resnet101", "pretrained": "imagenet"}
    model = parse_model(config)  # the cache is only checked when asked
    with pytest.raises(ConfigError, match="resnet101-63fe2227.pth"):
        check_pretrained_weights(model)


def test_imagenet_weights_are_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    reference = torchvision.models.resnet50()
    path = tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert imagenet_weights_path("resnet50") == str(path)
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)

    torch.manual_seed(2)
    r50_imagenet = {"detector": "retinanet", "backbone": "resnet50", "pretrained": "imagenet", "num_classes": 20}
    model = build_detector(r50_imagenet)
    body = model.backbone.body
    assert torch.equal(body.conv1.weight, reference.conv1.weight)
    assert torch.equal(body.layer3[2].conv2.weight, reference.layer3[2].conv2.weight)
    assert torch.equal(body.layer4[0].bn1.running_var, reference.layer4[0].bn1.running_var)
    # mmdetection's frozen_stages=1 with frozen BatchNorm.
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    assert isinstance(body.bn1, torchvision.ops.FrozenBatchNorm2d)

    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        build_detector(r50_imagenet)


@pytest.mark.parametrize(
    "override, field",
    [
        ({"detector": "yolo"}, "model.detector"),
        ({"detector": ["faster_rcnn"]}, "model.detector"),
        ({"backbone": "vgg16"}, "model.backbone"),
        ({"pretrained": "coco"}, "model.pretrained"),
        ({"pretrained": "imagenet"}, "model.pretrained"),  # tiny has no ImageNet weights
        ({"num_classes": 0}, "model.num_classes"),
        ({"min_size": 800, "max_size": 600}, "model.min_size"),
        ({"anchor_sizes": [8]}, "model.anchor_sizes"),
        ({"losses": {"roi_reg": {"type": "iou"}}}, "model.losses.roi_reg.type"),
        ({"losses": {"retina_reg": {"type": "l1"}}}, "model.losses.retina_reg"),
        ({"losses": {"rpn_reg": {"typ": "l1"}}}, "model.losses.rpn_reg.typ"),
    ],
)
def test_config_errors_name_the_field(override, field):
    config = tiny_config("faster_rcnn")
    config.update(override)
    with pytest.raises(ConfigError) as error:
        parse_model(config)
    assert str(error.value).startswith(field)


def test_validation_fills_defaults_and_build_needs_num_classes():
    resolved = parse_model({"detector": "retinanet", "backbone": "tiny"})
    assert head_losses(resolved) == {"retina_reg": BoxRegressionLoss("l1", 1.0, 1.0)}
    # the sizes come from dataset.scale in a full config; pretrained defaults per backbone
    assert (resolved.min_size, resolved.max_size, resolved.pretrained) == (None, None, "none")
    assert parse_model({"backbone": "resnet50"}).pretrained == "imagenet"
    assert set(DETECTORS) == {"faster_rcnn", "retinanet", "mask_rcnn", "libra_rcnn", "dynamic_rcnn",
                              "double_head_rcnn"}
    with pytest.raises(ConfigError, match="model.num_classes"):
        build_detector({"detector": "retinanet", "backbone": "tiny"})
    message = str(pytest.raises(ConfigError, parse_model, {"detector": "ssd"}).value)
    for allowed in ("faster_rcnn", "retinanet", "mask_rcnn"):
        assert allowed in message


def test_rpn_subclass_is_torchvisions():
    model = build_detector(tiny_config("mask_rcnn"))
    assert isinstance(model.rpn, RegionProposalNetwork)
    assert isinstance(model, torchvision.models.detection.MaskRCNN)
    assert model.roi_heads.has_mask()


def test_rpn_and_roi_losses_agree_with_torchvision_when_configured_alike():
    """With torchvision's smooth L1 (beta 1/9) and every image holding positives and
    negatives, the mmdetection normaliser equals torchvision's: the losses must match."""
    torch.manual_seed(0)
    torchvision_like = {"type": "smooth_l1", "beta": 1 / 9}
    losses = {"rpn_reg": torchvision_like, "roi_reg": torchvision_like}
    model = build_detector(tiny_config("faster_rcnn", losses=losses))
    images, targets = make_batch(with_masks=False)
    images, targets = model.transform(images, targets)
    features = model.backbone(images.tensors)
    rpn = model.rpn
    objectness, deltas = rpn.head(list(features.values()))
    anchors = rpn.anchor_generator(images, list(features.values()))
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
    torch.manual_seed(1)
    ours = rpn.compute_head_losses(objectness, deltas, anchors, labels, matched)
    torch.manual_seed(1)  # the same random sample of anchors
    regression_targets = rpn.box_coder.encode(matched, anchors)
    reference = RegionProposalNetwork.compute_loss(rpn, objectness, deltas, labels, regression_targets)
    assert torch.allclose(ours["rpn_cls"], reference[0])
    assert torch.allclose(ours["rpn_reg"], reference[1], rtol=1e-5)

    heads = model.roi_heads
    proposals = [t["boxes"] + torch.tensor([2.0, -1.0, 3.0, 1.0]) for t in targets]
    proposals = [torch.cat([p, torch.tensor([[0.0, 0.0, 20.0, 20.0], [60.0, 60.0, 95.0, 95.0]])]) for p in proposals]
    torch.manual_seed(2)
    sampled, matched_idxs, roi_labels, regression_targets = heads.select_training_samples(proposals, targets)
    box_features = heads.box_head(heads.box_roi_pool(features, sampled, images.image_sizes))
    class_logits, box_regression = heads.box_predictor(box_features)
    matched_gt = [t["boxes"][i] for t, i in zip(targets, matched_idxs)]
    ours = heads.compute_head_losses(class_logits, box_regression, sampled, roi_labels, regression_targets, matched_gt)
    reference = fastrcnn_loss(class_logits, box_regression, roi_labels, regression_targets)
    assert torch.allclose(ours["roi_cls"], reference[0])
    assert torch.allclose(ours["roi_reg"], reference[1], rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["l1", "smooth_l1", "giou", "diou", "ciou"])
def test_retinanet_box_loss_agrees_with_torchvision_for_one_image(loss_type):
    """For a single image both normalise by its number of positives (torchvision's head
    supports all five box losses through ``_loss_type``)."""
    torch.manual_seed(0)
    model = build_detector(tiny_config("retinanet", loss_type))
    images, targets = make_batch(with_masks=False)
    images, targets = model.transform(images[:1], targets[:1])
    features = list(model.backbone(images.tensors).values())
    outputs = model.head(features)
    anchors = model.anchor_generator(images, features)
    matched = [model.proposal_matcher(torchvision.ops.box_iou(targets[0]["boxes"], anchors[0]))]
    ours = model.head.compute_loss(targets, outputs, anchors, matched)
    model.head.regression_head._loss_type = loss_type
    reference = model.head.regression_head.compute_loss(targets, outputs, anchors, matched)
    assert torch.allclose(ours["retina_reg"], reference, rtol=1e-5)


@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet"])
def test_tiny_detector_fits_one_batch(detector):
    """A few SGD steps on one batch cut the classification loss: guards against heads
    that cannot learn (e.g. RetinaNet's N(0, 0.01) tower on 32 channels without norm)."""
    torch.manual_seed(0)
    model = build_detector(tiny_config(detector))
    images, targets = make_batch(with_masks=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    cls_key = "retina_cls" if detector == "retinanet" else "roi_cls"
    history = []
    for _ in range(30):
        losses = model(images, targets)
        history.append(losses[cls_key].item())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert history[-1] < 0.5 * history[0], history


WEIGHTING_CONFIGS = {
    "none": {"method": "none"},
    "fixed": {"method": "fixed", "cls": 0.5, "reg": 2.0},
    "alwa": {"method": "alwa", "variant": 2, "interval": 1},
    "guided": {"method": "guided"},
    "dwa": {"method": "dwa", "period": 1},
    "dtp": {"method": "dtp", "gamma": 2.0},
    "uncertainty": {"method": "uncertainty"},
}


@pytest.mark.parametrize("loss_type", ["l1", "smooth_l1", "giou", "diou", "ciou"])
@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet", "mask_rcnn"])
def test_every_weighting_method_trains_every_detector_and_loss(detector, loss_type):
    """detector × regression loss × weighting method: forward + weighted backward, finite
    losses, gradients reaching the backbone (and the learnable weights)."""
    from trainers.weighting import WEIGHTINGS, build_weighting

    assert set(WEIGHTING_CONFIGS) == set(WEIGHTINGS)
    torch.manual_seed(0)
    model = build_detector(tiny_config(detector, loss_type))
    model.train()
    images, targets = make_batch(with_masks=detector == "mask_rcnn")
    head = model.weighted_head
    for name, weighting_config in WEIGHTING_CONFIGS.items():
        weighting = build_weighting(weighting_config)
        for _ in range(3):  # the methods that update (ALWA, DWA) do so within these calls
            model.zero_grad(set_to_none=True)
            losses = model(images, targets)
            cls_w, reg_w = weighting(losses[f"{head}_cls"], losses[f"{head}_reg"], kpis=model.kpis)
            total = cls_w + reg_w + sum(v for k, v in losses.items() if k not in (f"{head}_cls", f"{head}_reg"))
            assert torch.isfinite(total), (name, loss_type)
            total.backward()
        stem = model.backbone.stem[0].weight.grad
        assert stem is not None and torch.isfinite(stem).all() and stem.abs().sum() > 0, name
        for parameter in weighting.parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
