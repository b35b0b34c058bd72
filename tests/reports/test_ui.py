"""`alwa-sweep ui`: the MLflow UI on a real sweep's store, checked over REST and in
headless Chromium (Debian's `chromium`; the browser part is skipped, saying why,
where none is installed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from alwa_sweep.cli import main
from alwa_sweep.spec import load_spec
from alwa_sweep.tracking import sqlite_uri
from reports import schema as S
from reports import ui_links

REPO = Path(__file__).resolve().parents[2]
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


def browse(url: str, *args: str, timeout: float = 120, budget_ms: int = 20000) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--run-all-compositor-stages-before-draw", f"--virtual-time-budget={budget_ms}", "--window-size=1600,900"]
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


def start_ui(db: Path, port: int):
    """`alwa-sweep ui` in its own session; its stdout lines collected by a thread."""
    process = subprocess.Popen([sys.executable, "-m", "alwa_sweep", "ui", "--store", str(db),
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True).start()
    return process, lines


def wait_for(predicate, timeout: float, what: str, lines=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    pytest.fail(f"{what} within {timeout:.0f} s:\n" + "".join(lines))


def descendants(pid: int) -> set:
    """Every process below ``pid`` (from /proc)."""
    children: dict = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def ui_server(small_sweep):
    port = free_port()
    process, lines = start_ui(small_sweep["db"], port)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: any("sweep " in line for line in lines), 120, "`alwa-sweep ui` printed no sweep link",
             lines)
    yield {"base": base, "lines": lines, "process": process}
    os.killpg(process.pid, 15)
    process.wait(timeout=30)


def test_ui_refuses_non_loopback_host_without_flag(capsys):
    assert main(["ui", "--host", "0.0.0.0", "--port", "5999"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


def test_ui_serves_the_sweep_and_its_nested_trials(ui_server, small_sweep):
    base = ui_server["base"]
    experiments = post(base + "/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
    experiment = next(e for e in experiments if e["name"] == "ui-test")
    runs = post(base + "/api/2.0/mlflow/runs/search",
                {"experiment_ids": [experiment["experiment_id"]], "max_results": 50})["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    children = [t for t in tags if t.get("mlflow.parentRunId") == small_sweep["parent"]]
    assert len(children) == 2 and all(t["alwa.status"] == "ok" for t in children)
    # the experiment is marked as one of training runs, and the sweep has its view
    experiment_tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
    assert experiment_tags[S.TAG_EXPERIMENT_KIND] == S.EXPERIMENT_KIND_TRAINING
    view = json.loads(experiment_tags[ui_links.SHARED_VIEW_PREFIX + ui_links.share_key(small_sweep["parent"])])
    assert view["orderByKey"] == "metrics.`val/map`" and view["orderByAsc"] is False
    printed = "".join(ui_server["lines"])
    assert f"{base}{ui_links.sweep_path(experiment['experiment_id'], small_sweep['parent'])}" in printed


def test_a_busy_port_exits_2_with_a_clear_message(ui_server, small_sweep):
    port = int(ui_server["base"].rsplit(":", 1)[1])
    result = subprocess.run([sys.executable, "-m", "alwa_sweep", "ui", "--store", str(small_sweep["db"]),
                             "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--port: port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_stops_the_server_and_its_children(small_sweep):
    port = free_port()
    process, lines = start_ui(small_sweep["db"], port)
    try:
        wait_for(lambda: any("sweep " in line for line in lines), 120, "the UI did not start", lines)
        tree = descendants(process.pid)
        assert tree, "the MLflow server runs as a child of `alwa-sweep ui`"
        process.send_signal(15)  # to `alwa-sweep ui` alone, not its process group
        process.wait(timeout=30)
        wait_for(lambda: not any(alive(pid) for pid in tree), 20, "server processes outlived the UI")
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)


def visible_text(dom: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.skipif(chromium() is None, reason="no Chromium installed (.ci/run installs Debian's chromium)")
def test_sweep_link_shows_trials_by_map_with_status_and_alpha_in_chromium(ui_server, small_sweep, tmp_path):
    base = ui_server["base"]
    client = MlflowClient(small_sweep["uri"])
    experiment = client.get_experiment_by_name("ui-test")
    trials = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{small_sweep['parent']}'")
    by_map = sorted(trials, key=lambda r: -r.data.metrics["val/map"])

    # the experiment's own page: the training-runs table, not the GenAI overview
    printed = "".join(ui_server["lines"])
    experiment_link = base + ui_links.experiment_path(experiment.experiment_id)
    assert experiment_link in printed
    landing = browse(experiment_link, "--dump-dom")
    assert landing.returncode == 0, landing.stderr[-2000:]
    landing_text = visible_text(landing.stdout)
    assert client.get_run(small_sweep["parent"]).info.run_name in landing_text
    assert "matching runs" in landing_text and "Token Usage" not in landing_text

    link = base + ui_links.sweep_path(experiment.experiment_id, small_sweep["parent"])
    page = browse(link, "--dump-dom")
    text = visible_text(page.stdout)
    names = [r.info.run_name for r in by_map]
    positions = [text.find(name) for name in names]
    assert all(p >= 0 for p in positions), (names, text[:3000])
    maps = [r.data.metrics["val/map"] for r in by_map]
    if len(set(maps)) == len(maps):  # best mAP first (an 8-iteration sweep may tie at 0)
        assert positions == sorted(positions), (names, maps)
    for header in ("alwa.status", "val/map", "weight/alpha", "Sort: val/map"):
        assert header in text, header
    assert len(re.findall(r"\bok\b", text)) >= len(trials)  # every trial's alwa.status

    trial = next((r for r in by_map if "weight/alpha" in r.data.metrics), by_map[0])  # loss and α
    run_link = base + ui_links.run_path(experiment.experiment_id, trial.info.run_id)
    chart = browse(run_link, "--dump-dom", budget_ms=60000)
    chart_text = visible_text(chart.stdout)
    assert trial.info.run_name in chart_text and "Model metrics" in chart_text
    assert re.search(r"train \(\d+\)", chart_text)  # the chart section of the train/* metrics
    assert "Evaluations" not in chart_text  # the model-training page, not GenAI's

    table_shot, chart_shot = tmp_path / "table.png", tmp_path / "chart.png"
    browse(link, f"--screenshot={table_shot}")
    browse(run_link, f"--screenshot={chart_shot}", budget_ms=60000)
    assert table_shot.stat().st_size > 10_000 and chart_shot.stat().st_size > 10_000
    if os.environ.get("ALWA_UPDATE_SCREENSHOT"):
        from PIL import Image
        top, bottom = Image.open(table_shot), Image.open(chart_shot)
        top = top.crop((0, 0, top.width, 430))
        bottom = bottom.crop((0, 0, bottom.width, 560))
        sheet = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), "white")
        sheet.paste(top, (0, 0))
        sheet.paste(bottom, (0, top.height))
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(SCREENSHOT)
