"""Search specs (``search:``): the ranges checked when read, sampled trials like grid
points, and a real Optuna search through Ray Tune into a real SQLite MLflow store."""

from __future__ import annotations

import copy
import json
import math
import os

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from alwa_sweep.cli import main
from alwa_sweep.search import Search
from alwa_sweep.spec import load_spec, sampled_trial
from alwa_sweep.tracking import sqlite_uri
from reports import search as search_report
from sweep_specs import tiny_sweep_spec
from trainers.errors import UserInputError

SPACE = {"weighting.cls": {"low": 0.5, "high": 2.0, "log": True}, "weighting.reg": {"low": 0.5, "high": 2.0}}


def search_spec(data: dict, samples: int = 3, space=None, **extra) -> dict:
    spec = tiny_sweep_spec(data, None, name="searchsweep", experiment="search-test",
                           train={"checkpoint_every_iters": 8}, **extra)
    del spec["grid"]
    spec["base"]["weighting"] = {"method": "fixed"}
    spec["search"] = {"samples": samples, "space": copy.deepcopy(space or SPACE)}
    return spec


def test_a_search_spec_has_no_trials_before_it_runs_and_checks_every_corner(synthetic_voc):
    spec = load_spec(search_spec(synthetic_voc, samples=5))
    assert spec.trials == [] and spec.trial_count == 5
    corners = {(p.config.weighting.cls, p.config.weighting.reg) for p in spec.probes}
    assert corners == {(0.5, 0.5), (0.5, 2.0), (2.0, 0.5), (2.0, 2.0)}


def test_a_sampled_point_is_a_trial_with_a_stable_key(synthetic_voc):
    spec = load_spec(search_spec(synthetic_voc))
    a = sampled_trial(spec.base, {"weighting.cls": 0.7312345, "weighting.reg": 1.5})
    b = sampled_trial(spec.base, {"weighting.reg": 1.5, "weighting.cls": 0.7312345})
    assert a.key == b.key and a.name == "cls=0.7312_reg=1.5"
    assert (a.config.weighting.cls, a.config.weighting.reg) == (0.7312345, 1.5)
    assert sampled_trial(spec.base, {"weighting.cls": 0.7312346, "weighting.reg": 1.5}).key != a.key


@pytest.mark.parametrize("change, field", [
    (lambda s: s["search"]["space"]["weighting.cls"].update(low=3.0), "search.space.weighting.cls"),
    (lambda s: s["search"]["space"].update({"weighting.gamma": {"low": 1, "high": 2}}), "weighting.gamma"),
    (lambda s: s["search"]["space"].update({"optimizer.lr": {"low": 0, "high": 1, "log": True}}),
     "search.space.optimizer.lr"),
    (lambda s: s["search"]["space"].update({"bogus": {"low": 0, "high": 1}}), "search.space"),
    (lambda s: s["search"]["space"].update({"train.seed": {"low": 0, "high": 9}}), "search.space"),
    (lambda s: s["search"]["space"].update({"train.batch_size": {"low": 1, "high": 4}}), "train.batch_size"),
    (lambda s: s["search"].update(samples=0), "search.samples"),
    (lambda s: s["search"].update(samples=5000), "search.samples"),
    (lambda s: s["search"].update(type="hyperopt"), "search.type"),
    (lambda s: s.update(grid={"weighting.cls": [1.0]}), "search"),
    (lambda s: s.update(seeds=[0, 1]), "seeds"),
])
def test_bad_search_specs_exit_2_naming_the_field(synthetic_voc, tmp_path, capsys, change, field):
    spec = search_spec(synthetic_voc)
    change(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err


finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(low=st.one_of(finite, st.just(math.nan), st.just(math.inf)), high=finite, log=st.booleans())
def test_generated_ranges_are_accepted_exactly_when_valid(synthetic_voc, low, high, log):
    """A range is accepted iff finite, low < high and (log ⇒ low > 0), and the weights at
    its ends are valid (weighting.cls > 0); otherwise one error naming the range."""
    spec = search_spec(synthetic_voc, space={"weighting.cls": {"low": low, "high": high, "log": log}})
    valid = (math.isfinite(low) and low < high and not (log and low <= 0)) and low > 0
    try:
        loaded = load_spec(spec, check_paths=False)
    except UserInputError as error:
        assert not valid, error
        assert "weighting.cls" in str(error) and "Traceback" not in str(error)
        return
    assert valid
    assert {p.config.weighting.cls for p in loaded.probes} == {float(low), float(high)}


def test_ranked_puts_finished_trials_first_best_first():
    frame = pd.DataFrame({
        "name": ["a", "b", "c", "d"], "state": ["ok", "nan", "ok", "ok"],
        "params.weighting.cls": ["0.5", "1.0", "2.0", "0.7"], "params.weighting.reg": ["1", "1", "1", "2"],
        "metrics.val/map": [0.30, math.nan, 0.55, 0.41]})
    table = search_report.ranked(frame, ["weighting.cls", "weighting.reg"], "metrics.val/map")
    assert list(table["name"]) == ["c", "d", "a", "b"]
    text = search_report.to_markdown(["weighting.cls", "weighting.reg"], table, "map")
    assert "| 1 | c | 2 | 1 | 55.0 | ok |" in text and "|  | b | 1 | 1 | – | nan |" in text
    assert "Best: weighting.cls = 2, weighting.reg = 1 (map 55.0)." in text
    lowest = search_report.ranked(frame, ["weighting.cls"], "metrics.val/map", mode="min")
    assert list(lowest["name"]) == ["a", "d", "c", "b"]


@pytest.mark.slow
def test_optuna_search_runs_each_sampled_trial_once_and_reports_them(local_ray, synthetic_voc, tmp_path, capsys):
    from alwa_sweep.tune import load_sweep_state, run_sweep

    spec = load_spec(search_spec(synthetic_voc, samples=3, max_concurrent=2))
    uri = sqlite_uri(tmp_path / "mlflow.db")
    sweep_dir = tmp_path / "runs" / "search"
    summary = run_sweep(spec, sweep_dir, uri, progress=False)
    assert summary.line() == "ok=3"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("search-test")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("alwa.kind") == "sweep")
    trials = [r for r in runs if r.data.tags.get("alwa.kind") == "trial"]
    assert len(trials) == 3 and len({r.data.tags["alwa.trial_key"] for r in trials}) == 3
    assert json.loads(parent.data.params["search"])["space"]["weighting.cls"]["log"] is True
    for run in trials:
        cls, reg = float(run.data.params["weighting.cls"]), float(run.data.params["weighting.reg"])
        assert 0.5 <= cls <= 2.0 and 0.5 <= reg <= 2.0
        assert run.data.tags["alwa.search"] == "weighting.cls,weighting.reg"
        # the run is the trial of its sampled point: same key, same name, its own checkpoints
        point = sampled_trial(spec.base, {"weighting.cls": cls, "weighting.reg": reg})
        assert run.data.tags["alwa.trial_key"] == point.key and run.info.run_name == point.name
        assert run.data.tags["alwa.checkpoint"] == str(sweep_dir / "tune" / point.key)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, 17))

    # resuming a finished search starts nothing new and adds no run
    state = load_sweep_state(sweep_dir)
    assert run_sweep(spec, sweep_dir, uri, progress=False, state=state).line() == "ok=3"
    assert len([r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("alwa.kind") == "trial"]) == 3

    out = tmp_path / "report"
    assert main(["report", "--experiment", "search-test", "--tracking-uri", uri, "--out", str(out)]) == 0
    text = (out / "search.md").read_text()
    by_score = sorted(trials, key=lambda r: -r.data.metrics["val/map"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[1] for row in rows] == [r.info.run_name for r in by_score]
    assert f"{by_score[0].data.metrics['val/map'] * 100:.1f}" in rows[0]
    assert (out / "figures" / "search.png").stat().st_size > 0
    assert not (out / "table1.md").exists()  # sampled trials are not Table 1's grid
    capsys.readouterr()


def test_set_reaches_one_end_of_a_range(synthetic_voc):
    spec = load_spec(search_spec(synthetic_voc), ["search.space.weighting.cls.low=0.7",
                                                   "search.space.weighting.reg={low: 0.25, high: 1.0}"])
    assert spec.search.space["weighting.cls"].low == 0.7 and spec.search.space["weighting.cls"].high == 2.0
    assert (spec.search.space["weighting.reg"].low, spec.search.space["weighting.reg"].high) == (0.25, 1.0)
    assert isinstance(spec.search, Search) and len(spec.probes) == 4


def test_the_shipped_search_trains_as_table1s_voc_sgd_l1_column():
    """search_rpn_weights_voc.yaml: every setting but the sampled weights is Table 1's
    (which is checked against the released ones in test_released_settings.py)."""
    from pathlib import Path

    from trainers.config import flatten

    spaces = Path(__file__).resolve().parents[2] / "search_spaces"
    searched = load_spec(spaces / "search_rpn_weights_voc.yaml", check_paths=False)
    table1 = load_spec(spaces / "table1_loss_weight_grid.yaml", check_paths=False)
    column = [t for t in table1.trials if flatten(t.config.dump()).get("model.losses.roi_reg.type") == "l1"
              and t.config.optimizer.type == "sgd" and t.config.dataset.kind == "voc"
              and (t.config.weighting.cls, t.config.weighting.reg) == (1.0, 1.0)]
    assert len(column) == 1
    column = column[0]
    probe = sampled_trial(searched.base, {"weighting.cls": 1.0, "weighting.reg": 1.0})
    assert probe.config.dump() == column.config.dump()
    assert searched.resources == table1.resources


@pytest.mark.slow
def test_a_killed_search_resumes_with_its_sampler_and_runs_each_trial_once(synthetic_voc, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(search_spec(synthetic_voc, samples=3, max_concurrent=1)))
    uri = sqlite_uri(tmp_path / "mlflow.db")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    sweep_json = tmp_path / "runs" / "sweeps" / "killed" / "sweep.json"
    driver = subprocess.Popen([sys.executable, "-m", "alwa_sweep", "run", str(spec_path), "--runs-dir",
                               str(tmp_path / "runs"), "--tracking-uri", uri, "--name", "killed", "--num-cpus", "2",
                               "--quiet"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def trial_runs():
        if not sweep_json.exists():  # the store exists (and is migrated) before sweep.json
            return []
        try:
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name("search-test")
            return [r for r in client.search_runs([experiment.experiment_id])
                    if r.data.tags.get("alwa.kind") == "trial"]
        except Exception:  # noqa: BLE001 -- the driver is still creating the store
            return []

    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            runs = trial_runs()
            if any(r.data.tags.get("alwa.status") == "ok" for r in runs) and len(runs) >= 2:
                break  # one sampled trial finished, the next one is under way
            time.sleep(0.5)
        else:
            pytest.fail("the search did not get to its second trial")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    resumed = subprocess.run([sys.executable, "-m", "alwa_sweep", "resume", "killed", "--runs-dir",
                              str(tmp_path / "runs"), "--num-cpus", "2", "--quiet"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    runs = trial_runs()
    keys = [r.data.tags["alwa.trial_key"] for r in runs]
    assert len(runs) == 3 and len(set(keys)) == 3, keys  # the sampler went on: 3 points, one run each
    client = MlflowClient(uri)
    for run in runs:
        assert run.data.tags["alwa.status"] == "ok"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, 17)), "a step is missing or duplicated"
