"""SIGTERM and SIGINT delivered to a real ``alwa-sweep train`` in each phase, and to a sweep.

The training runs in a child process (``python -c``) that wraps the phase's function in
``trainers.engine`` / ``trainers.checkpoint`` so that, on entering the phase, it writes a
marker file and waits: the test sends the signal once the marker exists, so the signal
lands inside that phase every time (no timing guess, no hook in the product code). The
child then calls the real ``alwa_sweep.cli.main``.

Checked for every cell: exit code 128 + signum, no traceback, the MLflow run KILLED with
``alwa.status`` = ``interrupted`` and a reason naming the signal, the work folder's lock
released, no ``.tmp`` file left, and — where a checkpoint exists — ``train --resume``
finishes the same MLflow run with status ``ok``.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from alwa_sweep.locks import FolderLock
from reliability_helpers import descendants, proc_title

REPO = Path(__file__).resolve().parents[2]
PHASE_TIMEOUT_S = 120

# Each phase: the attribute wrapped, and on which call (1-based) it stops.
PHASES = {
    "building": ("trainers.engine", "build_detector", 1),        # Run.__init__, before any iteration
    "first_iteration": ("trainers.engine", "_weighted_total", 1),  # inside iteration 1 (forward done)
    "checkpointing": ("torch", "save", 2),                         # inside the 2nd checkpoint's torch.save
    "evaluation": ("trainers.engine", "evaluate", 1),              # the final evaluation
}
CHECKPOINT_EXISTS = {"building": False, "first_iteration": False, "checkpointing": True, "evaluation": True}

CHILD = textwrap.dedent("""
    import importlib, sys, time
    from pathlib import Path
    module_name, attr, stop_at, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    module = importlib.import_module(module_name)
    original, calls = getattr(module, attr), [0]
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == stop_at:
            if attr == "save":           # the temporary file is half written when the signal comes
                handle = args[1]
                handle.write(b"partial")
                handle.flush()
            marker.write_text("in phase")
            time.sleep(90)
        return original(*args, **kwargs)
    setattr(module, attr, wrapped)
    from alwa_sweep.cli import main
    sys.exit(main(sys.argv[5:]))
""")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Synthetic VOC from ``alwa-sweep make-synthetic`` and a tiny config on it."""
    root = tmp_path_factory.mktemp("signal_matrix")
    data = root / "data"
    done = subprocess.run([sys.executable, "-m", "alwa_sweep", "make-synthetic", "--out", str(data),
                           "--images", "8", "--size", "64", "--seed", "0"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((data / "manifest.json").read_text()) if (data / "manifest.json").exists() else {}
    voc_root = next(p.parent for p in data.rglob("VOC2007"))
    config = {
        "dataset": {"kind": "voc", "root": str(voc_root), "train_sets": ["2007/trainval"],
                    "test_sets": ["2007/test"], "scale": [64, 64], "num_workers": 0},
        "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
        "schedule": {"unit": "iter", "max_iters": 6, "steps": [5], "warmup_iters": 1},
        "train": {"batch_size": 2, "log_every": 1, "eval_every": 0, "checkpoint_every_iters": 2},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": path, "manifest": manifest}


def _runs(db: Path) -> list[dict]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        runs = connection.execute("select run_uuid, status from runs").fetchall()
        tags = connection.execute("select run_uuid, key, value from tags").fetchall()
    out = []
    for run_id, status in runs:
        out.append({"id": run_id, "status": status,
                    "tags": {key: value for rid, key, value in tags if rid == run_id}})
    return out


def _wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the child exited ({process.returncode}) before the phase: {err[-2000:]}")
        assert time.monotonic() < deadline, "the phase was never reached"
        time.sleep(0.05)


def _lock_is_free(folder: Path) -> bool:
    try:
        with FolderLock(folder, what="work folder"):
            return True
    except Exception:  # noqa: BLE001 - FolderLockedError: still held
        return False


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_in_each_phase_ends_the_run_interrupted_and_resume_works(phase, signum, tiny, tmp_path, figures):
    module, attr, stop_at = PHASES[phase]
    marker, workdir, db = tmp_path / "in_phase", tmp_path / "work", tmp_path / "mlflow.db"
    argv = ["train", str(tiny["config"]), "--tracking-uri", f"sqlite:///{db}", "--workdir", str(workdir),
            "--run-name", "tiny"]
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", CHILD, module, attr, str(stop_at), str(marker), *argv],
                               env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(marker, process, PHASE_TIMEOUT_S)
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, f"exit {process.returncode}: {err[-2000:]}"
    assert "Traceback" not in out + err, err[-3000:]
    assert f"interrupted: terminated by {name}" in err or f"interrupted by {name}" in err, err[-500:]
    (run,) = _runs(db)
    assert run["status"] == "KILLED", run
    assert run["tags"].get("alwa.status") == "interrupted", run["tags"]
    assert name in run["tags"].get("alwa.status_reason", ""), run["tags"]
    assert _lock_is_free(workdir)
    leftovers = sorted(p.name for p in workdir.rglob("*") if ".tmp" in p.name)
    assert leftovers == []
    checkpoints = sorted(p.name for p in (workdir / "checkpoints").glob("ckpt_*.pt")) \
        if (workdir / "checkpoints").exists() else []
    assert bool(checkpoints) == CHECKPOINT_EXISTS[phase], checkpoints
    resumed = None
    if checkpoints:
        done = subprocess.run([sys.executable, "-m", "alwa_sweep", *argv, "--resume", str(workdir / "checkpoints")],
                              env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        (run,) = _runs(db)  # the same run, continued and finished
        assert run["status"] == "FINISHED" and run["tags"]["alwa.status"] == "ok", run
        resumed = checkpoints[-1]
    figures.add_row("signal_matrix", {"phase": phase, "signal": name, "exit_code": process.returncode,
                                      "mlflow": f"{run['status']}" if not checkpoints else "KILLED",
                                      "checkpoints_left": len(checkpoints), "resumed_from": resumed,
                                      "seconds": round(time.monotonic() - started, 1)})


# ---- SIGTERM to a sweep ------------------------------------------------------------------------

def _ray_processes(pids: list[int]) -> list[str]:
    alive = []
    for pid in pids:
        title = proc_title(pid)
        if title and Path(f"/proc/{pid}").exists():
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.append(f"{pid} {title[:80]}")
    return alive


@pytest.mark.slow
def test_sigterm_to_a_sweep_ends_every_run_and_leaves_no_ray_process(tiny, tmp_path, figures):
    config = yaml.safe_load(tiny["config"].read_text())
    config["schedule"]["max_iters"] = 400  # long enough to be interrupted while both trials train
    config["train"]["checkpoint_every_iters"] = 50
    spec = {"name": "sig", "experiment": "sig", "base": config, "grid": {"weighting.method": ["none", "alwa"]},
            "resources": {"cpus_per_worker": 1}}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    runs_dir = tmp_path / "runs"
    db = runs_dir / "mlflow.db"
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "alwa_sweep", "run", str(spec_path), "--runs-dir", str(runs_dir),
                                "--name", "sig", "--quiet", "--num-cpus", "2"],
                               env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + 150
        while True:  # both trials' runs exist and are training
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the trials never started"
            tree.update(descendants(process.pid))
            if db.exists():
                try:
                    runs = _runs(db)
                    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
                        logged = connection.execute("select count(distinct run_uuid) from metrics "
                                                    "where key = 'train/loss'").fetchone()[0]
                except sqlite3.Error:
                    runs, logged = [], 0
                trials = [r for r in runs if r["tags"].get("alwa.kind") == "trial"]
                if len(trials) == 2 and logged == 2:
                    break
            time.sleep(0.2)
        tree.update(descendants(process.pid))
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    stopped = time.monotonic()
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in out + err, err[-3000:]
    # A short grace period for Ray's own teardown of the trial processes.
    for _ in range(100):
        left = _ray_processes(sorted(tree))
        if not left:
            break
        time.sleep(0.2)
    assert left == [], left
    runs = _runs(db)
    parent = [r for r in runs if r["tags"].get("alwa.kind") == "sweep"]
    trials = [r for r in runs if r["tags"].get("alwa.kind") == "trial"]
    assert len(parent) == 1 and len(trials) == 2
    assert parent[0]["status"] == "KILLED" and parent[0]["tags"]["alwa.status"] == "interrupted", parent
    assert "SIGTERM" in parent[0]["tags"].get("alwa.status_reason", "")
    trial_states = sorted((r["status"], r["tags"].get("alwa.status")) for r in trials)
    assert all(status != "RUNNING" for status, _ in trial_states), trial_states
    assert all(tag == "interrupted" for _, tag in trial_states), trial_states
    sweep_dir = runs_dir / "sweeps" / "sig"
    with FolderLock(sweep_dir, what="sweep folder"):
        pass
    figures.record("sweep_sigterm", exit_code=process.returncode, processes_seen=len(tree),
                   processes_left=len(left), parent=f"{parent[0]['status']}/{parent[0]['tags']['alwa.status']}",
                   trials=[f"{s}/{t}" for s, t in trial_states], seconds=round(stopped - started, 1))
