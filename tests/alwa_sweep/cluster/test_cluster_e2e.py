"""End to end on a real 2-node cluster: S3 storage (moto), an MLflow server, the worker
node killed mid-trial; the sweep recovers, every trial has one MLflow run, no step twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient
from sweep_specs import tiny_sweep_spec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
ITERS = 40


def _spec(data: dict) -> dict:
    return tiny_sweep_spec(data, {"weighting.method": ["none", "alwa"]}, name="e2e", experiment="cluster-e2e",
                           schedule={"unit": "iter", "max_iters": ITERS, "steps": [30], "warmup_iters": 2},
                           train={"checkpoint_every_iters": 4}, max_concurrent=2, max_failures=3)


def _steps(client, run_id):
    return [m.step for m in client.get_metric_history(run_id, "train/loss")]


@pytest.mark.slow
def test_worker_node_killed_mid_trial_sweep_recovers(ray_cluster, moto_s3, mlflow_server, synthetic_voc, tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(synthetic_voc)))
    storage = f"s3://{moto_s3['bucket']}/sweeps"
    env = {**os.environ, "PYTHONPATH": REPO, "RAY_ADDRESS": "", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "alwa_sweep", "run", str(spec_path), "--address", ray_cluster["address"],
         "--storage", storage, "--tracking-uri", mlflow_server, "--name", "e2e", "--quiet",
         "--runs-dir", str(tmp_path / "runs")], env=env, cwd=tmp_path,
        stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
    client = MlflowClient(mlflow_server)
    try:
        deadline = time.monotonic() + 120
        killed = False
        while time.monotonic() < deadline and driver.poll() is None:
            experiment = client.get_experiment_by_name("cluster-e2e")
            runs = [r for r in client.search_runs([experiment.experiment_id])
                    if r.data.tags.get("alwa.kind") == "trial"] if experiment else []
            if len(runs) == 2 and all(8 <= len(_steps(client, r.info.run_id)) < ITERS for r in runs):
                ray_cluster["cluster"].remove_node(ray_cluster["worker"])  # a node lost mid-trial
                killed = True
                break
            time.sleep(0.5)
        assert killed, (tmp_path / "driver.log").read_text()[-3000:]
        assert driver.wait(timeout=240) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    experiment = client.get_experiment_by_name("cluster-e2e")
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if r.data.tags.get("alwa.kind") == "trial"]
    assert len(trials) == 2 and len({r.data.tags["alwa.trial_key"] for r in trials}) == 2  # one run per trial
    for run in trials:
        assert run.data.tags["alwa.status"] == "ok"
        steps = _steps(client, run.info.run_id)
        assert sorted(steps) == list(range(1, ITERS + 1))  # every step once: none lost, none twice
        key = run.data.tags["alwa.trial_key"]
        assert run.data.tags["alwa.checkpoint"] == f"{storage}/e2e/tune/{key}"
        stored = [k for k in moto_s3["keys"](f"sweeps/e2e/tune/{key}/") if k.endswith(".pt")]
        assert len(stored) == 2, stored  # keep_checkpoints (default 2), only in the bucket
    # nothing of a checkpoint on local disk, where both nodes kept their trial folders
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".pt", ".pt.tmp"))]
    keys = moto_s3["keys"]("sweeps/e2e/tune/")  # Tune's state and checkpoints went to the bucket
    state_key = max(k for k in keys if k.rsplit("/", 1)[-1].startswith("experiment_state"))
    state = moto_s3["client"].get_object(Bucket=moto_s3["bucket"], Key=state_key)["Body"].read().decode()
    # 2 one-CPU trials on 2 one-CPU nodes: one ran on the removed node, failed, and was
    # restarted from its checkpoint in the bucket
    assert max(int(n) for n in re.findall(r'num_failures\\*"\s*:\s*(\d+)', state)) >= 1
    assert not (tmp_path / "s3:").exists()
