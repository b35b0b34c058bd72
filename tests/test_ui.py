"""`alwa-sweep ui`: the MLflow UI on a real sweep's store, checked over REST and in
headless Chromium (Debian's `chromium`; the browser part is skipped, saying why,
where none is installed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from alwa_sweep.cli import main
from alwa_sweep.spec import load_spec
from alwa_sweep.tracking import sqlite_uri

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "images" / "mlflow_ui_sweep.png"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def browse(url: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--virtual-time-budget=20000", "--window-size=1400,900"]
    return subprocess.run([chromium(), *flags, *args, url], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory, synthetic_voc):
    """A real 2-trial sweep (local Ray, SQLite store) for the UI to show."""
    import ray

    from alwa_sweep.tune import run_sweep

    tmp = tmp_path_factory.mktemp("ui")
    spec = load_spec({
        "name": "ui-sweep", "experiment": "ui-test",
        "base": {"dataset": {"kind": "voc", "root": synthetic_voc["root"], "train_sets": synthetic_voc["train_sets"],
                             "test_sets": synthetic_voc["test_sets"], "scale": [128, 128], "num_workers": 0},
                 "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
                 "schedule": {"unit": "iter", "max_iters": 8, "steps": [6], "warmup_iters": 2},
                 "train": {"batch_size": 4, "log_every": 4, "eval_every": 0}},
        "grid": {"weighting": [{"method": "none"}, {"method": "alwa", "variant": 1, "interval": 2}]},
    })
    uri = sqlite_uri(tmp / "mlflow.db")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        summary = run_sweep(spec, tmp / "sweeps" / "ui-sweep", uri, num_cpus=2, progress=False)
    finally:
        ray.shutdown()
    assert summary.line() == "ok=2"
    return {"db": tmp / "mlflow.db", "uri": uri, "parent": summary.parent_run_id}


@pytest.fixture(scope="module")
def ui_server(small_sweep):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "alwa_sweep", "ui", "--store", str(small_sweep["db"]),
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("the MLflow UI did not answer /health within 90 s:\n" + (process.stdout.read() or ""))
    yield base
    os.killpg(process.pid, 15)
    process.wait(timeout=30)


def test_ui_refuses_non_loopback_host_without_flag(capsys):
    assert main(["ui", "--host", "0.0.0.0", "--port", "5999"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


def test_ui_serves_the_sweep_and_its_nested_trials(ui_server, small_sweep):
    experiments = post(ui_server + "/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
    experiment = next(e for e in experiments if e["name"] == "ui-test")
    runs = post(ui_server + "/api/2.0/mlflow/runs/search",
                {"experiment_ids": [experiment["experiment_id"]], "max_results": 50})["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    children = [t for t in tags if t.get("mlflow.parentRunId") == small_sweep["parent"]]
    assert len(children) == 2 and all(t["alwa.status"] == "ok" for t in children)


@pytest.mark.skipif(chromium() is None, reason="no Chromium installed (.ci/run installs Debian's chromium)")
def test_experiment_and_metric_pages_render_in_chromium(ui_server, small_sweep, tmp_path):
    experiments = post(ui_server + "/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
    experiment_id = next(e["experiment_id"] for e in experiments if e["name"] == "ui-test")
    runs = post(ui_server + "/api/2.0/mlflow/runs/search",
                {"experiment_ids": [experiment_id], "max_results": 50})["runs"]
    trial = next(r for r in runs if r["info"]["run_id"] != small_sweep["parent"])

    runs_page = f"{ui_server}/#/experiments/{experiment_id}/runs"
    page = browse(runs_page, "--dump-dom")
    assert page.returncode == 0, page.stderr[-2000:]
    sweep_name = next(r["info"]["run_name"] for r in runs if r["info"]["run_id"] == small_sweep["parent"])
    assert sweep_name in page.stdout  # the sweep's parent run is listed …
    assert f"<strong>{len(runs)}</strong> matching runs" in page.stdout  # … with its nested trials

    metrics_page = f"{ui_server}/#/experiments/{experiment_id}/runs/{trial['info']['run_id']}/model-metrics"
    chart = browse(metrics_page, "--dump-dom")
    assert chart.returncode == 0
    assert trial["info"]["run_name"] in chart.stdout and "Model metrics" in chart.stdout
    shot = tmp_path / "experiment.png"
    browse(runs_page, f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 10_000
    if os.environ.get("ALWA_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENSHOT)
