"""Faults during a sweep: a trial process killed with SIGKILL, corrupt checkpoints.

The driver killed mid-sweep and a diverging trial are covered end to end in
tests/alwa_sweep/test_sweep.py (see docs/reliability.md); they are not repeated here.
"""

from __future__ import annotations

import ast
import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from alwa_sweep.spec import load_spec
from alwa_sweep.tracking import MlflowHook, get_or_create_experiment, open_store, sqlite_uri
from reliability_helpers import descendants, proc_cwd, proc_title
from trainers.checkpoint import (CorruptCheckpointError, list_checkpoints, load_checkpoint_file,
                                 load_latest_checkpoint, save_checkpoint)
from trainers.engine import TrainingHook, train

# ------------------------------------------------------------------ SIGKILL of a trial

KILL_ITERS = 160
KILL_EVERY = 20  # train.checkpoint_every_iters (and a checkpoint at every epoch's end)
KILL_AFTER_STEP = 25  # logged steps of the victim before the kill: past a checkpoint, before the next


def _wait(predicate, timeout: float, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def _kill_spec(data_root: str) -> dict:
    return {
        "name": "killed", "experiment": "sigkill",
        "base": {
            "dataset": {"kind": "voc", "root": data_root, "train_sets": ["2007/trainval"],
                        "test_sets": ["2007/test"], "scale": [64, 64], "num_workers": 0},
            "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
            "schedule": {"unit": "iter", "max_iters": KILL_ITERS, "steps": [140], "warmup_iters": 10},
            "train": {"batch_size": 2, "log_every": 5, "log_interval": 1, "eval_every": 0,
                      "checkpoint_every_iters": KILL_EVERY,
                      "eval_max_images": 4},
        },
        "grid": {"weighting": [{"method": "none"}, {"method": "alwa", "variant": 1, "interval": 10}]},
        "resources": {"cpus_per_worker": 1},
        "max_concurrent": 2,
        "max_failures": 2,
    }


@pytest.mark.slow
def test_sigkilled_trial_restarts_from_its_checkpoint_and_logs_once(synthetic_voc, tmp_path, figures):
    # The dataset is given relative to the driver's directory: Tune runs trials elsewhere.
    (tmp_path / "data").symlink_to(Path(synthetic_voc["root"]).parent)
    spec_dict = _kill_spec("data/VOCdevkit")
    assert synthetic_voc["train_sets"] == ["2007/trainval"] and synthetic_voc["test_sets"] == ["2007/test"]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec_dict))
    keys = {t.config.weighting.method: t.key for t in load_spec(spec_dict, check_paths=False).trials}
    victim_key = keys["alwa"]
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["RAY_AUTH_MODE"] = "disabled"
    log = open(tmp_path / "driver.log", "w")
    started = time.monotonic()
    driver = subprocess.Popen([sys.executable, "-m", "alwa_sweep", "run", "spec.yaml", "--runs-dir", "runs",
                               "--name", "killed", "--num-cpus", "2", "--quiet"], cwd=tmp_path, env=env,
                              start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

    def victim_steps() -> int:
        # Only once the driver has created and migrated the store (sweep.json comes after):
        # a second process opening a store mid-migration races on its schema.
        if not (tmp_path / "runs" / "sweeps" / "killed" / "sweep.json").exists():
            return 0
        try:
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name("sigkill")
            if experiment is None:
                return 0
            runs = client.search_runs([experiment.experiment_id],
                                      filter_string=f"tags.`alwa.trial_key` = '{victim_key}'")
            return len(client.get_metric_history(runs[0].info.run_id, "train/loss")) if runs else 0
        except Exception:  # the store is being created or migrated
            return 0

    def trainable_of_victim():
        for pid in descendants(driver.pid):
            cwd = proc_cwd(pid)  # Tune runs each trial in a folder named after it
            if proc_title(pid).startswith("ray::ImplicitFunc") and cwd is not None and cwd.name == victim_key:
                return pid
        return None

    try:
        # (stop waiting if the driver is gone: its log says why)
        killed_at = _wait(lambda: driver.poll() is not None or (s := victim_steps()) >= KILL_AFTER_STEP and s,
                          timeout=300, interval=0.2)
        assert killed_at and killed_at is not True, \
            "the victim trial never logged enough steps:\n" + (tmp_path / "driver.log").read_text()[-3000:]
        victim = _wait(trainable_of_victim, timeout=30, interval=0.1)
        assert victim, "no trainable process of the victim trial found among the driver's descendants"
        title = proc_title(victim)
        os.kill(victim, signal.SIGKILL)
        code = driver.wait(timeout=280)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        log.close()
    seconds = time.monotonic() - started
    output = (tmp_path / "driver.log").read_text()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sigkill")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("alwa.kind") == "trial"]
    per_key = Counter(r.data.tags["alwa.trial_key"] for r in trials)
    steps = {r.data.tags["alwa.trial_key"]: [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
             for r in trials}

    tune_dir = tmp_path / "runs" / "sweeps" / "killed" / "tune"
    reports = [json.loads(line) for line in (tune_dir / victim_key / "result.json").read_text().splitlines()]
    pids = list(dict.fromkeys(r["pid"] for r in reports))
    state_file = next(tune_dir.glob("experiment_state-*.json"))
    failures = {json.loads(trial)["relative_logdir"]: json.loads(runtime)["num_failures"]
                for trial, runtime in json.loads(state_file.read_text())["trial_data"]}
    last_reported = max((r["iteration"] for r in reports if r["pid"] == victim), default=0)
    after = [r["iteration"] for r in reports if r["pid"] != victim]
    # The restarted process reports at its first checkpoint after the one it resumed from.
    per_epoch = -(-len((Path(synthetic_voc["root"]) / "VOC2007/ImageSets/Main/trainval.txt").read_text().split()) // 2)
    checkpoints = [i for i in range(1, KILL_ITERS + 1) if i % KILL_EVERY == 0 or i % per_epoch == 0]
    resumed_from = max(c for c in checkpoints if c < after[0]) if after else None
    expected = list(range(1, KILL_ITERS + 1))
    figures.record("sigkill", trials=len(keys), iterations=KILL_ITERS, checkpoint_every=KILL_EVERY, max_failures=2,
                   killed_at_step=killed_at, killed_pid=victim, killed_title=title,
                   restarted_pid=pids[-1], last_reported=last_reported, resumed_from=resumed_from,
                   recomputed_steps=max(0, killed_at - resumed_from) if resumed_from is not None else None,
                   first_report_after=after[0] if after else None, num_failures=failures.get(victim_key),
                   other_failures=failures.get(keys["none"]), exit_code=code,
                   trials_ok=sum(r.data.tags.get("alwa.status") == "ok" for r in trials),
                   trials_lost=len(keys) - sum(r.data.tags.get("alwa.status") == "ok" for r in trials),
                   runs_per_trial=max(per_key.values()) if per_key else 0,
                   duplicate_steps=sum(len(s) - len(set(s)) for s in steps.values()),
                   expected_steps=len(keys) * KILL_ITERS,
                   stored_steps=sum(len(set(s) & set(expected)) for s in steps.values()),
                   seconds=round(seconds, 1))

    assert code == 0, output[-3000:]
    assert pids[0] == victim and len(pids) == 2, f"reports came from pids {pids}, the victim was {victim}"
    assert failures == {victim_key: 1, keys["none"]: 0}
    assert f"pid: {victim}" in (tune_dir / victim_key / "error.txt").read_text()
    # restarted from a checkpoint at least as new as the last one Tune knew, not from scratch
    assert checkpoints[0] <= last_reported <= resumed_from < after[0]
    assert dict(per_key) == {key: 1 for key in keys.values()}  # one MLflow run per trial
    assert all(r.data.tags["alwa.status"] == "ok" for r in trials)
    for key, logged in steps.items():
        assert sorted(logged) == expected, f"trial {key}: steps missing or duplicated"


# ------------------------------------------------------------------ corrupt checkpoints


def _states(directory: Path, iterations=(10, 20, 30)) -> list[Path]:
    return [save_checkpoint({"weights": torch.full((64,), float(i)), "iteration": i}, directory, i)
            for i in iterations]


def _rewrite_digest(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(digest + "\n")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


class _RunsCode:
    """Unpickling this runs a shell command: what weights_only=True must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _load_expecting_fallback(directory: Path) -> tuple[dict, Path, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = load_latest_checkpoint(directory)
    messages = [str(w.message) for w in caught if "skipping corrupt checkpoint" in str(w.message)]
    assert found is not None
    return found[0], found[1], messages


CORRUPTIONS = {
    "newest truncated to half (digest kept)": (lambda p: _truncate(p), "SHA-256 digest"),
    "one byte flipped in the newest (digest kept)": (lambda p: _flip_byte(p), "SHA-256 digest"),
    "newest truncated, its digest file lost": (
        lambda p: (_truncate(p), p.with_name(p.name + ".sha256").unlink()), "load error (torch.load)"),
    "newest truncated, digest rewritten to match": (lambda p: (_truncate(p), _rewrite_digest(p)),
                                                    "load error (torch.load)"),
    "newest replaced by random bytes, digest rewritten": (
        lambda p: (p.write_bytes(os.urandom(4096)), _rewrite_digest(p)), "load error (torch.load)"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(corruption, tmp_path, figures):
    paths = _states(tmp_path)
    corrupt, detected_by = CORRUPTIONS[corruption]
    corrupt(paths[-1])
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint_file(paths[-1])
    state, path, messages = _load_expecting_fallback(tmp_path)
    figures.add_row("corrupt_checkpoints", {"corruption": corruption, "level": "trainers.checkpoint",
                                            "detected_by": detected_by, "detected": len(messages) == 1,
                                            "fell_back_to": f"iteration {state['iteration']}, with a warning"})
    assert path == paths[-2] and state["iteration"] == 20
    assert torch.equal(state["weights"], torch.full((64,), 20.0))
    assert len(messages) == 1 and paths[-1].name in messages[0]
    if "digest kept" in corruption:
        assert "SHA-256" in messages[0]


def test_checkpoint_that_would_run_code_is_refused(tmp_path, figures):
    paths = _states(tmp_path)
    marker = tmp_path / "code_ran"
    torch.save({"model": _RunsCode(marker), "iteration": 30}, paths[-1])
    _rewrite_digest(paths[-1])  # the digest cannot vouch for it: it was written with the file
    state, path, messages = _load_expecting_fallback(tmp_path)
    figures.add_row("corrupt_checkpoints", {
        "corruption": "newest replaced by a pickle calling os.system, digest rewritten",
        "level": "trainers.checkpoint", "detected_by": "torch.load(weights_only=True) refuses the global",
        "detected": len(messages) == 1, "fell_back_to": f"iteration {state['iteration']}, code not run"})
    figures.add_row("security", {"check": "a checkpoint whose pickle calls `os.system` (digest matching)",
                                 "result": "refused by torch.load(weights_only=True); the previous checkpoint "
                                           f"(iteration {state['iteration']}) is used; the command did not run"})
    assert not marker.exists()
    assert state["iteration"] == 20 and len(messages) == 1


def test_every_checkpoint_corrupt_gives_none_not_garbage(tmp_path, figures):
    paths = _states(tmp_path)
    for path in paths:
        _flip_byte(path)
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint") as caught:
        assert load_latest_checkpoint(tmp_path) is None
    flagged = [w for w in caught if "skipping corrupt checkpoint" in str(w.message)]
    figures.add_row("corrupt_checkpoints", {"corruption": "all three checkpoints byte-flipped",
                                            "level": "trainers.checkpoint", "detected_by": "SHA-256 digest",
                                            "detected": len(flagged) == 3,
                                            "fell_back_to": "nothing: `None` (the engine starts afresh, or refuses an "
                                                            "explicit checkpoint), never a corrupt state"})
    assert len(flagged) == 3


def _tune_trial_folder(root: Path, iterations=(10, 20, 30)) -> list[Path]:
    """Checkpoints as Tune stores a trial's: ``checkpoint_00000N/ckpt_<iteration>.pt``."""
    return [_states(root / f"checkpoint_{n:06d}", (iteration,))[0] for n, iteration in enumerate(iterations)]


def test_trial_restart_falls_back_when_tunes_copy_is_corrupt(tmp_path, figures):
    """A restarted trial resumes from the storage's newest checkpoint, or the one before."""
    from ray import tune

    from alwa_sweep.trial import RestoredCheckpoint

    stored = _tune_trial_folder(tmp_path / "tune" / "trial")
    _truncate(stored[-1])
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint") as caught:
        restored = RestoredCheckpoint(lambda: tune.Checkpoint.from_directory(str(stored[-1].parent)))
    messages = [w for w in caught if "skipping corrupt checkpoint" in str(w.message)]
    assert restored.folder == stored[-2].parent  # the storage's own folder: no copy on a local disk
    state, path = load_latest_checkpoint(restored.folder)
    figures.add_row("corrupt_checkpoints", {
        "corruption": "the newest checkpoint Tune stored for a trial truncated",
        "level": "trial restart (alwa_sweep.trial)", "detected_by": "SHA-256 digest",
        "detected": len(messages) == 1,
        "fell_back_to": f"iteration {state['iteration']}, the trial's previous checkpoint in the storage"})
    assert path == stored[-2] and state["iteration"] == 20 and len(messages) == 1
    restored.release()
    assert all(p.exists() for p in stored)  # nothing of the storage is deleted by a restore

    for path in stored:  # every stored checkpoint corrupt: start afresh, never from garbage
        _flip_byte(path)
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        assert RestoredCheckpoint(lambda: tune.Checkpoint.from_directory(str(stored[-1].parent))).folder is None
    # and without any checkpoint the trial starts afresh
    assert RestoredCheckpoint(lambda: None).folder is None


def _tiny_config(data: dict, **train) -> dict:
    return {
        "dataset": {"kind": "voc", "root": data["root"], "train_sets": data["train_sets"],
                    "test_sets": data["test_sets"], "scale": [64, 64], "num_workers": 0},
        "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
        "weighting": {"method": "alwa", "variant": 1, "interval": 4},
        "schedule": {"unit": "iter", "max_iters": 20, "steps": [15], "warmup_iters": 4},
        "train": {"batch_size": 4, "log_every": 5, "log_interval": 1, "eval_every": 0, **train},
    }


def train_and_die_after_checkpoint(config: dict, workdir: str, uri: str, run_id: str, die_at: int) -> None:
    """A child process: MLflow writes are slow, and SIGKILL comes right after checkpoint
    ``die_at`` is written (nothing in the process gets to drain its queue)."""
    import torch as child_torch
    from mlflow.tracking import MlflowClient

    import trainers.engine as engine

    child_torch.set_num_threads(1)
    client = MlflowClient(uri)
    log_batch = client.log_batch

    def slow_log_batch(*args, **kwargs):
        time.sleep(0.5)  # a busy tracking server
        return log_batch(*args, **kwargs)

    client.log_batch = slow_log_batch
    save = engine.save_checkpoint

    def save_then_die(state, directory, iteration, keep=3):
        path = save(state, directory, iteration, keep)
        if iteration == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    engine.save_checkpoint = save_then_die
    engine.train(config, workdir=workdir, hooks=[MlflowHook(client, run_id)])


@pytest.mark.slow
def test_checkpoint_is_never_ahead_of_the_stored_metrics(synthetic_voc, tmp_path, figures):
    """MLflow rows are written by a background thread; a checkpoint file must not exist
    before the rows it covers are stored, or a run resumed from it loses them."""
    config = _tiny_config(synthetic_voc, checkpoint_every_iters=10)
    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = open_store(uri)
    run_id = MlflowHook.create(client, get_or_create_experiment(client, "gap"), "gap").run_id
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["trainers.engine", "alwa_sweep.tracking"])
    child = context.Process(target=train_and_die_after_checkpoint,
                            args=(config, str(tmp_path / "run"), uri, run_id, 10))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["ckpt_00000010.pt"]
    stored_at_kill = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))

    train(config, workdir=tmp_path / "run", hooks=[MlflowHook(client, run_id)], resume=True)
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    figures.record("sigkill", gap_stored_at_kill=len(stored_at_kill), gap_checkpoint=10, gap_expected_steps=20,
                   gap_stored_steps=len(set(steps) & set(range(1, 21))),
                   gap_duplicates=len(steps) - len(set(steps)))
    assert stored_at_kill == list(range(1, 11))  # everything the checkpoint covers
    assert sorted(steps) == list(range(1, 21))


class _Rows(TrainingHook):
    def __init__(self, stop_at: int | None = None):
        self.rows, self.stop_at = [], stop_at

    def on_iteration(self, iteration):
        if iteration == self.stop_at:
            raise KeyboardInterrupt("simulated kill")

    def log_iterations(self, rows):
        self.rows.extend(rows)


def test_engine_resumes_from_previous_checkpoint_when_newest_is_corrupt(synthetic_voc, tmp_path, figures):
    config = _tiny_config(synthetic_voc, checkpoint_every_iters=5)
    uninterrupted = _Rows()
    train(config, workdir=tmp_path / "a", hooks=[uninterrupted])
    with pytest.raises(KeyboardInterrupt):
        train(config, workdir=tmp_path / "b", hooks=[_Rows(stop_at=17)])
    kept = list_checkpoints(tmp_path / "b" / "checkpoints")
    _truncate(kept[-1])
    previous = torch.load(kept[-2], weights_only=True)["iteration"]
    resumed = _Rows()
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint") as caught:
        result = train(config, workdir=tmp_path / "b", hooks=[resumed], resume=True)
    flagged = [w for w in caught if kept[-1].name in str(w.message)]
    expected = {row["step"]: row for row in uninterrupted.rows}
    equal = sum(row == expected[row["step"]] for row in resumed.rows)
    figures.record("corrupt_checkpoints", engine_resumed_from=previous, engine_rows_equal=equal)
    figures.add_row("corrupt_checkpoints", {
        "corruption": f"newest engine checkpoint ({kept[-1].name}) truncated after an interrupted run",
        "level": "engine: train(resume=True)", "detected_by": "SHA-256 digest",
        "detected": len(flagged) == 1,
        "fell_back_to": f"iteration {previous}; the {equal} resumed rows equal the uninterrupted run's"})
    assert len(flagged) == 1
    assert result.status == "ok" and result.iterations == 20
    assert [row["step"] for row in resumed.rows] == list(range(previous + 1, 21))
    assert equal == len(resumed.rows) == 20 - previous


def test_guarantees_covered_elsewhere_are_still_tested_there():
    """docs/reliability.md points at these tests instead of repeating them: they must exist."""
    from report import ELSEWHERE

    repo = Path(__file__).resolve().parents[2]
    for _, tests, _ in ELSEWHERE:
        module = None
        for reference in tests.split(", "):
            path, name = reference.split("::")
            module = path or module
            functions = {node.name for node in ast.walk(ast.parse((repo / module).read_text()))
                         if isinstance(node, ast.FunctionDef)}
            assert name in functions, f"{module}::{name} is gone; update report.ELSEWHERE"
