"""The training engine: learning, exact resume, divergence, MLflow logging."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from alwa_sweep.tracking import MlflowHook, get_or_create_experiment, open_store, sqlite_uri
from trainers.checkpoint import load_latest_checkpoint
from trainers.config import load_config
from trainers.data.synthetic import make_synthetic
from trainers.data.voc import VOCDetection
from trainers.detectors import build_detector
from trainers.engine import TrainingHook, train
from trainers.evaluation import voc_map
from trainers.schedule import StepSchedule


@pytest.fixture(scope="module")
def synthetic_voc_large(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("voc_large"), format="voc", images=200, seed=3)


class Collect(TrainingHook):
    """Keeps every row and evaluation; optionally interrupts at an iteration."""

    def __init__(self, stop_at: int | None = None):
        self.rows, self.evaluations, self.finished = [], [], None
        self.stop_at = stop_at

    def on_iteration(self, iteration):
        if self.stop_at is not None and iteration == self.stop_at:
            raise KeyboardInterrupt("simulated kill")

    def log_iterations(self, rows):
        self.rows.extend(rows)

    def log_evaluation(self, epoch, iteration, metrics):
        self.evaluations.append((epoch, metrics))

    def finish(self, status, reason, metrics):
        self.finished = (status, reason)


def map_of_checkpoint(config: dict, data: dict, checkpoints) -> float:
    """VOC mAP of the newest checkpoint's model on the test split, computed here,
    one image at a time, independently of the engine's evaluation."""
    state, _ = load_latest_checkpoint(checkpoints)
    resolved = load_config(config)
    dataset = VOCDetection(data["root"], sets=[tuple(s.split("/")) for s in data["test_sets"]])
    model = build_detector(resolved.model.model_copy(update={"num_classes": 20, "min_size": 128, "max_size": 128}))
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        detections = [model([dataset[i][0]])[0] for i in range(len(dataset))]
    return voc_map(detections, dataset.annotations)["map"]


def tiny_config(data: dict, **sections) -> dict:
    config = {
        "dataset": {"kind": "voc", "root": data["root"], "train_sets": data["train_sets"],
                    "test_sets": data["test_sets"], "scale": [128, 128], "num_workers": 0},
        "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
        "weighting": {"method": "none"},
        "schedule": {"unit": "iter", "max_iters": 20, "steps": [15], "warmup_iters": 5},
        "train": {"batch_size": 4, "log_every": 5, "eval_every": 0},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def test_lr_schedule_matches_mmdetection_warmup_and_steps():
    schedule = StepSchedule(base_lr=0.02, total_iters=1000, step_iters=(600, 900), gamma=0.1,
                            warmup_iters=500, warmup_ratio=0.001)
    assert schedule.lr_at(0) == pytest.approx(0.02 * 0.001)
    assert schedule.lr_at(250) == pytest.approx(0.02 * (1 - 0.999 * 0.5))
    assert schedule.lr_at(500) == pytest.approx(0.02)
    assert schedule.lr_at(599) == pytest.approx(0.02)
    assert schedule.lr_at(600) == pytest.approx(0.002)
    assert schedule.lr_at(950) == pytest.approx(0.0002)


@pytest.mark.slow
@pytest.mark.parametrize("detector, variant", [("faster_rcnn", 1), ("retinanet", 2)])
def test_tiny_detector_learns_with_alwa(synthetic_voc_large, tmp_path, detector, variant):
    """A few hundred iterations: loss falls, mAP clearly above zero, α and window stats
    logged into a real SQLite MLflow store."""
    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = open_store(uri)
    experiment = get_or_create_experiment(client, "engine-test")
    logger = MlflowHook.create(client, experiment, f"tiny-{detector}")
    collect = Collect()
    config = tiny_config(
        synthetic_voc_large, model={"detector": detector},
        weighting={"method": "alwa", "variant": variant, "interval": 20},
        schedule={"max_iters": 240, "steps": [200], "warmup_iters": 50},
        optimizer={"lr": 0.02 if detector == "faster_rcnn" else 0.01},
        train={"batch_size": 4, "log_every": 20, "eval_every": 0})
    result = train(config, workdir=tmp_path / "run", hooks=[logger, collect])
    assert result.status == "ok" and result.iterations == 240
    losses = [row["train/loss"] for row in collect.rows]
    assert len(losses) == 240
    assert sum(losses[-40:]) / 40 < 0.7 * sum(losses[:20]) / 20
    assert result.metrics["val/map"] > 0.05
    run = client.get_run(logger.run_id)
    assert run.data.tags["alwa.status"] == "ok"
    assert run.data.params["weighting.method"] == "alwa"
    alpha = client.get_metric_history(logger.run_id, "weight/alpha")
    # α is a step function: written at the first iteration and at each change (train.log_interval)
    changes = [r["step"] for prev, r in zip(collect.rows, collect.rows[1:]) if r["weight/alpha"] != prev["weight/alpha"]]
    assert sorted(m.step for m in alpha) == [1] + changes
    assert {m.step: m.value for m in alpha} == {r["step"]: r["weight/alpha"] for r in collect.rows
                                                 if r["step"] in [1] + changes}
    window = client.get_metric_history(logger.run_id, "window/cls_mean")
    assert sorted(m.step for m in window) == list(range(20, 241, 20))
    # window statistics are those of the weighted records: check one window independently
    head = "rpn" if detector == "faster_rcnn" else "retina"
    records = [row[f"train/{head}_cls_weighted"] for row in collect.rows[20:40]]
    mean = sum(records) / 20
    assert [m.value for m in window if m.step == 40][0] == pytest.approx(mean, rel=1e-5)
    std = client.get_metric_history(logger.run_id, "window/cls_std")
    sample_std = (sum((r - mean) ** 2 for r in records) / 19) ** 0.5
    assert [m.value for m in std if m.step == 40][0] == pytest.approx(sample_std, rel=1e-4)
    assert client.get_metric_history(logger.run_id, "val/map")[-1].value == pytest.approx(
        result.metrics["val/map"])


def test_resume_reproduces_uninterrupted_run_bit_for_bit(synthetic_voc, tmp_path):
    config = tiny_config(synthetic_voc, weighting={"method": "alwa", "variant": 2, "interval": 4},
                         train={"checkpoint_every_iters": 7, "log_every": 5, "eval_every": 0},
                         dataset={"flip": 0.5})
    uninterrupted = Collect()
    train(config, workdir=tmp_path / "a", hooks=[uninterrupted])

    interrupted = Collect(stop_at=11)
    with pytest.raises(KeyboardInterrupt):
        train(config, workdir=tmp_path / "b", hooks=[interrupted])
    assert interrupted.finished[0] == "interrupted"
    resumed = Collect()
    result = train(config, workdir=tmp_path / "b", hooks=[resumed], resume=True)
    assert result.status == "ok"
    # the last checkpoint before iteration 11 is the one after iteration 7
    assert [row["step"] for row in resumed.rows] == list(range(8, 21))
    expected = {row["step"]: row for row in uninterrupted.rows}
    for row in resumed.rows:
        assert row == expected[row["step"]]  # every loss, weight and α, bit for bit


def test_non_finite_loss_ends_run_with_status_nan(synthetic_voc, tmp_path):
    config = tiny_config(synthetic_voc, optimizer={"lr": 1e12}, schedule={"warmup_iters": 0},
                         train={"log_every": 2, "eval_every": 0})
    collect = Collect()
    result = train(config, workdir=tmp_path, hooks=[collect])
    assert result.status == "nan"
    assert "non-finite loss at iteration" in result.reason
    assert collect.finished[0] == "nan"
    assert not math.isfinite(collect.rows[-1]["train/loss"])
    assert all(math.isfinite(row["train/loss"]) for row in collect.rows[:-1])


def test_resumed_mlflow_run_has_no_duplicate_steps(synthetic_voc, tmp_path):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = open_store(uri)
    experiment = get_or_create_experiment(client, "resume-test")
    config = tiny_config(synthetic_voc, train={"checkpoint_every_iters": 6, "log_every": 4, "eval_every": 0,
                                               "log_interval": 1})
    first = MlflowHook.create(client, experiment, "resumable")
    with pytest.raises(KeyboardInterrupt):  # steps 1..8 were flushed, checkpoint at 6
        train(config, workdir=tmp_path / "run", hooks=[first, Collect(stop_at=10)])
    interrupted = client.get_run(first.run_id)
    assert interrupted.data.tags["alwa.status"] == "interrupted" and interrupted.info.status == "KILLED"
    second = MlflowHook(MlflowClient(uri), first.run_id)
    train(config, workdir=tmp_path / "run", hooks=[second], resume=True)
    steps = [m.step for m in client.get_metric_history(first.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 21))
    assert client.get_run(first.run_id).data.tags["alwa.status"] == "ok"


def test_overflowing_weighting_ends_run_with_status_overflow(synthetic_voc, tmp_path):
    # DWA with a tiny temperature: exp(r / T) overflows once the loss ratios are available
    config = tiny_config(synthetic_voc, weighting={"method": "dwa", "temperature": 1e-4, "period": 3},
                         train={"log_every": 5, "eval_every": 0})
    collect = Collect()
    result = train(config, workdir=tmp_path, hooks=[collect])
    assert result.status == "overflow", result.reason
    assert collect.finished[0] == "overflow"


def test_evaluation_matches_independent_voc_map(synthetic_voc, tmp_path):
    """The engine's per-epoch metric equals voc_map on the model's own detections."""
    config = tiny_config(synthetic_voc, schedule={"max_iters": 10, "steps": [8]})
    result = train(config, workdir=tmp_path, hooks=[Collect()])
    assert result.metrics["val/map"] == pytest.approx(
        map_of_checkpoint(config, synthetic_voc, tmp_path / "checkpoints"), abs=1e-6)


def _ddp_worker(rank: int, world: int, init_file: str, config: dict, workdir: str, out: str):
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        collect = Collect()
        result = train(config, workdir=workdir, hooks=[collect] if rank == 0 else [])  # rank 0 logs
        with open(f"{out}.{rank}", "w") as handle:
            json.dump({"status": result.status, "metrics": result.metrics, "rows": len(collect.rows),
                       "finished": collect.finished}, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_ddp_run_logs_on_rank0_and_gathers_evaluation(synthetic_voc, tmp_path):
    import json

    import torch.multiprocessing as mp

    config = tiny_config(synthetic_voc, weighting={"method": "alwa", "variant": 1, "interval": 3},
                         schedule={"max_iters": 8, "steps": [6], "warmup_iters": 2})
    out = str(tmp_path / "result")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), config, str(tmp_path / "run"), out), nprocs=2)
    rank0 = json.loads(open(f"{out}.0").read())
    rank1 = json.loads(open(f"{out}.1").read())
    assert rank0["status"] == rank1["status"] == "ok"
    assert rank0["rows"] == 8 and rank0["finished"][0] == "ok"
    assert rank1["rows"] == 0 and rank1["finished"] is None  # only rank 0 logs
    # rank 0's mAP covers the whole test set: both ranks' shards, gathered
    assert rank0["metrics"]["val/map"] == pytest.approx(
        map_of_checkpoint(config, synthetic_voc, tmp_path / "run" / "checkpoints"), abs=1e-6)
