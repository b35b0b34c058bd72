"""``report --ci`` on COCO trials, end to end: two tiny COCO training runs (synthetic COCO,
crowd regions included) written by the real ``MlflowHook`` into a SQLite store; the
engine logs their detections.npz; the report's interval is centred on the difference of
their logged val/ap, and the COCO bootstrap reproduces each run's val/ap from its file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from alwa_sweep.cli import main
from alwa_sweep.tracking import MlflowHook, get_or_create_experiment, open_store, sqlite_uri
from reports import bootstrap, coco_bootstrap
from reports import schema as S
from trainers.config import parse_config
from trainers.engine import train
from trainers.evaluation.detections_io import load_detections


def _config(data: dict, weighting: dict, seed: int) -> dict:
    return {"dataset": {"kind": "coco", "train_ann": data["train_ann"], "train_images": data["train_images"],
                        "val_ann": data["val_ann"], "val_images": data["val_images"], "scale": [96, 96],
                        "num_workers": 0},
            "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
            "schedule": {"unit": "iter", "max_iters": 8, "steps": [7], "warmup_iters": 1},
            "train": {"batch_size": 2, "log_every": 4, "eval_every": 0, "seed": seed},
            "weighting": weighting}


@pytest.mark.slow
def test_report_ci_on_coco_trials(synthetic_coco, tmp_path, capsys):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = open_store(uri)
    experiment = get_or_create_experiment(client, "coco-ci")
    sweep = client.create_run(experiment, run_name="coco-ci", tags={S.TAG_KIND: S.KIND_SWEEP}).info.run_id
    runs = {}
    # different seeds (no common one: the report pairs the first run of each), so that the two differ
    for name, weighting, seed in (("base", {"method": "none"}, 0), ("alwa", {"method": "alwa", "variant": 1}, 1)):
        hook = MlflowHook.create(client, experiment, name, parent_run_id=sweep,
                                 tags={S.TAG_KIND: S.KIND_TRIAL, S.TAG_TRIAL_KEY: name})
        result = train(parse_config(_config(synthetic_coco, weighting, seed)), workdir=tmp_path / name, hooks=[hook])
        assert result.status == S.STATUS_OK
        runs[name] = hook.run_id
    client.set_terminated(sweep)
    read = MlflowClient(uri)
    logged = {name: read.get_run(run_id).data.metrics[S.METRIC_AP] for name, run_id in runs.items()}

    # each run's detections.npz holds the ground truth with its crowd regions, and the
    # bootstrap's un-resampled AP is the run's logged val/ap
    files = {name: load_detections(read.download_artifacts(run_id, S.ARTIFACT_DETECTIONS, str(tmp_path / name)))
             for name, run_id in runs.items()}
    base = files["base"]
    assert base["meta"]["dataset"] == "coco"
    assert np.concatenate([a["iscrowd"] for a in base["annotations"]]).any()
    assert all(a["xywh"].shape == (len(a["labels"]), 4) for a in base["annotations"])  # the file's own boxes
    for name, data in files.items():
        prepared = coco_bootstrap.prepare_coco(data["detections"], data["annotations"])
        ones = np.ones((1, prepared.n_images), np.int64)
        assert coco_bootstrap.weighted_aps(prepared, ones)[0] == pytest.approx(logged[name], abs=1e-9)
    interval = bootstrap.paired_delta(files["base"], files["alwa"], n_resamples=200)
    assert interval.delta == pytest.approx((logged["alwa"] - logged["base"]) * 100, abs=1e-9)

    out = tmp_path / "report"
    code = main(["report", "--sweep", sweep, "--tracking-uri", uri, "--out", str(out), "--ci", "--no-figures",
                 "--table", "5", "--resamples", "200"])
    assert code == 0, capsys.readouterr().err
    ci = Path(out / "ci.md").read_text()
    assert ci in capsys.readouterr().out
    (row,) = [line for line in ci.splitlines() if "weighting.method = alwa" in line]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert "not implemented" not in row
    delta = (logged["alwa"] - logged["base"]) * 100
    assert cells[2] == f"{logged['base'] * 100:.2f}" and cells[3] == f"{logged['alwa'] * 100:.2f}"
    shown = re.match(r"([+-]\d+\.\d+)( \*)?$", cells[4])
    assert shown and float(shown.group(1)) == pytest.approx(delta, abs=0.006)
    low, high = (float(v) for v in re.findall(r"[+-]\d+\.\d+", cells[5]))
    assert (low, high) == (pytest.approx(interval.low, abs=0.006), pytest.approx(interval.high, abs=0.006))
    assert low <= float(shown.group(1)) <= high
    assert (shown.group(2) is not None) == (low > 0 or high < 0)

    # another metric than the main one: its seeds' values, but no interval (the bootstrap resamples val/ap)
    code = main(["report", "--sweep", sweep, "--tracking-uri", uri, "--out", str(tmp_path / "ap50"), "--ci",
                 "--no-figures", "--table", "5", "--resamples", "100", "--metric", "ap50"])
    assert code == 0
    (row,) = [line for line in (tmp_path / "ap50" / "ci.md").read_text().splitlines() if "method = alwa" in line]
    cells = [c.strip() for c in row.strip("|").split("|")]
    ap50 = {name: read.get_run(run_id).data.metrics[S.metric_val("ap50")] * 100 for name, run_id in runs.items()}
    assert cells[2] == f"{ap50['base']:.2f}" and cells[3] == f"{ap50['alwa']:.2f}"
    assert cells[5] == "– (the bootstrap resamples val/ap, not val/ap50)"
