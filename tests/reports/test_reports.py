"""Tables 1–6 and ``alwa-sweep report`` against a real SQLite MLflow store.

The store is filled through MLflow's client API (names per docs/tracking_schema.md) with
runs whose final metrics are known; every expected cell is recomputed here from those
numbers (statistics.mean / stdev, the published CSVs read with the csv module).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from alwa_sweep.cli import main
from reports import published, render, runs, tables

EXPERIMENT = "alwa-report-test"
GOLDEN_EXPERIMENT = "alwa-report-golden"
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
PAPER_CSV = Path(__file__).resolve().parents[2] / "reports" / "paper"

BASE = {"model.detector": "faster_rcnn", "model.backbone": "resnet50", "dataset.kind": "voc",
        "optimizer.type": "sgd", "model.losses.roi_reg.type": "l1", "weighting.head": "rpn"}


def fixed(cls, reg, **extra):
    return {**BASE, "weighting.method": "fixed", "weighting.cls": str(cls),
            "weighting.reg": str(reg), **extra}


def none(**extra):
    return {**BASE, "weighting.method": "none", **extra}


def alwa(variant, **extra):
    params = {**BASE, "weighting.method": "alwa", "weighting.variant": str(variant),
              "weighting.lambda0": "1.0", "weighting.interval": "100"}
    params.update(extra)
    return params


def method(name, **extra):
    return {**BASE, "weighting.method": name, **extra}


RETINA = {"model.detector": "retinanet", "weighting.head": "retina",
          "model.losses.retina_reg.type": "l1"}
COCO = {"dataset.kind": "coco"}


@dataclass
class Trial:
    name: str
    params: dict
    final: dict = field(default_factory=dict)    # metric name -> final value (fraction)
    status: str = "ok"
    reason: str = ""
    seed: int = 0
    per_iteration: bool = False


# Per-iteration series of the one trial that gets figures (an ALWA_1 RPN run).
ITERATIONS = 40
INTERVAL = 10


def trials() -> list[Trial]:
    return [
        # Table 1, VOC SGD L1: three seeds at (1, 1), one run at two other pairs.
        Trial("t1_base_s0", none(), {"map": 0.7400}, seed=0),
        Trial("t1_base_s1", none(), {"map": 0.7450}, seed=1),
        Trial("t1_base_s2", none(), {"map": 0.7420}, seed=2),
        Trial("t1_025_050", fixed(0.25, 0.5), {"map": 0.7513}),
        Trial("t1_200_200", fixed(2.0, 2.0), {"map": 0.7351}),
        Trial("t1_050_050_err", fixed(0.5, 0.5), status="error", reason="CUDA out of memory"),
        # VOC SGD CIoU has no (1, 1) run: its delta cannot be taken.
        Trial("t1_ciou_010_050", fixed(0.1, 0.5, **{"model.losses.roi_reg.type": "ciou"}),
              {"map": 0.7500}),
        # COCO SGD L1: AP, one decimal.
        Trial("t1_coco_base", none(**COCO), {"ap": 0.366, "map": 0.55}),
        Trial("t1_coco_010_050", fixed(0.1, 0.5, **COCO), {"ap": 0.3681}),
        # Pinned out of Table 1 (ResNet-101) and not in it at all (RetinaNet).
        Trial("t1_r101", fixed(0.25, 0.5, **{"model.backbone": "resnet101"}), {"map": 0.60}),
        Trial("t1_retina_fixed", fixed(0.25, 0.5, **RETINA), {"map": 0.61}),
        # Table 2: RetinaNet R50.
        Trial("t2_retina_base_l1", none(**RETINA), {"map": 0.7517}),
        Trial("t2_retina_a1_l1", alwa(1, **RETINA), {"map": 0.7599}),
        Trial("t2_retina_a2_l1", alwa(2, **RETINA), {"map": 0.7613}),
        Trial("t2_retina_base_sl1", none(**{**RETINA, "model.losses.retina_reg.type": "smooth_l1"}),
              {"map": 0.7531}),
        Trial("t2_retina_a1_sl1", alwa(1, **{**RETINA, "model.losses.retina_reg.type": "smooth_l1"}),
              {"map": 0.7609}),
        # Table 2 / 4: Faster R-CNN R50 ALWA (the baseline is Table 1's (1, 1) runs).
        Trial("t2_faster_a1_l1", alwa(1), {"map": 0.7576}, per_iteration=True),
        Trial("t2_faster_a2_l1", alwa(2), {"map": 0.7494}),
        # Table 3.
        Trial("t3_dynamic_base", none(**{"model.detector": "dynamic_rcnn"}), {"map": 0.7337}),
        Trial("t3_dynamic_a1", alwa(1, **{"model.detector": "dynamic_rcnn"}), {"map": 0.7483}),
        Trial("t3_libra_base", none(**{"model.detector": "libra_rcnn"}), {"map": 0.7481}),
        Trial("t3_double_running", none(**{"model.detector": "double_head_rcnn"}), status="running"),
        # Table 4.
        Trial("t4_retina_guided", method("guided", **RETINA), {"map": 0.6873}),
        Trial("t4_retina_dwa", method("dwa", **RETINA), {"map": 0.7247}),
        Trial("t4_faster_dwa_s0", method("dwa"), status="overflow", reason="exp overflow", seed=0),
        Trial("t4_faster_dwa_s1", method("dwa"), status="overflow", reason="exp overflow", seed=1),
        Trial("t4_libra_guided", method("guided", **{"model.detector": "libra_rcnn"}),
              status="nan", reason="non-finite loss"),
        Trial("t4_faster_dtp_s0", method("dtp"), {"map": 0.7512}, seed=0),
        Trial("t4_faster_dtp_s1", method("dtp"), status="nan", reason="non-finite loss", seed=1),
        # Table 5 (COCO, AP): Faster R-CNN L1 R50 ALWA_1 beside Table 1's COCO baseline.
        Trial("t5_faster_a1", alwa(1, **COCO), {"ap": 0.368}),
        # Table 6 (Faster R-CNN + ALWA_2).
        Trial("t6_lambda050", alwa(2, **{"weighting.lambda0": "0.5"}), {"map": 0.7549}),
        Trial("t6_c20", alwa(2, **{"weighting.interval": "20"}), {"map": 0.7480}),
        Trial("t6_neither", alwa(2, **{"weighting.lambda0": "0.75", "weighting.interval": "20"}),
              {"map": 0.7554}),
    ]


def golden_trials() -> list[Trial]:
    """A small Table 3 with two seeds in one cell, for tests/golden/table3.md."""
    dynamic = {"model.detector": "dynamic_rcnn"}
    libra = {"model.detector": "libra_rcnn"}
    return [
        Trial("dynamic_base", none(**dynamic), {"map": 0.7337}),
        Trial("dynamic_a1_s0", alwa(1, **dynamic), {"map": 0.7483}, seed=0),
        Trial("dynamic_a1_s1", alwa(1, **dynamic), {"map": 0.7463}, seed=1),
        Trial("dynamic_a2", alwa(2, **dynamic), {"map": 0.7403}),
        Trial("libra_base", none(**libra), {"map": 0.7481}),
        Trial("libra_a2", alwa(2, **libra), {"map": 0.7603}),
    ]


DEMO_EXPERIMENT = "alwa-report-demo"


def demo_trials() -> list[Trial]:
    """A demo sweep: a tiny backbone and C = 5, none of the paper's pinned settings."""
    tiny = {"model.backbone": "tiny"}
    return [
        Trial("demo_base", none(**tiny), {"map": 0.1210}),
        Trial("demo_a1", alwa(1, **tiny, **{"weighting.interval": "5"}), {"map": 0.1388}),
        Trial("demo_a2", alwa(2, **tiny, **{"weighting.interval": "5"}), {"map": 0.1302}),
    ]


def per_iteration_series():
    """Known per-iteration values of the figure trial: step -> value, per metric key."""
    series = {}
    for key, scale in (("train/rpn_cls", 0.7), ("train/rpn_reg", 0.2)):
        series[key] = {i: scale / (1 + 0.05 * i) for i in range(1, ITERATIONS + 1)}
    alpha = {i: 1.0 if i < INTERVAL else 0.5 + 0.1 * (i // INTERVAL) for i in range(1, ITERATIONS + 1)}
    series["weight/alpha"] = alpha
    series["train/rpn_cls_weighted"] = {i: v * alpha[i] for i, v in series["train/rpn_cls"].items()}
    series["train/rpn_reg_weighted"] = dict(series["train/rpn_reg"])
    for stat, offset in (("cls_mean", 0.5), ("cls_std", 0.1), ("reg_mean", 0.2), ("reg_std", 0.05)):
        series[f"window/{stat}"] = {i: offset / (1 + i / 100) for i in range(INTERVAL, ITERATIONS + 1, INTERVAL)}
    return series


EPOCHS = 3


def epoch_values(final: float) -> list[float]:
    """val/map per epoch, ending at the final value (logged once more at the end)."""
    return [final - 0.02 * (EPOCHS - e) for e in range(1, EPOCHS + 1)]


def build_store(uri: str, artifact_root: str) -> dict:
    """Log every trial under one sweep run; returns ids: experiment, sweep, golden, lone_train."""
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=f"{artifact_root}/main")
    sweep = client.create_run(experiment_id, run_name="report-test-sweep",
                              tags={"alwa.kind": "sweep", "alwa.sweep_name": "report-test-sweep"})
    sweep_id = sweep.info.run_id
    for trial in trials():
        _log_trial(client, experiment_id, trial, parent=sweep_id)
    client.set_terminated(sweep_id, "FINISHED")
    # A lone `alwa-sweep train` run: in the experiment but not in the sweep.
    lone = _log_trial(client, experiment_id, Trial("lone_train", fixed(0.75, 1.0), {"map": 0.7480}),
                      parent=None)
    golden_id = client.create_experiment(GOLDEN_EXPERIMENT, artifact_location=f"{artifact_root}/golden")
    for trial in golden_trials():
        _log_trial(client, golden_id, trial, parent=None)
    demo_id = client.create_experiment(DEMO_EXPERIMENT, artifact_location=f"{artifact_root}/demo")
    for trial in demo_trials():
        _log_trial(client, demo_id, trial, parent=None)
    return {"experiment": experiment_id, "sweep": sweep_id, "golden": golden_id, "lone_train": lone}


def _log_trial(client: MlflowClient, experiment_id: str, trial: Trial, parent: str | None) -> str:
    tags = {"alwa.kind": "trial" if parent else "train", "alwa.status": trial.status,
            "alwa.trial_key": trial.name}
    if parent:
        tags["mlflow.parentRunId"] = parent
    if trial.reason:
        tags["alwa.status_reason"] = trial.reason
    run = client.create_run(experiment_id, run_name=trial.name, tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = []
    for key, final in trial.final.items():
        for epoch, value in enumerate(epoch_values(final), start=1):
            metrics.append(Metric(f"val/{key}", value, now, epoch))
        metrics.append(Metric(f"val/{key}", final, now + 1, EPOCHS))
    if trial.per_iteration:
        for key, points in per_iteration_series().items():
            metrics += [Metric(key, value, now, step) for step, value in points.items()]
    params = {"train.seed": str(trial.seed), **trial.params}
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    if trial.status != "running":
        client.set_terminated(run_id, "FAILED" if trial.status == "error" else "FINISHED")
    return run_id


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def store():
    """The store, built once: in RAM (/dev/shm) where there is one, since SQLite's
    migrations and commits are fsync-bound on a disk."""
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="alwa-report-", dir=shm))
    uri = f"sqlite:///{root}/mlflow.db"
    ids = build_store(uri, str(root / "artifacts"))
    client = runs.open_client(uri)
    yield {
        "uri": uri, "root": root, "ids": ids, "client": client,
        "sweep": runs.load_trials(client, sweep_run_id=ids["sweep"]),
        "experiment": runs.load_trials(client, experiment=EXPERIMENT),
    }
    shutil.rmtree(root, ignore_errors=True)


def finals(*names, metric="map", trial_list=None):
    """The final metric, in percent, of the named trials."""
    by_name = {t.name: t for t in (trial_list or trials())}
    return [by_name[n].final[metric] * 100.0 for n in names]


def mean_std_text(values, decimals=2):
    return (f"{statistics.mean(values):.{decimals}f} ± {statistics.stdev(values):.{decimals}f} "
            f"(n={len(values)})")


def row_of(table, **labels):
    mask = True
    for column, value in labels.items():
        mask = mask & (table.labels[column] == value)
    rows = table.labels.index[mask]
    assert len(rows) == 1, labels
    return rows[0]


def cell(table, column, **labels):
    row = row_of(table, **labels)
    return table.cells.at[row, column], bool(table.bold.at[row, column])


# ---------------------------------------------------------------- runs

def test_load_trials_selects_trial_runs_and_derives_states(store):
    sweep, experiment = store["sweep"], store["experiment"]
    assert sorted(sweep["name"]) == sorted(t.name for t in trials())
    # the lone `train` run is in the experiment, not in the sweep; the sweep run is in neither
    assert sorted(experiment["name"]) == sorted([t.name for t in trials()] + ["lone_train"])
    assert "report-test-sweep" not in set(experiment["name"])
    states = dict(zip(sweep["name"], sweep["state"]))
    assert states["t3_double_running"] == "running"
    assert states["t1_050_050_err"] == "error"
    assert states["t4_faster_dwa_s0"] == "overflow" and states["t4_libra_guided"] == "nan"
    reasons = dict(zip(sweep["name"], sweep["reason"]))
    assert reasons["t1_050_050_err"] == "CUDA out of memory"
    # the run's latest val/map is its final result
    final = dict(zip(sweep["name"], sweep["metrics.val/map"]))
    assert final["t1_025_050"] == pytest.approx(0.7513)


def test_a_run_that_died_without_a_final_status_counts_as_error(store):
    client = store["client"]
    experiment_id = store["ids"]["experiment"]
    run = client.create_run(experiment_id, run_name="killed",
                            tags={"alwa.kind": "trial", "alwa.status": "running"})
    client.set_terminated(run.info.run_id, "KILLED")
    try:
        trials_now = runs.load_trials(client, experiment=EXPERIMENT)
        killed = trials_now[trials_now["run_id"] == run.info.run_id].iloc[0]
        assert killed["state"] == "error"
        assert "KILLED" in killed["reason"]
    finally:
        client.delete_run(run.info.run_id)


# ---------------------------------------------------------------- Table 1

def test_table1_absolute_row_deltas_bold_and_missing(store):
    table = tables.build(1, store["sweep"])
    base = finals("t1_base_s0", "t1_base_s1", "t1_base_s2")
    assert cell(table, "voc_sgd_l1", **{"Loss weight (cls, reg)": "(1.00,1.00)"}) == \
        (mean_std_text(base), False)
    delta = finals("t1_025_050")[0] - statistics.mean(base)
    assert delta > 0
    assert cell(table, "voc_sgd_l1", **{"Loss weight (cls, reg)": "(0.25,0.50)"}) == \
        (f"{delta:+.2f}", True)
    delta = finals("t1_200_200")[0] - statistics.mean(base)
    assert delta < 0
    assert cell(table, "voc_sgd_l1", **{"Loss weight (cls, reg)": "(2.00,2.00)"}) == \
        (f"{delta:+.2f}", False)
    # the (0.5, 0.5) run errored: a missing cell, and the run is listed under the table
    assert cell(table, "voc_sgd_l1", **{"Loss weight (cls, reg)": "(0.50,0.50)"}) == ("–", False)
    assert any(line.startswith("t1_050_050_err") and "error: CUDA out of memory" in line
               for line in table.left_out)
    # COCO: AP with one decimal, delta against COCO's own (1, 1)
    coco_base, coco = finals("t1_coco_base", "t1_coco_010_050", metric="ap")
    assert cell(table, "coco_sgd_l1", **{"Loss weight (cls, reg)": "(1.00,1.00)"})[0] == \
        f"{coco_base:.1f}"
    assert cell(table, "coco_sgd_l1", **{"Loss weight (cls, reg)": "(0.10,0.50)"}) == \
        (f"{coco - coco_base:+.1f}", True)
    # VOC SGD CIoU has no (1, 1) run: the absolute value in parentheses, explained
    assert cell(table, "voc_sgd_ciou", **{"Loss weight (cls, reg)": "(0.10,0.50)"}) == \
        (f"({finals('t1_ciou_010_050')[0]:.2f})", False)
    assert any("parentheses" in note for note in table.notes)
    # the paper's 20 rows and 6 settings, in its order, missing ones as "–"
    paper_rows = [f"({float(r['rpn_cls_weight']):.2f},{float(r['rpn_reg_weight']):.2f})"
                  for r in read_paper(1)]
    assert list(table.labels["Loss weight (cls, reg)"]) == paper_rows
    assert list(table.cells.columns) == ["voc_sgd_l1", "voc_sgd_smooth_l1", "voc_sgd_ciou",
                                         "voc_adamw_l1", "coco_sgd_l1", "coco_adamw_l1"]
    assert table.headers["voc_sgd_smooth_l1"] == ("VOC SGD", "SmoothL1")
    assert set(table.cells["voc_adamw_l1"]) == {"–"}
    # ResNet-101 and RetinaNet runs are not Table 1's; the pin is said
    assert any("model.backbone = resnet50 (also found: resnet101)" in n for n in table.notes)
    # the paper marks rows: a pair whose every measured delta is an improvement, label too
    improving = {row for row in table.signed_rows
                 if (deltas := [v for v in table.values.loc[row] if v == v])
                 and all(round(v, 2) >= 0 for v in deltas) and any(round(v, 2) > 0 for v in deltas)}
    assert table.bold_labels == improving and row_of(table, **{"Loss weight (cls, reg)": "(0.25,0.50)"}) \
        in improving and row_of(table, **{"Loss weight (cls, reg)": "(2.00,2.00)"}) not in improving


def test_table1_experiment_includes_a_lone_train_run(store):
    table = tables.build(1, store["experiment"])
    base = statistics.mean(finals("t1_base_s0", "t1_base_s1", "t1_base_s2"))
    lone = 0.7480 * 100.0
    assert cell(table, "voc_sgd_l1", **{"Loss weight (cls, reg)": "(0.75,1.00)"}) == \
        (f"{lone - base:+.2f}", True)
    swept = tables.build(1, store["sweep"])
    assert cell(swept, "voc_sgd_l1", **{"Loss weight (cls, reg)": "(0.75,1.00)"})[0] == "–"


def test_metric_override_and_its_missing_values(store):
    # --metric map on COCO columns: only the COCO baseline logged a val/map
    table = tables.build(1, store["sweep"], metric="map")
    assert cell(table, "coco_sgd_l1", **{"Loss weight (cls, reg)": "(1.00,1.00)"})[0] == \
        f"{0.55 * 100:.2f}"
    assert any(line.startswith("t1_coco_010_050") and "without a val/map metric" in line
               for line in table.left_out)


# ---------------------------------------------------------------- Table 2

def test_table2_blocks_and_best_per_block_and_column(store):
    table = tables.build(2, store["sweep"])
    retina = row_of(table, Method="RetinaNet", Backbone="ResNet-50")  # then +ALWA_1, +ALWA_2
    assert table.labels.loc[retina:retina + 2, "Method"].tolist() == ["RetinaNet", "+ALWA_1", "+ALWA_2"]
    values = finals("t2_retina_base_l1", "t2_retina_a1_l1", "t2_retina_a2_l1")
    assert table.cells.loc[retina:retina + 2, "l1"].tolist() == [f"{v:.2f}" for v in values]
    assert table.bold.loc[retina:retina + 2, "l1"].tolist() == [v == max(values) for v in values]
    sl1_base, sl1_alwa1 = finals("t2_retina_base_sl1", "t2_retina_a1_sl1")
    assert table.cells.loc[retina:retina + 2, "smooth_l1"].tolist() == \
        [f"{sl1_base:.2f}", f"{sl1_alwa1:.2f}", "–"]
    assert table.bold.loc[retina:retina + 2, "smooth_l1"].tolist() == \
        [sl1_base > sl1_alwa1, sl1_alwa1 > sl1_base, False]
    # Faster R-CNN's baseline is the three (1, 1) seeds; its ALWA runs at λ0 = 1, C = 100 only
    faster = row_of(table, Method="Faster R-CNN", Backbone="ResNet-50")
    assert table.cells.at[faster, "l1"] == mean_std_text(finals("t1_base_s0", "t1_base_s1", "t1_base_s2"))
    faster_a1, faster_a2 = finals("t2_faster_a1_l1", "t2_faster_a2_l1")
    assert table.cells.at[faster + 1, "l1"] == f"{faster_a1:.2f}"
    assert table.cells.at[faster + 2, "l1"] == f"{faster_a2:.2f}"
    assert table.bold.at[faster + 1, "l1"] and not table.bold.at[faster + 2, "l1"]
    # the R101 blocks are there, empty
    r101 = table.labels["Backbone"] == "ResNet-101"
    assert r101.sum() == 6 and set(table.cells.loc[r101].stack()) == {"–"}
    assert any("weighting.interval (ALWA) = 100 (also found: 20)" in n for n in table.notes)
    assert any("dataset.kind = voc (also found: coco)" in n for n in table.notes)


def test_runs_off_the_paper_settings_still_count(store):
    """With no ResNet-50 / C = 100 run to pin to, a demo's tiny runs fill an extra block."""
    demo = runs.load_trials(store["client"], experiment=DEMO_EXPERIMENT)
    table = tables.build(2, demo)
    tiny = row_of(table, Method="Faster R-CNN", Backbone="tiny")
    values = finals("demo_base", "demo_a1", "demo_a2", trial_list=demo_trials())
    assert table.cells.loc[tiny:tiny + 2, "l1"].tolist() == [f"{v:.2f}" for v in values]
    assert table.bold.loc[tiny:tiny + 2, "l1"].tolist() == [v == max(values) for v in values]
    assert table.labels["Backbone"].tolist()[:12] == ["ResNet-50"] * 3 + ["ResNet-101"] * 3 + \
        ["ResNet-50"] * 3 + ["ResNet-101"] * 3  # the paper's blocks first, empty
    assert table.notes == []


# ---------------------------------------------------------------- Table 3

def test_table3_initial_and_alwa_with_deltas(store):
    table = tables.build(3, store["sweep"])
    base, alwa1 = finals("t3_dynamic_base", "t3_dynamic_a1")
    row = row_of(table, Method="Dynamic R-CNN")
    assert table.cells.loc[row].tolist() == [f"{base:.2f}", f"{alwa1:.2f} ({alwa1 - base:+.2f})", "–"]
    assert table.cells.loc[row_of(table, Method="Double-Head R-CNN")].tolist() == ["–", "–", "–"]
    assert any(line.startswith("t3_double_running") and "still running" in line
               for line in table.left_out)
    assert [h for _, h in table.headers.values()] == ["Initial", "+ALWA_1", "+ALWA_2"]


# ---------------------------------------------------------------- Table 4

def test_table4_divergence_cells_deltas_and_bold(store):
    table = tables.build(4, store["sweep"])
    assert cell(table, "faster_rcnn", Approach="DWA") == ("overflow", False)
    assert cell(table, "libra_rcnn", Approach="Guided Loss") == ("nan", False)
    assert cell(table, "libra_rcnn", Approach="DWA") == ("–", False)
    # DTP: the finished seed is the value; the nan seed is listed, not averaged
    assert cell(table, "faster_rcnn", Approach="DTP")[0] == f"{finals('t4_faster_dtp_s0')[0]:.2f}"
    assert any(line.startswith("t4_faster_dtp_s1") and "left out of the mean" in line
               for line in table.left_out)
    # ALWA_1 with its delta against the baseline, best in its column
    base = statistics.mean(finals("t1_base_s0", "t1_base_s1", "t1_base_s2"))
    alwa1 = finals("t2_faster_a1_l1")[0]
    assert cell(table, "faster_rcnn", Approach="ALWA_1") == (f"{alwa1:.2f} ({alwa1 - base:+.2f})", True)
    retina = finals("t2_retina_base_l1", "t4_retina_guided", "t4_retina_dwa", "t2_retina_a1_l1")
    column = [cell(table, "retinanet", Approach=a) for a in ("Baseline", "Guided Loss", "DWA", "ALWA_1")]
    assert [text.split(" ")[0] for text, _ in column] == [f"{v:.2f}" for v in retina]
    assert [strong for _, strong in column] == [v == max(retina) for v in retina]
    assert list(table.labels["Approach"]) == ["Baseline", "Guided Loss", "DWA", "DTP", "ALWA_1"]


# ---------------------------------------------------------------- Table 5

def test_table5_coco_ap_one_decimal(store):
    table = tables.build(5, store["sweep"])
    base, alwa1 = finals("t1_coco_base", "t5_faster_a1", metric="ap")
    row = row_of(table, Setting="Faster R-CNN + L1", Backbone="ResNet-50")
    assert table.cells.loc[row].tolist() == [f"{base:.1f}", f"{alwa1:.1f}", "–"]
    assert table.bold.loc[row].tolist() == [base > alwa1, alwa1 > base, False]
    assert len(table.labels) == 6


# ---------------------------------------------------------------- Table 6

def test_table6_side_by_side_blocks(store):
    table = tables.build(6, store["sweep"])
    l050, l100, c20 = finals("t6_lambda050", "t2_faster_a2_l1", "t6_c20")
    assert list(table.labels["λ0"]) == ["0.50", "0.75", "1.00", "1.25", "1.50"]
    assert list(table.cells["C"]) == ["20", "100", "200", "500", ""]
    assert table.cells["lambda0:l1"].tolist() == [f"{l050:.2f}", "–", f"{l100:.2f}", "–", "–"]
    assert table.cells["C:l1"].tolist() == [f"{c20:.2f}", f"{l100:.2f}", "–", "–", ""]
    assert table.bold["lambda0:l1"].tolist() == [l050 > l100, False, l100 > l050, False, False]
    assert table.bold["C:l1"].tolist() == [c20 > l100, l100 > c20, False, False, False]
    assert table.headers["lambda0:ciou"] == ("λ0", "CIoU") and table.headers["C:l1"] == ("C", "L1")
    assert any(line.startswith("t6_neither") and "neither ablation" in line for line in table.left_out)


# ---------------------------------------------------------------- the paper's numbers

def read_paper(number):
    with open(PAPER_CSV / published.FILES[number], newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("number", range(1, 7))
def test_published_numbers_cover_every_csv_cell(number):
    rows = read_paper(number)
    labels = {1: 2, 2: 3, 3: 1, 4: 1, 5: 3, 6: 2}[number]
    values = published.published(number)
    assert len(values) == len(rows) * (len(rows[0]) - labels)
    printed = sorted(str(v) for row in rows for v in list(row.values())[labels:])
    assert sorted(v if isinstance(v, str) else repr(v) for v in values.values()) == \
        sorted(v if v in ("nan", "overflow") else repr(float(v)) for v in printed)


def test_paper_columns_beside_measured(store):
    table = published.with_paper(tables.build(1, store["sweep"]))
    paper = {(r["rpn_cls_weight"], r["rpn_reg_weight"]): r for r in read_paper(1)}
    row = row_of(table, **{"Loss weight (cls, reg)": "(0.25,0.50)"})
    measured = finals("t1_025_050")[0] - statistics.mean(finals("t1_base_s0", "t1_base_s1", "t1_base_s2"))
    printed = paper[("0.25", "0.50")]["voc_sgd_l1"]
    assert table.cells.at[row, "voc_sgd_l1:paper"] == printed
    assert table.cells.at[row, "voc_sgd_l1:delta"] == f"{measured - float(printed):+.2f}"
    assert table.headers["voc_sgd_l1:delta"] == ("VOC SGD", "L1 Δ paper")
    # no measurement: the paper's number, and no difference
    row = row_of(table, **{"Loss weight (cls, reg)": "(0.10,0.75)"})
    assert table.cells.at[row, "voc_sgd_smooth_l1:paper"] == paper[("0.10", "0.75")]["voc_sgd_smoothl1"]
    assert table.cells.at[row, "voc_sgd_smooth_l1:delta"] == "–"
    # the absolute (1, 1) row against the paper's absolute number, AP with one decimal
    row = row_of(table, **{"Loss weight (cls, reg)": "(1.00,1.00)"})
    coco = finals("t1_coco_base", metric="ap")[0]
    assert table.cells.at[row, "coco_sgd_l1:paper"] == paper[("1.00", "1.00")]["coco_sgd_l1"]
    assert table.cells.at[row, "coco_sgd_l1:delta"] == \
        f"{coco - float(paper[('1.00', '1.00')]['coco_sgd_l1']):+.1f}"

    table4 = published.with_paper(tables.build(4, store["sweep"]))
    paper4 = {r["approach"]: r for r in read_paper(4)}
    assert cell(table4, "faster_rcnn:paper", Approach="DWA")[0] == paper4["DWA"]["faster_rcnn"] == "overflow"
    assert cell(table4, "libra_rcnn:paper", Approach="Guided Loss")[0] == "nan"
    assert cell(table4, "libra_rcnn:delta", Approach="Guided Loss")[0] == "–"

    table6 = published.with_paper(tables.build(6, store["sweep"]))
    paper6 = {(r["parameter"], float(r["value"])): r for r in read_paper(6)}
    assert table6.cells["C:l1:paper"].tolist()[:4] == [paper6[("C", c)]["l1"] for c in (20, 100, 200, 500)]
    assert "C:paper" not in table6.cells  # the C labels have no published numbers


# ---------------------------------------------------------------- rendering

def _balanced(text):
    depth = 0
    for match in re.finditer(r"(?<!\\)[{}]", text):
        depth += 1 if match.group() == "{" else -1
        if depth < 0:
            return False
    return depth == 0


@pytest.mark.parametrize("number", range(1, 7))
@pytest.mark.parametrize("with_paper", [False, True])
def test_latex_structure(store, number, with_paper):
    table = tables.build(number, store["sweep"])
    if with_paper:
        table = published.with_paper(table)
    latex = render.to_latex(table)
    for piece in ("\\begin{table}", "\\begin{tabular}", "\\toprule", "\\midrule", "\\bottomrule",
                  "\\end{tabular}", "\\end{table}", f"\\label{{tab:table{number}}}"):
        assert latex.count(piece) == 1, piece
    assert _balanced(latex)
    assert latex.isascii()
    body = latex.split("\\midrule\n")[1].split("\\bottomrule")[0].strip().splitlines()
    n_columns = len(table.labels.columns) + len(table.cells.columns)
    assert len(body) == len(table.labels)
    for line in body:
        cells = re.split(r"(?<!\\)&", line)
        assert len(cells) == n_columns
        for text in cells:  # outside $...$ every _ % # is escaped
            assert not re.search(r"(?<!\\)[_%#]", re.sub(r"\$[^$]*\$", "", text)), text
    if table.left_out:
        assert "Runs not in the table" in latex


def test_latex_bold_and_escaping(store):
    latex = render.to_latex(tables.build(2, store["sweep"]))
    alwa2 = finals("t2_retina_a2_l1")[0]
    assert f"\\textbf{{{alwa2:.2f}}}" in latex
    assert "+ALWA\\_1" in latex and "ALWA_1" not in latex
    assert render.latex_escape("a_b & 50% #1 {x} ~ ^") == \
        "a\\_b \\& 50\\% \\#1 \\{x\\} \\textasciitilde{} \\textasciicircum{}"
    assert render.latex_escape("74.2 ± 0.1, λ0, Δ, –") == "74.2 $\\pm$ 0.1, $\\lambda_0$, $\\Delta$, --"


def test_latex_minus_signs_group_rules_and_row_bold(store):
    table = tables.build(1, store["sweep"])
    latex = render.to_latex(table)
    delta = finals("t1_200_200")[0] - statistics.mean(finals("t1_base_s0", "t1_base_s1", "t1_base_s2"))
    assert f"$-${abs(delta):.2f}" in latex and f"-{abs(delta):.2f}" not in latex.replace("$-$", "")
    # one \cmidrule under each header group, spanning its columns (label column is 1)
    assert "\\cmidrule(lr){2-4} \\cmidrule(lr){5-5} \\cmidrule(lr){6-6} \\cmidrule(lr){7-7}" in latex
    assert "\\multicolumn{3}{c}{VOC SGD}" in latex
    assert "\\textbf{(0.25,0.50)}" in latex and "\\textbf{(2.00,2.00)}" not in latex
    assert render.to_latex(table, width="full").count("\\begin{table*}") == 1


def pdflatex_missing() -> bool:
    return shutil.which("pdflatex") is None


@pytest.mark.skipif(pdflatex_missing(), reason="pdflatex not installed (.ci/run installs Debian's "
                    "texlive-latex-base and texlive-latex-recommended)")
@pytest.mark.parametrize("width", render.WIDTHS)
def test_every_table_compiles_on_an_article_page_without_overfull_boxes(store, tmp_path, width):
    """Every table as `report` writes it (plain, --paper, --compact) for the sweep and the
    demo experiment, \\input into one article document: no error, no overfull box."""
    demo = runs.load_trials(store["client"], experiment=DEMO_EXPERIMENT)
    inputs = []
    for source_name, source in (("sweep", store["sweep"]), ("demo", demo)):
        for number in range(1, 7):
            base = tables.build(number, source)
            for variant, table in (("plain", base), ("paper", published.with_paper(base)),
                                   ("compact", tables.compact(base))):
                name = f"{source_name}_{variant}_table{number}.tex"
                (tmp_path / name).write_text(render.to_latex(table, width=width))
                inputs.append(name)
    document = tmp_path / "all.tex"
    document.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{graphicx}\n"
                        "\\begin{document}\n" + "".join(f"\\input{{{n}}}\n\\clearpage\n" for n in inputs)
                        + "\\end{document}\n")
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "all.tex"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    log = (tmp_path / "all.log").read_text(errors="replace")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Overfull" not in log, [line for line in log.splitlines() if "Overfull" in line][:5]
    assert (tmp_path / "all.pdf").stat().st_size > 0


def test_markdown_table(store):
    table = tables.build(4, store["sweep"])
    markdown = render.to_markdown(table)
    lines = markdown.splitlines()
    assert lines[0].startswith("### Table 4. ")
    assert lines[2] == "| Approach | RetinaNet | Faster R-CNN | Libra R-CNN |"
    assert lines[3] == "| :--- | ---: | ---: | ---: |"
    alwa1 = cell(table, "retinanet", Approach="ALWA_1")[0]
    assert f"| ALWA_1 | **{alwa1}** |" in markdown
    assert "| DWA | " in markdown and "| overflow |" in markdown
    assert "Runs not in the table:" in markdown
    # two-level headers are flattened: "VOC SGD L1"
    assert "| Loss weight (cls, reg) | VOC SGD L1 | VOC SGD SmoothL1 |" in \
        render.to_markdown(tables.build(1, store["sweep"]))


def test_golden_markdown_table3(store):
    trials_golden = runs.load_trials(store["client"], experiment=GOLDEN_EXPERIMENT)
    markdown = render.to_markdown(tables.build(3, trials_golden))
    assert markdown == (GOLDEN / "table3.md").read_text(encoding="utf-8")
    # the golden numbers are the logged ones, recomputed
    by_name = {t.name: t.final["map"] * 100 for t in golden_trials()}
    seeds = [by_name["dynamic_a1_s0"], by_name["dynamic_a1_s1"]]
    expected = f"{mean_std_text(seeds)} ({statistics.mean(seeds) - by_name['dynamic_base']:+.2f})"
    assert expected in markdown


# ---------------------------------------------------------------- the CLI

def test_cli_report_end_to_end(store, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["report", "--sweep", store["ids"]["sweep"], "--tracking-uri", store["uri"],
                 "--out", str(out), "--paper"])
    assert code == 0
    printed = capsys.readouterr().out
    for number in range(1, 7):
        markdown = (out / f"table{number}.md").read_text()
        assert markdown.startswith(f"### Table {number}.") and "paper" in markdown
        assert (out / f"table{number}.tex").read_text().count("\\begin{tabular}") == 1
        assert markdown in printed
    figures_dir = out / "figures"
    made = sorted(p.name for p in figures_dir.iterdir())
    figure_trial = next(t for t in trials() if t.per_iteration).name
    for stem in ("table1_heatmap", "metric_per_epoch", f"trial_{figure_trial}_"):
        for suffix in (".png", ".pdf"):
            assert any(name.startswith(stem) and name.endswith(suffix) for name in made), (stem, suffix)
    assert all((figures_dir / name).stat().st_size > 1000 for name in made)
    # logged to the sweep's run
    client = store["client"]
    logged = {a.path for a in client.list_artifacts(store["ids"]["sweep"], "report")}
    assert {f"report/table{n}.md" for n in range(1, 7)} <= logged
    logged_figures = {a.path for a in client.list_artifacts(store["ids"]["sweep"], "report/figures")}
    assert {f"report/figures/{name}" for name in made} == logged_figures


def test_cli_experiment_one_table_latex_only(store, tmp_path):
    out = tmp_path / "out"
    code = main(["report", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"], "--out", str(out),
                 "--table", "3", "--format", "latex", "--no-figures"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["table3.tex"]


@pytest.mark.parametrize("argv, message", [
    (["--experiment", "no-such-experiment"], "--experiment: no experiment named 'no-such-experiment'"),
    (["--experiment", EXPERIMENT, "--metric", "ap75"], "--metric: no trial has a val/ap75 metric"),
    (["--sweep", "0" * 32], "--sweep: no MLflow run with id"),
])
def test_cli_user_errors(store, tmp_path, capsys, argv, message):
    code = main(["report", *argv, "--tracking-uri", store["uri"], "--out", str(tmp_path)])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_trial_run_as_sweep_and_a_missing_store(store, tmp_path, capsys):
    trial_id = store["sweep"]["run_id"].iloc[0]
    assert main(["report", "--sweep", trial_id, "--tracking-uri", store["uri"]]) == 2
    assert "is a trial, not a sweep" in capsys.readouterr().err
    missing = tmp_path / "none.db"
    assert main(["report", "--experiment", "x", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert "no MLflow database" in capsys.readouterr().err
    assert not missing.exists()
