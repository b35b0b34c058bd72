"""`alwa-sweep train`: a run from a YAML config, its MLflow record, resume, bad input."""

from __future__ import annotations

import yaml
from mlflow.tracking import MlflowClient

from alwa_sweep.cli import main
from alwa_sweep.tracking import sqlite_uri


def write_config(path, data, **train):
    config = {
        "dataset": {"kind": "voc", "root": data["root"], "train_sets": data["train_sets"],
                    "test_sets": data["test_sets"], "scale": [128, 128], "num_workers": 0},
        "model": {"detector": "retinanet", "backbone": "tiny", "pretrained": "none"},
        "weighting": {"method": "alwa", "variant": 2, "interval": 3},
        "schedule": {"unit": "iter", "max_iters": 12, "steps": [10], "warmup_iters": 3},
        "train": {"batch_size": 4, "log_every": 3, "eval_every": 0, "checkpoint_every_iters": 6, "log_interval": 1,
                  **train},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_logs_a_run_and_resumes_it(synthetic_voc, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "retina.yaml", synthetic_voc)
    uri = sqlite_uri(tmp_path / "mlflow.db")
    assert main(["train", str(config), "--tracking-uri", uri, "--set", "schedule.max_iters=6",
                 "--set", "schedule.steps=[5]"]) == 0
    out = capsys.readouterr().out
    assert "status: ok" in out and "val/map" in out
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("alwa-train").experiment_id])[0]
    assert run.data.params["model.detector"] == "retinanet"
    assert run.data.params["schedule.max_iters"] == "6"
    assert run.data.tags["alwa.kind"] == "train"
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
    # a second run with the same name refuses to clobber the first one's checkpoints
    assert main(["train", str(config), "--tracking-uri", uri]) == 2
    assert "--resume" in capsys.readouterr().err
    # continue to 12 iterations in the same MLflow run
    checkpoints = tmp_path / "alwa_runs" / "train" / "retina" / "checkpoints"
    assert main(["train", str(config), "--tracking-uri", uri, "--resume", str(checkpoints)]) == 0
    runs = client.search_runs([run.info.experiment_id])
    assert len(runs) == 1
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, 13))


def test_train_rejects_bad_config_before_starting(synthetic_voc, tmp_path, capsys):
    config = write_config(tmp_path / "bad.yaml", synthetic_voc)
    uri = sqlite_uri(tmp_path / "mlflow.db")
    assert main(["train", str(config), "--tracking-uri", uri, "--set", "weighting.method=alwa3"]) == 2
    err = capsys.readouterr().err
    assert "weighting.method" in err and "alwa" in err and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists()
