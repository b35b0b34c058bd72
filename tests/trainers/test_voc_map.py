"""voc_map: hand-computed cases, the plain-loop reference on random inputs, input types."""

import numpy as np
import pytest
import torch

from trainers.errors import ConfigError
from trainers.evaluation import voc_map
from trainers.evaluation.voc_reference import voc_map_reference

BOTH_METHODS = pytest.mark.parametrize("method", ["11point", "area"])


def image(boxes=(), scores=(), labels=()):
    return {"boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            "scores": np.asarray(scores, dtype=np.float64),
            "labels": np.asarray(labels, dtype=np.int64)}


def truth(boxes=(), labels=(), difficult=None):
    entry = {"boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
             "labels": np.asarray(labels, dtype=np.int64)}
    if difficult is not None:
        entry["difficult"] = np.asarray(difficult, dtype=bool)
    return entry


def eleven_point_by_hand(points):
    """11-point AP from (recall, precision) points, thresholds as np.arange(0, 1.1, .1)."""
    total = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        total += max([p for r, p in points if r >= t], default=0.0)
    return total / 11


def area_by_hand(points):
    """Area under the precision envelope: sum over recall steps of the best precision
    at or after the step."""
    area, previous_recall = 0.0, 0.0
    for i, (recall, _) in enumerate(points):
        if recall > previous_recall:
            area += (recall - previous_recall) * max(p for _, p in points[i:])
            previous_recall = recall
    return area


BOX_A = [0, 0, 10, 10]
BOX_B = [20, 20, 40, 40]
FAR = [100, 100, 110, 110]


# ------------------------------------------------------------------ hand-computed
def test_duplicate_detection_on_one_gt_is_one_tp_one_fp():
    dets = [image([BOX_A, BOX_A, BOX_B], [0.9, 0.8, 0.7], [1, 1, 1])]
    gts = [truth([BOX_A, BOX_B], [1, 1])]
    # TP, FP (duplicate), TP over 2 ground truths.
    points = [(0.5, 1.0), (0.5, 0.5), (1.0, 2 / 3)]
    assert voc_map(dets, gts)["ap"][1] == pytest.approx(28 / 33, abs=1e-12)
    assert eleven_point_by_hand(points) == pytest.approx(28 / 33, abs=1e-12)
    assert voc_map(dets, gts, method="area")["ap"][1] == pytest.approx(5 / 6, abs=1e-12)
    assert area_by_hand(points) == pytest.approx(5 / 6, abs=1e-12)


@BOTH_METHODS
def test_score_ties_keep_image_order(method):
    # Same score: the FP in image 0 ranks before the TP in image 1.
    dets = [image([FAR], [0.8], [1]), image([BOX_B], [0.8], [1])]
    gts = [truth([BOX_A], [1]), truth([BOX_B], [1])]
    fp_first = [(0.0, 0.0), (0.5, 0.5)]
    expected = eleven_point_by_hand(fp_first) if method == "11point" else area_by_hand(fp_first)
    assert voc_map(dets, gts, method=method)["ap"][1] == pytest.approx(expected, abs=1e-12)
    # Swapping the images flips the order: TP first.
    swapped = voc_map(dets[::-1], gts[::-1], method=method)["ap"][1]
    tp_first = [(0.5, 1.0), (0.5, 0.5)]
    expected = eleven_point_by_hand(tp_first) if method == "11point" else area_by_hand(tp_first)
    assert swapped == pytest.approx(expected, abs=1e-12)
    assert swapped != pytest.approx(voc_map(dets, gts, method=method)["ap"][1])


def test_score_ties_keep_in_image_order():
    gts = [truth([BOX_A], [1])]
    fp_first = voc_map([image([FAR, BOX_A], [0.5, 0.5], [1, 1])], gts)["ap"][1]
    tp_first = voc_map([image([BOX_A, FAR], [0.5, 0.5], [1, 1])], gts)["ap"][1]
    assert fp_first == pytest.approx(eleven_point_by_hand([(0.0, 0.0), (1.0, 0.5)]))
    assert tp_first == pytest.approx(1.0)


@BOTH_METHODS
def test_detection_on_difficult_gt_is_ignored(method):
    gts = [truth([BOX_A, BOX_B], [1, 1], difficult=[True, False])]
    dets = [image([BOX_A, BOX_B, FAR], [0.9, 0.8, 0.7], [1, 1, 1])]
    # Ignored, TP, FP over one positive: (1, 1), (1, 0.5) -> AP 1. Counted as an FP,
    # the points would be (0, 0), (1, 0.5), (1, 1/3) -> AP 0.5 (both methods).
    assert voc_map(dets, gts, method=method)["ap"][1] == pytest.approx(1.0)
    # Recall is over non-difficult GTs only: missing the difficult one costs nothing.
    only_positive = [image([BOX_B], [0.8], [1])]
    assert voc_map(only_positive, gts, method=method)["ap"][1] == pytest.approx(1.0)


def test_difficult_hit_ranked_first_does_not_cost_precision():
    # Ignored detection ranked above a FP and a TP: points (0,0)->(1, 0.5) without it
    # being counted; if it counted as FP, precision at the TP would be 1/3.
    gts = [truth([BOX_A, BOX_B], [1, 1], difficult=[True, False])]
    dets = [image([BOX_A, FAR, BOX_B], [0.9, 0.8, 0.7], [1, 1, 1])]
    expected = eleven_point_by_hand([(0.0, 0.0), (1.0, 0.5)])
    assert voc_map(dets, gts)["ap"][1] == pytest.approx(expected)
    assert voc_map(dets, gts, method="area")["ap"][1] == pytest.approx(0.5)


def test_best_gt_difficult_hides_a_positive_behind_it():
    # The detection's best GT is the difficult one (IoU 1), so it is ignored even though
    # it also overlaps the positive at IoU 100/110: the devkit looks at the argmax only.
    gts = [truth([[0, 0, 10, 10], [0, 0, 10, 11]], [1, 1], difficult=[False, True])]
    dets = [image([[0, 0, 10, 11]], [0.9], [1])]
    assert voc_map(dets, gts)["ap"][1] == 0.0
    # Without the difficult GT the same detection is a TP.
    assert voc_map(dets, [truth([[0, 0, 10, 10]], [1])])["ap"][1] == 1.0


def test_equal_iou_goes_to_first_gt_in_annotation_order():
    # Two identical GTs, one difficult: the argmax picks the first one.
    dets = [image([BOX_A], [0.9], [1])]
    difficult_first = [truth([BOX_A, BOX_A, BOX_B], [1, 1, 1], difficult=[True, False, False])]
    positive_first = [truth([BOX_A, BOX_A, BOX_B], [1, 1, 1], difficult=[False, True, False])]
    assert voc_map(dets, difficult_first)["ap"][1] == 0.0  # ignored, nothing counted
    assert voc_map(dets, positive_first, method="area")["ap"][1] == pytest.approx(0.5)


@BOTH_METHODS
def test_empty_images_and_missing_classes(method):
    dets = [
        image([BOX_A], [0.9], [1]),            # TP for class 1
        image(),                               # empty image, no GT either
        image([BOX_B, BOX_A], [0.6, 0.4], [1, 3]),  # no GT here: FP class 1, class 3 only dets
        {"boxes": [], "scores": [], "labels": []},  # Python lists, empty, GT present
    ]
    gts = [
        truth([BOX_A], [1]),
        truth(),
        truth(),
        truth([BOX_B, BOX_A], [2, 4], difficult=[False, True]),  # class 2 never detected
    ]
    result = voc_map(dets, gts, method=method)
    assert set(result["ap"]) == {1, 2}  # 3: detections only; 4: difficult only
    class_1 = [(1.0, 1.0), (1.0, 0.5)]
    expected_1 = eleven_point_by_hand(class_1) if method == "11point" else area_by_hand(class_1)
    assert result["ap"][1] == pytest.approx(expected_1)
    assert result["ap"][2] == 0.0
    assert result["map"] == pytest.approx((expected_1 + 0.0) / 2)
    assert all(type(k) is int and type(v) is float for k, v in result["ap"].items())
    assert type(result["map"]) is float


def test_no_ground_truth_at_all():
    result = voc_map([image([BOX_A], [0.9], [1])], [truth()])
    assert result == {"map": 0.0, "ap": {}}
    assert voc_map([], []) == {"map": 0.0, "ap": {}}


def test_legacy_coordinates_change_a_borderline_iou():
    # Without +1: IoU 36/81 < 0.5 -> FP. With +1: 50/100 = 0.5 exactly -> TP (>=).
    gts = [truth([[0, 0, 9, 9]], [1])]
    dets = [image([[0, 0, 9, 4]], [0.9], [1])]
    assert voc_map(dets, gts)["ap"][1] == 0.0
    assert voc_map(dets, gts, legacy_coordinates=True)["ap"][1] == 1.0
    # And the threshold is inclusive without +1 too: 50/100.
    assert voc_map([image([[0, 0, 10, 5]], [0.9], [1])], [truth([BOX_A], [1])])["ap"][1] == 1.0


def test_iou_threshold_argument():
    # IoU of [5,0,15,10] with [0,0,10,10] is 50/150 = 1/3.
    dets = [image([[5, 0, 15, 10]], [0.9], [1])]
    gts = [truth([BOX_A], [1])]
    assert voc_map(dets, gts, iou_threshold=0.3)["ap"][1] == 1.0
    assert voc_map(dets, gts, iou_threshold=0.34)["ap"][1] == 0.0


def test_eleven_point_thresholds_are_the_float_aranges():
    # 5 positives: TP TP TP FP TP TP. Recall 3/5 (= 0.59999999999999998) does not reach
    # the threshold 0.6000000000000001 (np.arange, as mmdetection / py-faster-rcnn), so
    # t = 0.6 takes the best precision at recall 0.8 and 1.0 (5/6), not 1.
    gts = [truth([[i * 20, 0, i * 20 + 10, 10] for i in range(5)], [1] * 5)]
    boxes = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], FAR,
             [60, 0, 70, 10], [80, 0, 90, 10]]
    dets = [image(boxes, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [1] * 6)]
    assert voc_map(dets, gts)["ap"][1] == pytest.approx((6 + 5 * 5 / 6) / 11, abs=1e-12)
    points = [(0.2, 1), (0.4, 1), (0.6, 1), (0.6, 0.75), (0.8, 0.8), (1.0, 5 / 6)]
    assert voc_map(dets, gts, method="area")["ap"][1] == pytest.approx(area_by_hand(points))


def test_multiple_classes_mean():
    dets = [image([BOX_A, BOX_B, FAR], [0.9, 0.8, 0.95], [1, 2, 2])]
    gts = [truth([BOX_A, BOX_B], [1, 2])]
    result = voc_map(dets, gts, method="area")
    assert result["ap"] == {1: pytest.approx(1.0), 2: pytest.approx(0.5)}
    assert result["map"] == pytest.approx(0.75)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="method"):
        voc_map([], [], method="101point")
    with pytest.raises(ConfigError, match="detections"):
        voc_map([image()], [])
    with pytest.raises(ConfigError, match="iou_threshold"):
        voc_map([], [], iou_threshold=1.5)


# ------------------------------------------------------------------ input types
def test_torch_numpy_and_list_inputs_agree():
    dets, gts = random_input(np.random.default_rng(7), num_images=12)
    expected = voc_map(dets, gts)
    as_torch = [{k: torch.as_tensor(v) for k, v in d.items()} for d in dets]
    gts_torch = [{k: torch.as_tensor(v) for k, v in g.items()} for g in gts]
    assert voc_map(as_torch, gts_torch) == expected
    as_float32 = [{k: torch.as_tensor(v, dtype=torch.float32) if k != "labels"
                   else torch.as_tensor(v) for k, v in d.items()} for d in dets]
    assert voc_map(as_float32, gts_torch) == expected  # integer coordinates: exact in fp32
    as_lists = [{k: v.tolist() for k, v in d.items()} for d in dets]
    gts_lists = [{k: v.tolist() for k, v in g.items()} for g in gts]
    assert voc_map(as_lists, gts_lists) == expected


def test_difficult_optional():
    dets, gts = random_input(np.random.default_rng(3), num_images=8)
    without = [{k: v for k, v in g.items() if k != "difficult"} for g in gts]
    all_false = [dict(g, difficult=np.zeros(len(g["labels"]), bool)) for g in gts]
    assert voc_map(dets, without) == voc_map(dets, all_false)


# ------------------------------------------------------------------ vs reference
def random_input(rng, num_images, num_classes=4):
    """Small integer-coordinate scenes: IoU ties, score ties, duplicate GTs with a
    different difficult flag, empty images, classes with detections only."""
    dets, gts = [], []
    for _ in range(num_images):
        num_gt = int(rng.integers(0, 5))
        xy = rng.integers(0, 40, size=(num_gt, 2))
        wh = rng.integers(2, 20, size=(num_gt, 2))
        gt_boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float64)
        gt_labels = rng.integers(1, num_classes + 1, size=num_gt)
        difficult = rng.random(num_gt) < 0.25
        if num_gt and rng.random() < 0.3:  # an exact copy with the flag flipped
            gt_boxes = np.vstack([gt_boxes, gt_boxes[:1]])
            gt_labels = np.append(gt_labels, gt_labels[0])
            difficult = np.append(difficult, ~difficult[0])
        gts.append({"boxes": gt_boxes, "labels": gt_labels, "difficult": difficult})

        num_det = int(rng.integers(0, 12))
        source = rng.integers(0, max(len(gt_labels), 1), size=num_det)
        near = (rng.random(num_det) < 0.7) & (len(gt_labels) > 0)
        boxes = np.zeros((num_det, 4))
        labels = rng.integers(1, num_classes + 2, size=num_det)  # num_classes+1: no GT ever
        if len(gt_labels):
            boxes[near] = gt_boxes[source[near]] + rng.integers(-3, 4, size=(near.sum(), 4))
            labels[near] = np.where(rng.random(near.sum()) < 0.8, gt_labels[source[near]],
                                    labels[near])
        xy = rng.integers(0, 50, size=((~near).sum(), 2))
        boxes[~near] = np.concatenate([xy, xy + rng.integers(1, 20, size=xy.shape)], axis=1)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        scores = rng.integers(0, 6, size=num_det) / 5.0  # many ties
        dets.append({"boxes": boxes, "scores": scores, "labels": labels})
    return dets, gts


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("method", ["11point", "area"])
def test_matches_reference_on_random_inputs(method, legacy):
    rng = np.random.default_rng(1234 + legacy)
    compared_classes = 0
    for trial in range(60):
        dets, gts = random_input(rng, num_images=int(rng.integers(1, 15)))
        threshold = float(rng.choice([0.3, 0.5, 0.7]))
        fast = voc_map(dets, gts, iou_threshold=threshold, method=method,
                       legacy_coordinates=legacy)
        slow = voc_map_reference(dets, gts, iou_threshold=threshold, method=method,
                                 legacy_coordinates=legacy)
        assert fast["ap"].keys() == slow["ap"].keys(), trial
        for label in slow["ap"]:
            assert abs(fast["ap"][label] - slow["ap"][label]) <= 1e-9, (trial, label)
        assert abs(fast["map"] - slow["map"]) <= 1e-9, trial
        compared_classes += len(slow["ap"])
    assert compared_classes > 100  # the inputs really exercise the comparison


def test_reference_agrees_with_hand_computed_cases():
    # The reference itself must be right: spot-check it on two of the cases above.
    dets = [image([BOX_A, BOX_A, BOX_B], [0.9, 0.8, 0.7], [1, 1, 1])]
    gts = [truth([BOX_A, BOX_B], [1, 1])]
    assert voc_map_reference(dets, gts)["ap"][1] == pytest.approx(28 / 33)
    assert voc_map_reference(dets, gts, method="area")["ap"][1] == pytest.approx(5 / 6)
    dets = [image([[0, 0, 9, 4]], [0.9], [1])]
    gts = [truth([[0, 0, 9, 9]], [1])]
    assert voc_map_reference(dets, gts)["ap"][1] == 0.0
    assert voc_map_reference(dets, gts, legacy_coordinates=True)["ap"][1] == 1.0
