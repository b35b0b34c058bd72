"""ASHA on the spec's metric, never on a score a trial has not earned, and a trial it
stops recorded as ``stopped`` in MLflow."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from alwa_sweep.schedulers import build_scheduler, scheduler_metric, tune_result
from alwa_sweep.tracking import sqlite_uri
from reports.schema import STATUS_OK, STATUS_STOPPED, TAG_REASON, TAG_STATUS
from sweep_specs import tiny_sweep_spec


def test_metric_defaults_to_the_main_metric_and_takes_short_names():
    assert scheduler_metric({"type": "asha"}) == "val/map"
    assert scheduler_metric({"type": "asha"}, "coco") == "val/ap"
    assert scheduler_metric({"metric": "ap50"}) == "val/ap50"
    assert scheduler_metric({"metric": "loss"}) == "loss"
    assert scheduler_metric({"metric": "val/ap/car"}) == "val/ap/car"
    asha = build_scheduler({"type": "asha", "metric": "map", "mode": "min", "grace_period": 2,
                            "reduction_factor": 2}, max_epochs=8)
    assert (asha.metric, asha._mode, asha._time_attr, asha._max_t) == ("val/map", "min", "epoch", 8)
    assert build_scheduler({"type": "none"}, 8) is None


def test_no_score_before_the_first_evaluation():
    before = tune_result(10, 1, "running", {}, loss=1.5)
    assert "val/map" not in before and "score" not in before and before["loss"] == 1.5
    after = tune_result(20, 2, "running", {"val/map": 0.25, "val/ap/car": 0.5, "val/bad": math.nan})
    assert after["val/map"] == after["score"] == 0.25 and after["val/ap/car"] == 0.5
    assert "val/bad" not in after


def _asha_spec(data: dict) -> dict:
    # in grid order (one at a time): a learning trial, then two that do not learn
    grid = {"variant": [{"optimizer.lr": 0.01}, {"optimizer.lr": 1.0e-9}, {"optimizer.lr": 1.0e-9, "train.seed": 1}]}
    return tiny_sweep_spec(data, grid, name="ashasweep", experiment="asha-test",
                           schedule={"unit": "epoch", "epochs": 2, "steps": [2], "warmup_iters": 2},
                           train={"log_every": 2, "checkpoint_every_iters": 1000}, max_concurrent=1, max_failures=0,
                           scheduler={"type": "asha", "metric": "loss", "mode": "min", "grace_period": 1,
                                      "reduction_factor": 2})


@pytest.mark.slow
def test_asha_stops_a_worse_trial_and_it_is_recorded_stopped(local_ray, synthetic_voc, tmp_path):
    from alwa_sweep.spec import load_spec
    from alwa_sweep.tune import run_sweep

    spec = load_spec(_asha_spec(synthetic_voc))
    uri = sqlite_uri(tmp_path / "mlflow.db")
    run_sweep(spec, tmp_path / "sweeps" / "asha", uri, progress=False)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("asha-test")
    trials = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("alwa.kind") == "trial"]
    assert len(trials) == 3
    by_lr = sorted(trials, key=lambda r: (-float(r.data.params["optimizer.lr"]), r.data.params["train.seed"]))
    first = by_lr[0]
    assert first.data.tags[TAG_STATUS] == STATUS_OK  # the first trial at the rung always goes on
    stopped = [r for r in by_lr[1:] if r.data.tags[TAG_STATUS] == STATUS_STOPPED]
    assert stopped, [(r.data.tags[TAG_STATUS], r.data.tags.get(TAG_REASON)) for r in by_lr]
    for run in stopped:
        assert "stopped early" in run.data.tags[TAG_REASON]
        # it was stopped at the first rung: it never logged the second epoch's steps
        assert max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) < \
            max(m.step for m in client.get_metric_history(first.info.run_id, "train/loss"))
