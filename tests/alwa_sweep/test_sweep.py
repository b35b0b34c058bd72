"""Sweeps: spec validation, a real local Ray Tune sweep into a real SQLite MLflow store,
a 2-worker gloo TorchTrainer trial, and driver kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from alwa_sweep.cli import main
from alwa_sweep.spec import expand_grid, load_spec
from alwa_sweep.tracking import sqlite_uri
from trainers.errors import UserInputError
from sweep_specs import tiny_sweep_spec as tiny_spec

REPO = Path(__file__).resolve().parents[2]
# released.yaml is the released settings the specs are checked against, not a spec.
SPECS = sorted(p for p in (REPO / "search_spaces").glob("*.yaml") if p.name != "released.yaml")


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_shipped_specs_validate(path, capsys):
    spec = load_spec(path, check_paths=False)
    assert spec.trials or (spec.search is not None and spec.probes)
    if path.name != "demo.yaml":
        assert spec.resources.workers * spec.resources.gpus_per_worker in (4, 2)
        assert main(["validate", str(path)]) == 0
        assert f"trials: {spec.trial_count}" in capsys.readouterr().out


def test_paper_specs_have_the_papers_trial_counts():
    counts = {p.name: len(load_spec(p, check_paths=False).trials) for p in SPECS}
    assert counts["table1_loss_weight_grid.yaml"] == 120
    assert counts["table2_voc_alwa.yaml"] == 36
    assert counts["table3_voc_other_detectors.yaml"] == 3 * 3
    assert counts["table4_voc_balancers.yaml"] == 3 * 5
    assert counts["table5_coco.yaml"] == 18
    assert counts["table6_ablation.yaml"] == 3 * (5 + 4) - 3  # (λ0 = 1, C = 100) is one trial per loss


def test_grid_expansion_is_a_union_of_products_crossed_with_seeds():
    grid = [{"a.x": [1, 2], "a.y": ["p", "q"]}, {"a.x": [3]}]
    combos = expand_grid(grid, seeds=[0, 1])
    assert len(combos) == (4 + 1) * 2
    assert {"a.x": 3, "train.seed": 1} in combos


@pytest.mark.parametrize("mutate, field", [
    (lambda s: s.update(grid={}), "grid"),
    (lambda s: s.update(grid={"weighting.method": []}), "grid.weighting.method"),
    (lambda s: s.update(bogus=1), "bogus"),
    (lambda s: s.update(grid={"weighting.method": ["alwa", "magic"]}), "weighting.method"),
    (lambda s: s.update(grid={"model.detector": ["yolo"]}), "model.detector"),
    (lambda s: s.update(grid={"weighting": [{"method": "alwa", "interval": 0}]}), "weighting.interval"),
    (lambda s: s.update(grid={"weighting": [{"method": "fixed", "cls": -1.0}]}), "weighting.cls"),
    (lambda s: s.update(grid={"optimizer.type": ["rmsprop"]}), "optimizer.type"),
    (lambda s: s.update(resources={"gpus": 1}), "resources.gpus"),
    (lambda s: s.update(scheduler={"type": "hyperband"}), "scheduler.type"),
    (lambda s: s.update(seeds=[-1]), "seeds"),
    (lambda s: s.update(grid={"setting": ["x"]}), "grid.setting"),
    (lambda s: s["base"]["dataset"].update(root="/nonexistent/VOCdevkit"), "dataset.root"),
])
def test_broken_specs_fail_naming_the_field(synthetic_voc, mutate, field):
    spec = tiny_spec(synthetic_voc, {"weighting.method": ["none"]})
    mutate(spec)
    with pytest.raises(UserInputError) as info:
        load_spec(spec)
    assert field in str(info.value)


def test_validate_cli_reports_errors_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {model: {detector: faster_rcnn}}\ngrid: {weighting.method: [alwa, nope]}\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "weighting.method" in err and "Traceback" not in err


# ---------------------------------------------------------------- running


def _children(client, experiment_name):
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("alwa.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("alwa.kind") == "trial"]
    return parents, children


@pytest.mark.slow
def test_local_sweep_isolates_a_diverging_trial(local_ray, synthetic_voc, tmp_path, capsys):
    spec_dict = tiny_spec(synthetic_voc, {"variant": [
        {"weighting.method": "none"},
        {"weighting.method": "alwa", "weighting.interval": 4},
        {"optimizer.lr": 1.0e12, "schedule.warmup_iters": 0},
    ]})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict))
    uri = sqlite_uri(tmp_path / "store" / "mlflow.db")
    code = main(["run", str(spec_path), "--runs-dir", str(tmp_path / "runs"), "--tracking-uri", uri,
                 "--name", "three", "--max-concurrent", "2"])
    out = capsys.readouterr().out
    assert code == 0  # a diverged trial is a result (Table 4's nan cells), not a failure of the sweep
    assert "ok=2 nan=1" in out
    client = MlflowClient(uri)
    parents, children = _children(client, "sweep-test")
    assert len(parents) == 1 and len(children) == 3
    parent_id = parents[0].info.run_id
    assert all(c.data.tags["mlflow.parentRunId"] == parent_id for c in children)
    statuses = Counter(c.data.tags["alwa.status"] for c in children)
    assert statuses == {"ok": 2, "nan": 1}
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps))
        if child.data.tags["alwa.status"] == "ok":
            assert sorted(steps) == list(range(1, 17))
            assert "val/map" in child.data.metrics
        else:
            assert "non-finite" in child.data.tags["alwa.status_reason"]
    alwa = [c for c in children if c.data.params.get("weighting.method") == "alwa"][0]
    windows = [m.step for m in client.get_metric_history(alwa.info.run_id, "window/cls_std")]
    assert len(windows) == 4
    # α is a step function: written at iteration 1 and where an update (the iteration
    # after a window's statistics) changed it
    alpha = [m.step for m in client.get_metric_history(alwa.info.run_id, "weight/alpha")]
    assert 1 in alpha and len(set(alpha)) == len(alpha) and set(alpha) <= {1} | {w + 1 for w in windows}
    parent = client.get_run(parent_id)
    assert parent.data.tags["alwa.summary"] == "ok=2 nan=1"
    assert "spec.yaml" in [a.path for a in client.list_artifacts(parent_id)]


@pytest.mark.slow
def test_two_worker_gloo_trial_logs_once(local_ray, synthetic_voc, tmp_path):
    spec_dict = tiny_spec(synthetic_voc, {"weighting": [{"method": "alwa", "interval": 4}]},
                          resources={"workers": 2, "cpus_per_worker": 0.5}, max_concurrent=1,
                          train={"checkpoint_every_iters": 4})
    spec = load_spec(spec_dict)
    from alwa_sweep.tune import run_sweep

    uri = sqlite_uri(tmp_path / "mlflow.db")
    sweep_dir = tmp_path / "sweeps" / "ddp"
    summary = run_sweep(spec, sweep_dir, uri, progress=False)
    assert summary.line() == "ok=1"
    # Ray Train stored the newest 2 (keep_checkpoints) of 5 checkpoints (4, 6 = an epoch, 8,
    # 12, 16), named after their iteration; the engine's hand-off folders are gone
    stored = sorted(p.relative_to(sweep_dir / "train" / f"train-{spec.trials[0].key}").as_posix()
                    for p in (sweep_dir / "train").rglob("*.pt"))
    assert stored == ["checkpoint_00000012/ckpt_00000012.pt", "checkpoint_00000016/ckpt_00000016.pt"], stored
    assert list(sweep_dir.rglob("*.pt")) == [p for p in (sweep_dir / "train").rglob("*.pt")]
    client = MlflowClient(uri)
    _, children = _children(client, "sweep-test")
    assert len(children) == 1
    history = client.get_metric_history(children[0].info.run_id, "train/loss")
    # each rank trains 16 iterations on its half of the data; only rank 0 logged them
    assert sorted(m.step for m in history) == list(range(1, 17))
    assert "val/map" in client.get_run(children[0].info.run_id).data.metrics


def _wait_for(predicate, timeout, interval=1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


@pytest.mark.slow
def test_driver_killed_then_resumed_runs_every_trial_exactly_once(synthetic_voc, tmp_path):
    spec_dict = tiny_spec(synthetic_voc, {"weighting": [
        {"method": "none"}, {"method": "fixed", "cls": 0.5, "reg": 0.5}, {"method": "alwa", "interval": 4}]},
        max_concurrent=1)
    spec_dict["base"]["schedule"]["max_iters"] = 24
    spec_dict["base"]["schedule"]["steps"] = [20]
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict))
    uri = sqlite_uri(tmp_path / "mlflow.db")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "alwa_sweep", "run", str(spec_path), "--runs-dir", str(tmp_path / "runs"),
               "--tracking-uri", uri, "--name", "killme", "--num-cpus", "2", "--quiet"]
    driver = subprocess.Popen(command, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def one_finished():
        # The driver creates the store first (sweep.json comes after it): opening the
        # database before then would race with its schema migration.
        if not (tmp_path / "runs" / "sweeps" / "killme" / "sweep.json").exists():
            return False
        try:
            _, children = _children(MlflowClient(uri), "sweep-test")
        except Exception:
            return False
        return any(c.data.tags.get("alwa.status") == "ok" for c in children)

    try:
        assert _wait_for(one_finished, timeout=240), "no trial finished"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    resumed = subprocess.run([sys.executable, "-m", "alwa_sweep", "resume", "killme", "--runs-dir",
                              str(tmp_path / "runs"), "--num-cpus", "2", "--quiet"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _, children = _children(MlflowClient(uri), "sweep-test")
    keys = Counter(c.data.tags["alwa.trial_key"] for c in children)
    assert len(keys) == 3 and set(keys.values()) == {1}  # no duplicated MLflow run
    assert all(c.data.tags["alwa.status"] == "ok" for c in children)
    client = MlflowClient(uri)
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, 25)), "a step is missing or duplicated"
    state = json.loads((tmp_path / "runs" / "sweeps" / "killme" / "sweep.json").read_text())
    assert client.get_run(state["parent_run_id"]).data.tags["alwa.summary"] == "ok=3"


def test_asha_scheduler_stops_on_the_per_epoch_score(synthetic_voc):
    from ray.tune.schedulers import ASHAScheduler

    from alwa_sweep.tune import _scheduler

    spec_dict = tiny_spec(synthetic_voc, {"weighting.method": ["none", "guided"]},
                          scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 2})
    spec_dict["base"]["schedule"] = {"unit": "epoch", "epochs": 6, "steps": [5]}
    scheduler = _scheduler(load_spec(spec_dict))
    assert isinstance(scheduler, ASHAScheduler)
    # the spec's metric (default: the main metric as reported), never a placeholder score
    assert scheduler._time_attr == "epoch" and scheduler._metric == "val/map" and scheduler._mode == "max"
    assert scheduler._max_t == 6 and scheduler._reduction_factor == 2
    assert _scheduler(load_spec(tiny_spec(synthetic_voc, {"weighting.method": ["none"]}))) is None
