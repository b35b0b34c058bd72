"""Records at paper scale: interval points, the final summary, provenance, and a real
PostgreSQL-backed ``mlflow server`` with the longest shipped trial names."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from alwa_sweep.provenance import start_system_metrics
from alwa_sweep.spec import load_spec
from alwa_sweep.tracking import IntervalAggregator, MlflowHook, get_or_create_experiment, open_store, sqlite_uri
from reports import runs
from reports.schema import (METRIC_FINAL_ALPHA, METRIC_FINAL_ITERATIONS, METRIC_FINAL_MAP, METRIC_FINAL_SECONDS,
                            TAG_CODE_VERSION, TAG_GIT_COMMIT, TAG_KIND, TAG_SOURCE_GIT_COMMIT, TAG_TRIAL_KEY)
from trainers.config import parse_config
from trainers.engine import TrainingHook, train

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from servers import MlflowServer, PostgresServer, postgres_missing  # noqa: E402


def tiny_alwa(data: dict, **train_fields) -> dict:
    return {
        "dataset": {"kind": "voc", "root": data["root"], "train_sets": data["train_sets"],
                    "test_sets": data["test_sets"], "scale": [128, 128], "num_workers": 0},
        "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
        "weighting": {"method": "alwa", "variant": 1, "interval": 4},
        "schedule": {"unit": "iter", "max_iters": 20, "steps": [15], "warmup_iters": 5},
        "train": {"batch_size": 4, "log_every": 5, "eval_every": 3, **train_fields},
    }


class Rows(TrainingHook):
    def __init__(self, stop_at=None):
        self.rows, self.stop_at = [], stop_at

    def on_iteration(self, iteration):
        if self.stop_at == iteration:
            raise KeyboardInterrupt("simulated kill")

    def log_iterations(self, rows):
        self.rows.extend(rows)


def history(client, run_id, key) -> dict[int, float]:
    points = client.get_metric_history(run_id, key)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"{key}: duplicate steps {sorted(steps)}"
    return {p.step: p.value for p in points}


# ---- the aggregation, against the rows it was given ------------------------------------

def fake_rows(n: int, seed: int = 0):
    rnd, alpha = random.Random(seed), 1.0
    for step in range(1, n + 1):
        row = {"step": step, "epoch": 1 + step // 40, "lr": 0.02 * min(1.0, step / 10) * (0.1 if step > 60 else 1),
               "train/loss": rnd.random(), "train/rpn_cls": rnd.random(), "weight/alpha": alpha}
        if step % 9 == 0:
            row["window/cls_mean"] = rnd.random()
            alpha = rnd.random()
        yield row


@pytest.mark.parametrize("interval,skip", [(1, 0), (7, 0), (7, 23), (50, 0)])
def test_interval_points_are_the_means_extremes_and_changes_of_the_rows(interval, skip):
    rows = list(fake_rows(100))
    aggregator = IntervalAggregator(interval, skip_until=skip)
    points = []
    for i in range(0, len(rows), 6):  # the engine's pulls (log_every = 6) cut intervals anywhere
        points += aggregator.add(rows[i:i + 6])
    points += aggregator.flush()
    by = {}
    for name, value, step in points:
        assert (name, step) not in by or by[(name, step)] == value
        by[(name, step)] = value
    kept = [r for r in rows if r["step"] > skip]
    ends = sorted({r["step"] for r in kept if r["step"] % interval == 0} | {kept[-1]["step"]})
    start = skip
    for end in ends:
        window = [r for r in kept if start < r["step"] <= end]
        for name in ("train/loss", "train/rpn_cls"):
            assert by[(name, end)] == pytest.approx(sum(r[name] for r in window) / len(window), rel=1e-12)
        assert by[("train/loss/min", end)] == min(r["train/loss"] for r in window)
        assert by[("train/loss/max", end)] == max(r["train/loss"] for r in window)
        alpha_written = max((s, v) for (n, s), v in by.items() if n == "weight/alpha" and s <= end)
        assert alpha_written[1] == window[-1]["weight/alpha"]  # a step function, written at changes
        start = end
    loss_steps = sorted(s for n, _, s in points if n == "train/loss")
    assert loss_steps == ends and loss_steps[0] > skip
    # every window statistic at its own step; α at each change and at each point
    assert {s for n, _, s in points if n == "window/cls_mean"} == {r["step"] for r in kept if "window/cls_mean" in r}
    changes = {r["step"] for prev, r in zip(kept, kept[1:]) if r["weight/alpha"] != prev["weight/alpha"]}
    assert {s for n, _, s in points if n == "weight/alpha"} == changes | {kept[0]["step"]}
    # lr: at most two values per interval, each the lr of the row at its step
    lr = [(s, v) for n, v, s in points if n == "lr"]
    assert all(v == rows[s - 1]["lr"] for s, v in lr) and len(lr) <= 2 * len(ends)
    assert lr[-1][1] == kept[-1]["lr"] or lr[-1][0] <= kept[-1]["step"]
    if interval == 1:
        assert sorted(s for n, _, s in points if n == "lr") == [r["step"] for prev, r in
                                                               zip([{"lr": None}] + kept, kept) if r["lr"] != prev["lr"]]


def test_log_interval_is_a_config_field_with_mmdetection_default():
    config = parse_config({"dataset": {"kind": "voc", "root": "voc"}})
    assert config.train.log_interval == 50  # configs/_base_/default_runtime.py: log_config interval=50
    assert config.dump()["train"]["log_interval"] == 50
    with pytest.raises(Exception, match="log_interval"):
        parse_config({"dataset": {"kind": "voc", "root": "voc"}, "train": {"log_interval": 0}})


# ---- one tiny training, logged per iteration and per interval ---------------------------

@pytest.fixture(scope="module")
def two_runs(synthetic_voc, tmp_path_factory):
    """The same tiny ALWA training logged with log_interval 1 and 10 (SQLite)."""
    folder = tmp_path_factory.mktemp("records")
    client = open_store(sqlite_uri(folder / "mlflow.db"))
    experiment = get_or_create_experiment(client, "records")
    out = {}
    for interval in (1, 10):
        hook = MlflowHook.create(client, experiment, f"L{interval}", tags={TAG_KIND: "train"},
                                 log_model=interval == 10)
        rows = Rows()
        result = train(tiny_alwa(synthetic_voc, log_interval=interval), workdir=folder / f"L{interval}",
                       hooks=[hook, rows])
        assert result.status == "ok"
        out[interval] = (hook.run_id, rows.rows, result)
    return client, experiment, out


def test_interval_points_equal_the_means_of_the_per_iteration_history(two_runs):
    client, _, out = two_runs
    every, _, _ = out[1]
    coarse, rows, _ = out[10]
    per_iteration = history(client, every, "train/rpn_cls")
    assert sorted(per_iteration) == list(range(1, 21))  # log_interval 1: every iteration, as before
    points = history(client, coarse, "train/rpn_cls")
    steps = sorted(points)
    assert 10 in steps and 20 in steps and len(steps) < 20  # interval ends (+ checkpoints/evaluations)
    start = 0
    for end in steps:
        expected = sum(per_iteration[s] for s in range(start + 1, end + 1)) / (end - start)
        assert points[end] == pytest.approx(expected, rel=1e-9)
        start = end
    maxima = history(client, coarse, "train/loss/max")
    assert maxima[20] == max(history(client, every, "train/loss")[s] for s in range(steps[-2] + 1, 21))
    windows = history(client, coarse, "window/cls_mean")
    assert sorted(windows) == [r["step"] for r in rows if "window/cls_mean" in r] == [4, 8, 12, 16, 20]
    assert windows == history(client, every, "window/cls_mean")


def test_tables_read_the_same_summary_from_both_logging_intervals(two_runs):
    client, _, out = two_runs
    trials = runs.load_trials(client, experiment="records").set_index("name")
    fine, coarse = trials.loc["L1"], trials.loc["L10"]
    val = [c for c in trials if c.startswith("metrics.val/") or c.startswith("metrics.final/val/")]
    assert val and all(fine[c] == coarse[c] for c in val)
    for column in (METRIC_FINAL_MAP, METRIC_FINAL_ALPHA, METRIC_FINAL_ITERATIONS, "final/weight/cls"):
        assert fine[f"metrics.{column}"] == coarse[f"metrics.{column}"], column
    rows = out[10][1]
    assert coarse[f"metrics.{METRIC_FINAL_ITERATIONS}"] == 20
    assert coarse[f"metrics.{METRIC_FINAL_ALPHA}"] == rows[-1]["weight/alpha"]
    assert coarse[f"metrics.{METRIC_FINAL_MAP}"] == out[10][2].metrics["val/map"]
    # the last interval's mean losses (it starts after the previous point: an interval end,
    # or a checkpoint or evaluation that closed one early)
    previous = sorted(history(client, out[10][0], "train/loss"))[-2]
    last = [r for r in rows if r["step"] > previous]
    assert coarse["metrics.final/train/loss"] == pytest.approx(sum(r["train/loss"] for r in last) / len(last))
    assert fine["metrics.final/train/loss"] == pytest.approx(rows[-1]["train/loss"])
    assert 0 < coarse[f"metrics.{METRIC_FINAL_SECONDS}"] < 600
    # written once: one point per summary metric
    assert len(client.get_metric_history(out[10][0], METRIC_FINAL_ALPHA)) == 1
    count = {i: sum(len(client.get_metric_history(out[i][0], k)) for k in client.get_run(out[i][0]).data.metrics)
             for i in (1, 10)}
    assert count[10] < count[1] / 2


def test_every_run_records_its_provenance_log_and_datasets(two_runs, synthetic_voc):
    client, _, out = two_runs
    run_id = out[10][0]
    run = client.get_run(run_id)
    tags = run.data.tags
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags[TAG_GIT_COMMIT] == tags[TAG_SOURCE_GIT_COMMIT] == head
    assert tags[TAG_CODE_VERSION] in (head, head + "-dirty")
    import torch
    assert tags["alwa.env.torch"] == torch.__version__ and tags["alwa.env.gpu_count"] == str(torch.cuda.device_count())
    for key in ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "alwa.env.hostname", "alwa.env.ray",
                "alwa.env.cudnn", "alwa.env.torchvision"):
        assert tags.get(key), key
    root = Path(synthetic_voc["root"])
    expected = {}
    for context, sets in (("train", synthetic_voc["train_sets"]), ("test", synthetic_voc["test_sets"])):
        digest = hashlib.sha256()
        for entry in sets:
            year, split = entry.split("/")
            path = root / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt"
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        expected[context] = digest.hexdigest()[:16]
    found = {[t.value for t in d.tags if t.key == "mlflow.data.context"][0]: d.dataset.digest
             for d in run.inputs.dataset_inputs}
    assert found == expected
    log = Path(client.download_artifacts(run_id, "logs/train.log"))
    text = log.read_text()
    assert "iter [10/20]" in text and "iter [20/20]" in text and "finished: ok" in text
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/ckpt_00000020.pt"]
    assert not client.list_artifacts(out[1][0], "model")  # opt-in only


def test_resumed_interval_run_never_repeats_a_step(synthetic_voc, tmp_path):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = open_store(uri)
    experiment = get_or_create_experiment(client, "resume")
    config = tiny_alwa(synthetic_voc, log_interval=4, checkpoint_every_iters=6, eval_every=0)
    first = MlflowHook.create(client, experiment, "resumable")
    with pytest.raises(KeyboardInterrupt):
        train(config, workdir=tmp_path / "run", hooks=[first, Rows(stop_at=10)])
    before = history(client, first.run_id, "train/loss")
    second = MlflowHook(MlflowClient(uri), first.run_id)
    train(config, workdir=tmp_path / "run", hooks=[second], resume=True)
    steps = history(client, first.run_id, "train/loss")  # asserts no duplicates
    assert set(before) <= set(steps) and max(steps) == 20 and min(s for s in steps if s not in before) > max(before)
    run = client.get_run(first.run_id)
    assert run.data.metrics[METRIC_FINAL_ITERATIONS] == 20 and run.data.tags["alwa.status"] == "ok"
    assert {a.path for a in client.list_artifacts(first.run_id, "logs")} == {"logs/train.log",
                                                                          "logs/train_from_6.log"}


def test_a_run_restarted_from_scratch_never_repeats_a_step(synthetic_voc, tmp_path):
    """Killed before its first checkpoint, a trial restarts at iteration 0 in the same run:
    the steps that run already stored are not written again."""
    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = open_store(uri)
    experiment = get_or_create_experiment(client, "restart")
    config = tiny_alwa(synthetic_voc, log_interval=1, checkpoint_every_iters=1000, eval_every=0)
    first = MlflowHook.create(client, experiment, "restarted")
    with pytest.raises(KeyboardInterrupt):
        train(config, workdir=tmp_path / "a", hooks=[first, Rows(stop_at=12)])
    before = history(client, first.run_id, "train/loss")
    assert max(before) == 10  # the rows pulled before the kill (train.log_every 5)
    train(config, workdir=tmp_path / "b", hooks=[MlflowHook(MlflowClient(uri), first.run_id)])
    steps = history(client, first.run_id, "train/loss")  # asserts no duplicates
    assert sorted(steps) == list(range(1, 21))
    assert all(steps[s] == before[s] for s in before)  # the first attempt's points stand


def test_system_metrics_are_sampled_on_request(tmp_path):
    client = open_store(sqlite_uri(tmp_path / "mlflow.db"))
    run = client.create_run(get_or_create_experiment(client, "sys"))
    monitor = start_system_metrics(client, run.info.run_id, sampling_interval=0.3)
    assert monitor is not None
    time.sleep(1.5)
    monitor.finish()
    names = client.get_run(run.info.run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in names), sorted(names)


# ---- PostgreSQL behind mlflow server ---------------------------------------------------

@pytest.fixture(scope="module")
def postgres_mlflow(tmp_path_factory):
    missing = postgres_missing()
    if missing:
        pytest.skip(missing)
    pg = PostgresServer().start()
    server = None
    try:
        MlflowClient(pg.uri).search_experiments()  # migrate the schema before the server starts
        server = MlflowServer(pg.uri, tmp_path_factory.mktemp("pg_mlflow")).start()
        yield server
    finally:
        if server is not None:
            server.stop()
        pg.stop()


def test_postgresql_server_takes_the_longest_shipped_names_and_reports_read_them(postgres_mlflow, synthetic_voc,
                                                                                 tmp_path):
    client = open_store(postgres_mlflow.uri)
    experiment = get_or_create_experiment(client, "alwa-table1")
    spec = load_spec(ROOT / "search_spaces" / "table1_loss_weight_grid.yaml", check_paths=False)
    longest = sorted(spec.trials, key=lambda t: len(t.name))[-2:]
    assert all(t.config.dataset.kind == "coco" for t in longest)
    written = {}
    for trial in longest:  # the table's configs and names, through the real hook
        hook = MlflowHook.create(client, experiment, trial.name, tags={TAG_KIND: "trial", TAG_TRIAL_KEY: trial.key})
        config = trial.config.model_copy(update={"train": trial.config.train.model_copy(update={"log_interval": 5})})
        hook.start(config, 0, 30)
        rows = [{"step": s, "epoch": 1, "lr": 0.02, "train/loss": 1.0 / s, "weight/alpha": 1.0} for s in range(1, 31)]
        hook.log_iterations(rows)
        hook.log_evaluation(1, 30, {"val/ap": 0.25, "val/ap50": 0.5})
        hook.finish("ok", "", {"val/ap": 0.25, "val/ap50": 0.5})
        written[trial.name] = hook.run_id
    name = "n" * 250  # a real tiny training with a name at the limit
    hook = MlflowHook.create(client, experiment, name, tags={TAG_KIND: "train"})
    result = train(tiny_alwa(synthetic_voc, log_interval=10), workdir=tmp_path / "run", hooks=[hook])
    written[name] = hook.run_id

    trials = runs.load_trials(client, experiment="alwa-table1")
    assert sorted(trials["name"]) == sorted(written) and set(trials["state"]) == {"ok"}
    by_name = trials.set_index("name")
    for trial in longest:
        assert by_name.loc[trial.name, "metrics.final/val/ap"] == 0.25
        assert by_name.loc[trial.name, "metrics.final/train/loss"] == pytest.approx(sum(1 / s for s in range(26, 31)) / 5)
        assert by_name.loc[trial.name, "params.dataset.kind"] == "coco"
    assert by_name.loc[name, f"metrics.{METRIC_FINAL_MAP}"] == result.metrics["val/map"]
    assert by_name.loc[name, f"metrics.{METRIC_FINAL_ITERATIONS}"] == 20
    steps = sorted(history(client, hook.run_id, "train/loss"))  # no duplicate steps
    assert {10, 20} <= set(steps) and len(steps) < 20
    # the column these names now fit in: 280 characters (the old COCO names) are refused
    with pytest.raises(Exception):
        client.create_run(experiment, run_name="x" * 280)
