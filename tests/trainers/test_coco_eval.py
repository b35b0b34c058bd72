"""coco_evaluate against COCO ground truth built in memory, with expected APs derived
from the box geometry (IoU known in closed form) and COCO's 101 recall points."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from trainers.errors import ConfigError
from trainers.evaluation import coco_evaluate
from trainers.evaluation.coco import predictions_to_coco_results

SIZE = 64
# Non-contiguous COCO category ids; the detector's labels 1, 2 map onto them.
CATEGORY_IDS = {1: 3, 2: 7}
# Ground truth per image id: (x1, y1, x2, y2, category id); all 20x20 (COCO "small").
GROUND_TRUTH = {
    11: [(10, 10, 30, 30, 3), (36, 36, 56, 56, 7)],
    12: [(4, 20, 24, 40, 7)],
    13: [(30, 4, 50, 24, 3), (8, 36, 28, 56, 3)],
}


def make_coco_gt() -> COCO:
    annotations = []
    for image_id, objects in GROUND_TRUTH.items():
        for x1, y1, x2, y2, category_id in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0, "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]})
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": SIZE, "height": SIZE, "file_name": f"{i}.jpg"}
                   for i in GROUND_TRUTH],
        "categories": [{"id": 3, "name": "cat_a"}, {"id": 7, "name": "cat_b"}],
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def predictions(shift=0.0, drop=(), with_masks=False, coco=None):
    label_of = {c: label for label, c in CATEGORY_IDS.items()}
    result = []
    for image_id, objects in GROUND_TRUTH.items():
        kept = [o for k, o in enumerate(objects) if (image_id, k) not in drop]
        boxes = np.array([[x1 + shift, y1, x2 + shift, y2] for x1, y1, x2, y2, _ in kept],
                         dtype=np.float32).reshape(-1, 4)
        entry = {"image_id": image_id, "boxes": torch.from_numpy(boxes),
                 "scores": torch.linspace(0.9, 0.5, len(kept)),
                 "labels": torch.tensor([label_of[o[4]] for o in kept], dtype=torch.int64)}
        if with_masks:
            ann_ids = coco.getAnnIds(imgIds=[image_id])
            anns = [a for k, a in enumerate(coco.loadAnns(ann_ids)) if (image_id, k) not in drop]
            # Probabilities: 0.9 inside the true mask, 0.2 outside.
            masks = np.stack([np.where(coco.annToMask(a) > 0, 0.9, 0.2) for a in anns]) \
                if anns else np.zeros((0, SIZE, SIZE))
            entry["masks"] = torch.from_numpy(masks.astype(np.float32))[:, None]  # (N,1,H,W)
        result.append(entry)
    return result


def test_perfect_boxes_give_ap_one():
    metrics = coco_evaluate(make_coco_gt(), predictions(), CATEGORY_IDS)
    assert set(metrics) == {"ap", "ap50", "ap75", "aps", "apm", "apl"}
    assert metrics["ap"] == pytest.approx(1.0)
    assert metrics["ap50"] == pytest.approx(1.0)
    assert metrics["ap75"] == pytest.approx(1.0)
    assert metrics["aps"] == pytest.approx(1.0)  # every object is small (20x20 < 32x32)
    assert metrics["apm"] == -1.0 and metrics["apl"] == -1.0  # COCOeval: undefined


def test_shifted_boxes_lower_ap_by_the_iou_thresholds_they_miss():
    # A 20x20 box shifted by 4 px: IoU = 16*20 / (800 - 320) = 2/3. It matches at the
    # thresholds 0.50, 0.55, 0.60, 0.65 (4 of the 10) and misses from 0.70 on.
    metrics = coco_evaluate(make_coco_gt(), predictions(shift=4.0), CATEGORY_IDS)
    assert metrics["ap"] == pytest.approx(0.4)
    assert metrics["ap50"] == pytest.approx(1.0)
    assert metrics["ap75"] == pytest.approx(0.0)


def test_half_recall_gives_51_of_101_recall_points():
    # Category 3 has 3 objects, category 7 has 2; leave out one of each: recall 2/3 and
    # 1/2, with no false positive, so precision is 1 up to the recall reached.
    # COCO samples precision at recall 0, 0.01, ..., 1: AP = (#points <= recall) / 101.
    drop = {(13, 1), (12, 0)}
    metrics = coco_evaluate(make_coco_gt(), predictions(drop=drop), CATEGORY_IDS)
    recall_3, recall_7 = 2 / 3, 1 / 2
    points = np.linspace(0, 1, 101)
    expected = np.mean([np.sum(points <= recall_3 + 1e-12) / 101,
                        np.sum(points <= recall_7 + 1e-12) / 101])
    assert metrics["ap"] == pytest.approx(expected)
    assert metrics["ap50"] == pytest.approx(expected)


def test_label_map_as_list_or_dict():
    as_list = [None, 3, 7]  # indexed by label; 0 is background
    coco = make_coco_gt()
    assert coco_evaluate(coco, predictions(shift=4.0), as_list) == \
        coco_evaluate(coco, predictions(shift=4.0), CATEGORY_IDS)


def test_results_are_xywh_with_category_ids():
    results = predictions_to_coco_results(predictions(), CATEGORY_IDS)
    first = results[0]
    assert first["image_id"] == 11 and first["category_id"] == 3
    assert first["bbox"] == pytest.approx([10, 10, 20, 20])
    assert first["score"] == pytest.approx(0.9)
    assert len(results) == sum(len(v) for v in GROUND_TRUTH.values())


def test_masks_give_segm_ap():
    coco = make_coco_gt()
    metrics = coco_evaluate(coco, predictions(with_masks=True, coco=coco), CATEGORY_IDS,
                            iou_types=("bbox", "segm"))
    assert metrics["ap"] == pytest.approx(1.0)
    assert metrics["segm_ap"] == pytest.approx(1.0)
    assert {"segm_ap50", "segm_ap75", "segm_aps", "segm_apm", "segm_apl"} <= set(metrics)
    # Boolean masks (no channel dimension) work the same way.
    preds = predictions(with_masks=True, coco=coco)
    for p in preds:
        p["masks"] = p["masks"][:, 0] > 0.5
    assert coco_evaluate(coco, preds, CATEGORY_IDS, iou_types=("segm",))["segm_ap"] == \
        pytest.approx(1.0)


def test_zero_predictions_give_zero_ap():
    coco = make_coco_gt()
    empty_images = [{"image_id": i, "boxes": torch.zeros((0, 4)), "scores": torch.zeros(0),
                     "labels": torch.zeros(0, dtype=torch.int64)} for i in GROUND_TRUTH]
    for preds in ([], empty_images):
        metrics = coco_evaluate(coco, preds, CATEGORY_IDS)
        assert metrics["ap"] == 0.0 and metrics["ap50"] == 0.0


def test_quiet_unless_verbose(capsys):
    coco = make_coco_gt()
    coco_evaluate(coco, predictions(), CATEGORY_IDS)
    assert capsys.readouterr().out == ""
    coco_evaluate(coco, predictions(), CATEGORY_IDS, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_only_listed_images_are_evaluated():
    # Image 13 not listed: its objects are not counted as missed.
    preds = [p for p in predictions() if p["image_id"] != 13]
    assert coco_evaluate(make_coco_gt(), preds, CATEGORY_IDS)["ap"] == pytest.approx(1.0)


def test_unknown_label_names_the_mapping():
    with pytest.raises(ConfigError, match="label_to_cat_id"):
        coco_evaluate(make_coco_gt(), predictions(), {1: 3})
