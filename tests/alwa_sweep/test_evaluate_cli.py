"""``alwa-sweep evaluate`` on the small synthetic VOC and COCO trees (conftest fixtures).

Detections are built from the raw XML / JSON ground truth (not through the data module),
and the expected numbers come from closed forms: perfect detections give AP 1; one
false positive ranked above the n true positives of a class gives that class
AP = n / (n + 1) with either VOC method (the precision n/(n+1) at full recall is the
envelope's value everywhere).
"""

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from alwa_sweep.cli import main


def voc_objects(root):
    """[(image_id, class name, [x1, y1, x2, y2] as in the XML, difficult)] of 2007/test."""
    year_dir = Path(root) / "VOC2007"
    image_ids = (year_dir / "ImageSets" / "Main" / "test.txt").read_text().split()
    objects = []
    for image_id in image_ids:
        tree = ET.parse(year_dir / "Annotations" / f"{image_id}.xml")
        for obj in tree.getroot().findall("object"):
            box = [float(obj.find("bndbox").find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")]
            difficult = obj.find("difficult") is not None and obj.find("difficult").text == "1"
            objects.append((image_id, obj.find("name").text, box, difficult))
    return objects


def printed_map(text):
    return float(re.search(r"mAP: ([0-9.]+)", text).group(1))


def run_cli(capsys, *argv):
    code = main(["evaluate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_voc_perfect_and_one_false_positive(synthetic_voc, tmp_path, capsys):
    root = synthetic_voc["root"]
    objects = voc_objects(root)
    class_order = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
                   "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
                   "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
    detections = []
    for k, (image_id, name, box, _) in enumerate(objects):
        entry = {"image_id": image_id, "bbox": box, "score": 0.5}
        if k % 2:  # both ways of naming the class
            entry["class"] = name
        else:
            entry["label"] = class_order.index(name) + 1
        detections.append(entry)
    path = tmp_path / "perfect.json"
    path.write_text(json.dumps(detections))
    code, out, _ = run_cli(capsys, "--dataset", "voc", "--voc-root", root,
                           "--sets", "2007/test", "--detections", str(path))
    assert code == 0
    assert printed_map(out) == pytest.approx(1.0)

    # A false positive on the first class, scored above everything.
    positives = {}
    for _, name, _, difficult in objects:
        positives.setdefault(name, 0)
        positives[name] += 0 if difficult else 1
    positives = {name: n for name, n in positives.items() if n}
    target = sorted(positives)[0]
    far = {"image_id": objects[0][0], "class": target, "bbox": [0, 0, 2, 2], "score": 0.99}
    path.write_text(json.dumps(detections + [far]))
    n = positives[target]
    expected = (sum(1.0 for _ in positives) - 1 + n / (n + 1)) / len(positives)
    for method in ("11point", "area"):
        code, out, _ = run_cli(capsys, "--dataset", "voc", "--voc-root", root,
                               "--detections", str(path), "--method", method)
        assert code == 0
        assert printed_map(out) == pytest.approx(expected, abs=1e-4)
        row = next(line for line in out.splitlines() if line.startswith(target + " "))
        num_gt, num_det, ap = row.split()[1:]
        assert int(num_gt) == n
        assert float(ap) == pytest.approx(n / (n + 1), abs=1e-4)
        assert int(num_det) == 1 + sum(1 for o in objects if o[1] == target)


def test_voc_errors_name_the_file(synthetic_voc, tmp_path, capsys):
    root = synthetic_voc["root"]
    missing = tmp_path / "missing.json"
    code, _, err = run_cli(capsys, "--dataset", "voc", "--voc-root", root,
                           "--detections", str(missing))
    assert code == 2 and str(missing) in err

    bad = tmp_path / "bad.json"
    image_id = voc_objects(root)[0][0]
    for content, problem in [
        ("{not json", "not valid JSON"),
        ('{"a": 1}', "expected a JSON list"),
        (json.dumps([{"image_id": "nope", "class": "bird", "bbox": [0, 0, 1, 1], "score": 1}]),
         "image_id 'nope'"),
        (json.dumps([{"image_id": image_id, "class": "unicorn", "bbox": [0, 0, 1, 1],
                      "score": 1}]), "unknown class 'unicorn'"),
        (json.dumps([{"image_id": image_id, "label": 3, "bbox": [0, 0, 1], "score": 1}]),
         "bbox"),
    ]:
        bad.write_text(content)
        code, _, err = run_cli(capsys, "--dataset", "voc", "--voc-root", root,
                               "--detections", str(bad))
        assert code == 2, content
        assert str(bad) in err and problem in err, err


def test_coco_perfect_results(synthetic_coco, tmp_path, capsys):
    ground_truth = json.loads(Path(synthetic_coco["val_ann"]).read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 0.9} for a in ground_truth["annotations"] if not a.get("iscrowd")]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    code, out, _ = run_cli(capsys, "--dataset", "coco", "--ann-file", synthetic_coco["val_ann"],
                           "--detections", str(path))
    assert code == 0
    assert re.search(r"\bAP 1\.0000\b", out)
    for category in ground_truth["categories"]:
        count = sum(1 for a in ground_truth["annotations"]
                    if a["category_id"] == category["id"] and not a.get("iscrowd"))
        if count:
            row = next(line for line in out.splitlines() if line.startswith(category["name"]))
            assert row.split()[1:] == [str(count), str(count), "1.0000"]


def test_coco_results_for_unknown_image(synthetic_coco, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"image_id": 10 ** 9, "category_id": 1, "bbox": [0, 0, 1, 1],
                                 "score": 0.5}]))
    code, _, err = run_cli(capsys, "--dataset", "coco", "--ann-file", synthetic_coco["val_ann"],
                           "--detections", str(path))
    assert code == 2 and str(path) in err and "image_id" in err
