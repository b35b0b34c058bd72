"""The tiny sweep spec the sweep tests start from: a tiny Faster R-CNN on the synthetic
VOC tree, one CPU per trial, a schedule of a few iterations."""

from __future__ import annotations


def tiny_sweep_spec(data: dict, grid, *, name: str = "testsweep", experiment: str = "sweep-test",
                    schedule: dict | None = None, train: dict | None = None, **extra) -> dict:
    """A spec dict; ``schedule`` replaces the base's schedule, ``train`` fields of its train section,
    ``extra`` sets top-level keys (``resources``, ``max_concurrent``, …)."""
    spec = {
        "name": name, "experiment": experiment,
        "base": {
            "dataset": {"kind": "voc", "root": str(data["root"]), "train_sets": data["train_sets"],
                        "test_sets": data["test_sets"], "scale": [128, 128], "num_workers": 0},
            "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
            "schedule": schedule or {"unit": "iter", "max_iters": 16, "steps": [12], "warmup_iters": 4},
            "train": {"batch_size": 4, "log_every": 4, "eval_every": 0, "checkpoint_every_iters": 8,
                      "log_interval": 1, **(train or {})},
        },
        "grid": grid, "resources": {"cpus_per_worker": 1}, "max_failures": 1,
    }
    spec.update(extra)
    return spec
