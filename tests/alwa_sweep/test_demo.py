"""`alwa-sweep demo --quick` end to end, twice, and the README's promises about it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from alwa_sweep.tracking import sqlite_uri

REPO = Path(__file__).resolve().parents[2]


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = "pip install -q -e '.[dev]' && python -m pytest -q"
    assert command in readme and command in ci
    assert "pip install -e . && alwa-sweep demo" in readme


def run_demo(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "alwa_sweep", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_quick_demo_twice_keeps_both_sweeps(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "alwa-sweep ui --store" in first.stdout
    reports = sorted((out / "reports").iterdir())
    assert len(reports) == 1
    for name in ("table1.md", "table1.tex", "table2.md", "table2.tex"):
        assert (reports[0] / name).stat().st_size > 0
    assert "+ALWA_1" in (reports[0] / "table2.md").read_text()
    assert any(p.suffix == ".png" for p in (reports[0] / "figures").iterdir())
    data_mtime = (out / "data" / "synthetic_voc.json").stat().st_mtime

    second = run_demo(out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert (out / "data" / "synthetic_voc.json").stat().st_mtime == data_mtime  # data reused
    client = MlflowClient(sqlite_uri(out / "mlflow.db"))
    experiment = client.get_experiment_by_name("alwa-demo")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    sweeps = [r for r in runs if r.data.tags.get("alwa.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("alwa.kind") == "trial"]
    assert len(sweeps) == 2 and len(trials) == 6  # the first sweep's records are untouched
    for sweep in sweeps:
        children = [t for t in trials if t.data.tags["mlflow.parentRunId"] == sweep.info.run_id]
        assert len(children) == 3 and all(t.data.tags["alwa.status"] == "ok" for t in children)
        assert sweep.data.tags["alwa.summary"] == "ok=3"
    assert re.search(r"\[4/4\] done in [\d.]+ min", second.stdout)
