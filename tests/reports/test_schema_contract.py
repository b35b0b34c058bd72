"""The MLflow contract, end to end: a real (tiny) training run written by the real
``MlflowHook`` into a real SQLite store, read back by ``reports`` into Table 2.

The spec omits ALWA's interval: the resolved config records it anyway, so the report
finds every hyper-parameter of the trial among its params.
"""

import math

import pytest
from mlflow import MlflowClient

from alwa_sweep.spec import load_spec
from alwa_sweep.tracking import MlflowHook, get_or_create_experiment, open_store, sqlite_uri
from reports import schema as S
from reports.runs import load_trials
from reports.tables import build
from trainers.engine import train
from trainers.weighting import ALWASettings


def _spec(data: dict) -> dict:
    return {"name": "contract", "base": {
        "dataset": {"kind": "voc", "root": data["root"], "train_sets": data["train_sets"],
                    "test_sets": data["test_sets"], "scale": [96, 96], "num_workers": 0},
        "model": {"detector": "faster_rcnn", "backbone": "tiny"},
        "schedule": {"unit": "iter", "max_iters": 6, "steps": [5], "warmup_iters": 1},
        "train": {"batch_size": 2, "log_every": 3, "eval_every": 0, "eval_max_images": 6}},
        "grid": {"weighting": [{"method": "none"}, {"method": "alwa", "variant": 1}]}}


@pytest.mark.slow
def test_a_real_run_reads_back_into_table2(synthetic_voc, tmp_path):
    spec = load_spec(_spec(synthetic_voc))
    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = open_store(uri)
    experiment = get_or_create_experiment(client, "contract")
    sweep = client.create_run(experiment, run_name="contract", tags={S.TAG_KIND: S.KIND_SWEEP}).info.run_id
    logged = {}
    for trial in spec.trials:
        hook = MlflowHook.create(client, experiment, trial.name, parent_run_id=sweep,
                                 tags={S.TAG_KIND: S.KIND_TRIAL, S.TAG_TRIAL_KEY: trial.key})
        result = train(trial.config, workdir=tmp_path / trial.key, hooks=[hook])
        assert result.status == S.STATUS_OK
        logged[trial.config.weighting.method] = result.metrics[S.METRIC_MAP]
    client.set_terminated(sweep)

    # every hyper-parameter is a param, whatever the spec omitted
    alwa_run = MlflowClient(uri).search_runs([experiment], f"params.`{S.PARAM_METHOD}` = 'alwa'")[0]
    assert alwa_run.data.params[S.param_weighting("interval")] == str(ALWASettings().interval)
    assert alwa_run.data.params[S.PARAM_HEAD] == "rpn"
    assert S.ARTIFACT_DETECTIONS in [a.path for a in MlflowClient(uri).list_artifacts(alwa_run.info.run_id)]

    trials = load_trials(MlflowClient(uri), sweep_run_id=sweep)
    assert set(trials["state"]) == {S.STATUS_OK} and len(trials) == 2
    table = build(2, trials)
    filled = {(row, column): value for (row, column), value in table.values.stack().items()
              if not math.isnan(value)}
    methods = {table.labels.loc[row, "Method"]: value for (row, _), value in filled.items()}
    assert len(filled) == 2, table.cells
    assert methods == pytest.approx({"Faster R-CNN": 100 * logged["none"], "+ALWA_1": 100 * logged["alwa"]})
