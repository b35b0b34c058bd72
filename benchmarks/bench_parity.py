"""model.parity mmdet vs torchvision: how far the RPN losses that ALWA reads move apart.

A tiny Faster R-CNN is trained with each parity for ``--iters`` iterations (several
seeds) on synthetic VOC data whose images are cropped to portrait and landscape shapes
(as VOC's are), so a batch is padded and the anchors over the padding are invalid
under parity mmdet. For each run it prints the statistics of the per-iteration RPN
losses (mean and sample std of ``rpn_cls`` and ``rpn_reg``, what ALWA's update reads),
the α ALWA_1 / ALWA_2 would compute from them (reg / cls, capped at 1), the throughput,
and then how far the two parities are apart compared with the seed-to-seed spread.

    python benchmarks/bench_parity.py                 # 100 iterations, seeds 0 1, batch 2
    python benchmarks/bench_parity.py --iters 200 --seeds 0 1 2 --batch-size 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from trainers.data.synthetic import make_synthetic
from trainers.engine import TrainingLogger, train


def make_mixed_aspect_voc(out_dir: Path, images: int, seed: int) -> dict:
    """Synthetic VOC whose images are cropped to 128×80 (landscape) or 80×128 (portrait),
    alternately; boxes are clipped, objects with less than half their area left dropped
    (an image that would lose every object stays square)."""
    paths = make_synthetic(out_dir, format="voc", images=images, seed=seed)
    voc = Path(paths["root"]) / "VOC2007"
    for index, xml_path in enumerate(sorted((voc / "Annotations").glob("*.xml"))):
        crop_w, crop_h = (128, 80) if index % 2 == 0 else (80, 128)
        tree = ET.parse(xml_path)
        root = tree.getroot()
        kept = []
        for obj in root.findall("object"):
            box = obj.find("bndbox")
            x1, y1, x2, y2 = (float(box.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax"))
            cx2, cy2 = min(x2, crop_w), min(y2, crop_h)
            if cx2 - x1 >= 4 and cy2 - y1 >= 4 and (cx2 - x1) * (cy2 - y1) >= 0.5 * (x2 - x1) * (y2 - y1):
                kept.append((obj, cx2, cy2))
        if not kept:
            continue
        for obj in root.findall("object"):
            if all(obj is not k[0] for k in kept):
                root.remove(obj)
        for obj, cx2, cy2 in kept:
            box = obj.find("bndbox")
            box.find("xmax").text, box.find("ymax").text = str(int(cx2)), str(int(cy2))
        size = root.find("size")
        size.find("width").text, size.find("height").text = str(crop_w), str(crop_h)
        tree.write(xml_path)
        image_path = voc / "JPEGImages" / root.find("filename").text
        with Image.open(image_path) as image:
            image.crop((0, 0, crop_w, crop_h)).save(image_path, quality=95)
    return paths


class LossRecorder(TrainingLogger):
    def __init__(self):
        self.rows: list[dict] = []

    def log_iterations(self, rows):
        self.rows.extend(rows)


def run(paths: dict, parity: str, seed: int, iters: int, batch_size: int, workdir: Path) -> dict:
    config = {
        "dataset": {"kind": "voc", "root": paths["root"], "train_sets": paths["train_sets"],
                    "test_sets": paths["test_sets"], "class_names": paths["class_names"],
                    "scale": [128, 128], "num_workers": 0},
        "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none", "parity": parity},
        "weighting": {"method": "none"},
        "optimizer": {"type": "sgd", "lr": 0.02},
        "schedule": {"unit": "iter", "max_iters": iters, "steps": [int(iters * 0.9)], "warmup_iters": iters // 5},
        "train": {"batch_size": batch_size, "seed": seed, "device": "cpu", "amp": False, "eval_every": 0,
                  "log_every": 10, "eval_max_images": 4},
    }
    recorder = LossRecorder()
    started = time.perf_counter()
    result = train(config, workdir=workdir / f"{parity}-{seed}", logger=recorder)
    seconds = time.perf_counter() - started
    assert result.status == "ok", result.reason
    cls = [float(r["train/rpn_cls"]) for r in recorder.rows]
    reg = [float(r["train/rpn_reg"]) for r in recorder.rows]
    stats = {
        "cls_mean": statistics.fmean(cls), "cls_std": statistics.stdev(cls),
        "reg_mean": statistics.fmean(reg), "reg_std": statistics.stdev(reg),
        "img_per_s": len(cls) * batch_size / seconds,  # includes the 4-image evaluation
    }
    cls1, reg1 = stats["cls_mean"] + stats["cls_std"], stats["reg_mean"] + stats["reg_std"]
    stats["alpha1"] = min(1.0, reg1 / cls1)
    stats["alpha2"] = min(1.0, stats["reg_std"] / stats["cls_std"])
    return stats


def step_times(sizes=(128, 256), reps: int = 25, batch_size: int = 2) -> list[tuple[int, float, float]]:
    """Fastest of ``reps`` training steps (forward + backward + SGD) per parity, the two
    parities interleaved step by step: on a shared machine the minimum is the time least
    inflated by other processes."""
    import torch

    from trainers.detectors import build_detector

    rows = []
    for size in sizes:
        torch.manual_seed(0)
        short = size * 5 // 8
        images = [torch.rand(3, size, short), torch.rand(3, short, size)][:batch_size] * (batch_size // 2 or 1)
        targets = [{"boxes": torch.tensor([[4.0, 6.0, short * 0.8, size * 0.7]]), "labels": torch.tensor([1])},
                   {"boxes": torch.tensor([[8.0, 4.0, size * 0.6, short * 0.9]]), "labels": torch.tensor([2])}]
        targets = targets[:batch_size] * (batch_size // 2 or 1)
        models, optimizers, times = {}, {}, {"torchvision": [], "mmdet": []}
        for parity in times:
            models[parity] = build_detector({"detector": "faster_rcnn", "backbone": "tiny", "num_classes": 4,
                                             "min_size": size, "max_size": size, "parity": parity}).train()
            optimizers[parity] = torch.optim.SGD(models[parity].parameters(), lr=0.001, momentum=0.9)
        for rep in range(reps + 2):
            for parity in times:
                started = time.perf_counter()
                loss = sum(models[parity](images, targets).values())
                optimizers[parity].zero_grad()
                loss.backward()
                optimizers[parity].step()
                if rep >= 2:  # warm-up steps not timed
                    times[parity].append(time.perf_counter() - started)
        rows.append((size, min(times["torchvision"]), min(times["mmdet"])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_mixed_aspect_voc(tmp / "data", args.images, seed=0)
        results = {p: [run(paths, p, s, args.iters, args.batch_size, tmp / "runs") for s in args.seeds]
                   for p in ("torchvision", "mmdet")}

    keys = ("cls_mean", "cls_std", "reg_mean", "reg_std", "alpha1", "alpha2", "img_per_s")
    print(f"tiny Faster R-CNN, {args.iters} iterations × batch {args.batch_size}, seeds {args.seeds}, "
          "mixed 128×80 / 80×128 synthetic VOC")
    print(f"{'parity':12s} {'seed':>4s} " + " ".join(f"{k:>9s}" for k in keys))
    for parity, runs in results.items():
        for seed, stats in zip(args.seeds, runs):
            print(f"{parity:12s} {seed:4d} " + " ".join(f"{stats[k]:9.4f}" for k in keys))
    print("\nper statistic: mean over seeds (torchvision → mmdet), relative change, and the change in units of")
    print("the seed-to-seed spread (max - min over seeds of either parity; > 1: beyond seed noise)")
    for key in keys:
        tv = [r[key] for r in results["torchvision"]]
        mm = [r[key] for r in results["mmdet"]]
        spread = max(max(tv) - min(tv), max(mm) - min(mm)) if len(args.seeds) > 1 else float("nan")
        delta = statistics.fmean(mm) - statistics.fmean(tv)
        ratio = delta / abs(statistics.fmean(tv)) if statistics.fmean(tv) else float("nan")
        in_spread = abs(delta) / spread if spread else float("inf")
        print(f"  {key:9s} {statistics.fmean(tv):9.4f} → {statistics.fmean(mm):9.4f}  "
              f"{ratio:+8.1%}  {in_spread:6.2f} spreads")
    tv_speed = statistics.fmean(r["img_per_s"] for r in results["torchvision"])
    mm_speed = statistics.fmean(r["img_per_s"] for r in results["mmdet"])
    print(f"\nthroughput ratio mmdet / torchvision over the whole runs: {mm_speed / tv_speed:.3f} "
          "(includes data loading and evaluation; noisy on a shared machine)")
    print("\nfastest of 25 training steps, the parities interleaved (one portrait + one landscape image):")
    for size, tv, mm in step_times(batch_size=args.batch_size):
        print(f"  long side {size:4d}px: torchvision {tv * 1000:7.1f} ms, mmdet {mm * 1000:7.1f} ms, "
              f"ratio mmdet / torchvision {mm / tv:.3f}")


if __name__ == "__main__":
    main()
