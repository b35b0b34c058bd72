"""The report's figures, drawn from metric histories logged to a real SQLite MLflow store.

The drawn lines and heatmap cells are compared with the series the test logged and
with deltas it computes itself; the saved files must be real, non-empty PNG and PDF.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from matplotlib.backends.backend_agg import FigureCanvasAgg

from alwa_sweep.cli import main
from alwa_sweep.commands import report as report_command
from reports import figures, runs, tables
from trainers.errors import ConfigError

ITERATIONS = 30
INTERVAL = 10
BASE = {"model.detector": "faster_rcnn", "model.backbone": "resnet50", "dataset.kind": "voc",
        "optimizer.type": "sgd", "model.losses.roi_reg.type": "l1", "weighting.head": "rpn"}


def alwa_series() -> dict:
    """Per-iteration values an ALWA_1 trial logs: α replaced every INTERVAL iterations."""
    alpha = {i: 1.0 if i < INTERVAL else 0.9 - 0.1 * (i // INTERVAL) for i in range(1, ITERATIONS + 1)}
    raw_cls = {i: 0.8 / (1 + 0.1 * i) for i in alpha}
    raw_reg = {i: 0.3 / (1 + 0.05 * i) for i in alpha}
    series = {
        "train/rpn_cls": raw_cls, "train/rpn_reg": raw_reg, "weight/alpha": alpha,
        "train/rpn_cls_weighted": {i: raw_cls[i] * alpha[i] for i in alpha},
        "train/rpn_reg_weighted": dict(raw_reg),
    }
    updates = range(INTERVAL, ITERATIONS + 1, INTERVAL)
    for part, losses in (("cls", series["train/rpn_cls_weighted"]), ("reg", raw_reg)):
        windows = {i: [losses[j] for j in range(i - INTERVAL + 1, i + 1)] for i in updates}
        series[f"window/{part}_mean"] = {i: float(np.mean(w)) for i, w in windows.items()}
        series[f"window/{part}_std"] = {i: float(np.std(w, ddof=1)) for i, w in windows.items()}
    return series


# name -> (params, final val/map, per-epoch val/map, per-iteration series)
TRIALS = {
    "alwa1": ({**BASE, "weighting.method": "alwa", "weighting.variant": "1"},
              [0.70, 0.74, 0.7576], alwa_series()),
    "base": ({**BASE, "weighting.method": "none"}, [0.69, 0.73, 0.7434],
             {k: v for k, v in alwa_series().items() if k in ("train/rpn_cls", "train/rpn_reg")}),
    "w025_050": ({**BASE, "weighting.method": "fixed", "weighting.cls": "0.25", "weighting.reg": "0.5"},
                 [0.71, 0.745, 0.7547], {}),
    "w200_150": ({**BASE, "weighting.method": "fixed", "weighting.cls": "2.0", "weighting.reg": "1.5"},
                 [0.68, 0.72, 0.7410], {}),
}


@pytest.fixture(scope="module")
def store():
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="alwa-figures-", dir=shm))
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("figures", artifact_location=str(root / "artifacts"))
    sweep = client.create_run(experiment_id, run_name="sweep", tags={"alwa.kind": "sweep"}).info.run_id
    now = int(time.time() * 1000)
    for name, (params, per_epoch, series) in TRIALS.items():
        run_id = client.create_run(experiment_id, run_name=name, tags={
            "alwa.kind": "trial", "alwa.status": "ok", "mlflow.parentRunId": sweep}).info.run_id
        metrics = [Metric("val/map", v, now, epoch) for epoch, v in enumerate(per_epoch, start=1)]
        metrics.append(Metric("val/map", per_epoch[-1], now + 1, len(per_epoch)))  # the final result
        metrics += [Metric(key, v, now, step) for key, points in series.items() for step, v in points.items()]
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(run_id)
    trials = runs.load_trials(runs.open_client(uri), sweep_run_id=sweep)
    yield {"client": client, "trials": trials.set_index("name", drop=False), "root": root, "uri": uri,
           "sweep": sweep}
    shutil.rmtree(root, ignore_errors=True)


def line_data(axes):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines}


def as_xy(points: dict):
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def contrast(a, b) -> float:
    """WCAG 2 contrast ratio of two RGBA colours."""
    def luminance(rgba):
        channels = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
        return 0.2126 * channels[0] + 0.7152 * channels[1] + 0.0722 * channels[2]
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def same_line(drawn, expected) -> bool:
    """Same x values, y values equal up to float rounding."""
    return list(drawn[0]) == list(expected[0]) and list(drawn[1]) == pytest.approx(list(expected[1]))


def test_history_keeps_the_last_value_of_a_repeated_step(store):
    trial = store["trials"].loc["alwa1"]
    series = figures.history(store["client"], trial["run_id"], "val/map")
    assert list(series.index) == [1, 2, 3]
    assert list(series.values) == pytest.approx(TRIALS["alwa1"][1])
    assert len(figures.history(store["client"], trial["run_id"], "no/such_metric")) == 0


def test_losses_window_and_alpha_figures_draw_the_logged_series(store):
    trial = store["trials"].loc["alwa1"]
    histories = figures.trial_histories(store["client"], trial)
    logged = alwa_series()

    raw, weighted = figures.losses_figure(histories, "rpn").axes[:2]
    assert same_line(line_data(raw)["rpn cls"], as_xy(logged["train/rpn_cls"]))
    assert same_line(line_data(raw)["rpn reg"], as_xy(logged["train/rpn_reg"]))
    assert same_line(line_data(weighted)["rpn cls"], as_xy(logged["train/rpn_cls_weighted"]))

    mean_axes, std_axes = figures.window_figure(histories).axes[:2]
    assert same_line(line_data(mean_axes)["cls_mean"], as_xy(logged["window/cls_mean"]))
    assert same_line(line_data(std_axes)["reg_std"], as_xy(logged["window/reg_std"]))
    assert line_data(mean_axes)["cls_mean"][0] == [10, 20, 30]

    # losses on a log axis (cls starts far above reg)
    assert raw.get_yscale() == "log" and weighted.get_yscale() == "log"

    (alpha_axes,) = figures.alpha_figure(histories).axes
    drawn = line_data(alpha_axes)
    assert same_line(drawn["α"], as_xy(logged["weight/alpha"]))
    # the update points: the iterations with a window statistic, at α's value there
    (update_label,) = [label for label in drawn if label.startswith("update")]
    updates = sorted(logged["window/cls_mean"])
    assert same_line(drawn[update_label], (updates, [logged["weight/alpha"][i] for i in updates]))
    # without window statistics, the points where α changes
    no_window = {k: v for k, v in histories.items() if not k.startswith("window/")}
    drawn = line_data(figures.alpha_figure(no_window).axes[0])
    alpha = logged["weight/alpha"]
    changes = [i for i in sorted(alpha)[1:] if alpha[i] != alpha[i - 1]]
    (update_label,) = [label for label in drawn if label.startswith("update")]
    assert drawn[update_label][0] == changes


def test_trial_figures_files(store, tmp_path):
    trials = store["trials"]
    made = figures.trial_figures(store["client"], trials.loc["alwa1"], tmp_path)
    stem = f"trial_alwa1_{trials.loc['alwa1', 'run_id'][:8]}"
    assert sorted(p.name for p in made) == sorted(
        f"{stem}_{kind}.{fmt}" for kind in ("losses", "window", "alpha") for fmt in ("png", "pdf"))
    for path in made:
        head = path.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else head.startswith(b"%PDF")
        assert path.stat().st_size > 1000
    # a baseline has raw losses only: one panel, no window or α figure
    base = figures.trial_figures(store["client"], trials.loc["base"], tmp_path / "base")
    assert sorted(p.name.rsplit("_", 1)[-1] for p in base) == ["losses.pdf", "losses.png"]
    histories = figures.trial_histories(store["client"], trials.loc["base"])
    assert len(figures.losses_figure(histories, "rpn").axes) == 1
    # a trial without per-iteration metrics: nothing
    assert figures.trial_figures(store["client"], trials.loc["w025_050"], tmp_path / "none") == []


def test_table1_heatmap_cells_are_the_deltas(store, tmp_path):
    table = tables.build(1, store["trials"].reset_index(drop=True))
    grids = figures.heatmap_grids(table)
    assert list(grids) == ["voc_sgd_l1"]
    grid = grids["voc_sgd_l1"]
    final = {name: spec[1][-1] * 100.0 for name, spec in TRIALS.items()}
    assert grid.at[1.0, 1.0] == 0.0
    assert grid.at[0.25, 0.5] == pytest.approx(final["w025_050"] - final["base"])
    assert grid.at[2.0, 1.5] == pytest.approx(final["w200_150"] - final["base"])
    assert sorted(grid.index) == [0.25, 1.0, 2.0] and sorted(grid.columns) == [0.5, 1.0, 1.5]
    assert math.isnan(grid.at[0.25, 1.0])  # no run there
    figure = figures.heatmap_figure(table)
    image = figure.axes[0].images[0].get_array()
    assert np.ma.filled(image, np.nan)[1, 1] == 0.0
    texts = {t.get_text() for t in figure.axes[0].texts}
    assert f"{final['w025_050'] - final['base']:+.2f}" in texts
    # every label readable: WCAG contrast >= 4.5 against its own cell's colour
    from matplotlib.colors import to_rgba
    heat = figure.axes[0].images[0]
    for text in figure.axes[0].texts:
        x, y = (int(round(v)) for v in text.get_position())
        background = heat.cmap(heat.norm(grid.values[y, x]))
        assert contrast(to_rgba(text.get_color()), background) >= 4.5, text.get_text()
    paths = figures.table1_heatmap(table, tmp_path)
    assert [p.name for p in paths] == ["table1_heatmap.png", "table1_heatmap.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_metric_per_epoch_one_line_per_trial(store, tmp_path):
    trials = store["trials"].reset_index(drop=True)
    paths = figures.metric_per_epoch(store["client"], trials, tmp_path)
    assert [p.name for p in paths] == ["metric_per_epoch.png", "metric_per_epoch.pdf"]
    curves = [(f"{name} (map)", figures.history(store["client"], run_id, "val/map") * 100.0)
              for name, run_id in zip(trials["name"], trials["run_id"])]
    drawn = line_data(figures.metric_figure(curves).axes[0])
    assert set(drawn) == {f"{name} (map)" for name in TRIALS}
    for name, (_, per_epoch, _) in TRIALS.items():
        assert same_line(drawn[f"{name} (map)"], ([1, 2, 3], [v * 100.0 for v in per_epoch]))


def test_metric_per_epoch_of_a_single_evaluation_has_one_integer_tick():
    import pandas as pd
    figure = figures.metric_figure([("one eval (map)", pd.Series([12.5], index=[1]))])
    axes = figure.axes[0]
    FigureCanvasAgg(figure).draw()
    assert list(axes.get_xticks()) == [1]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["1"]


# ---- the figure stage at scale: one layout per figure, a process pool, report --jobs ----

def pixels(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"))


def media_box(path: Path) -> list[float]:
    """The page size a PDF declares (matplotlib writes its page object uncompressed)."""
    import re
    found = re.search(rb"/MediaBox \[\s*([-\d.\s]+)\]", path.read_bytes())
    return [float(v) for v in found.group(1).split()]


def expected_trial_files(trials) -> list[str]:
    """Which trial figures the store's series call for, worked out from TRIALS itself:
    losses where a raw loss was logged, window and α where ALWA logged them."""
    names = []
    for name, (_, _, series) in TRIALS.items():
        stem = f"trial_{name}_{trials.loc[name, 'run_id'][:8]}"
        kinds = [kind for kind, key in (("losses", "train/rpn_cls"), ("window", "window/cls_mean"),
                                        ("alpha", "weight/alpha")) if key in series]
        names += [f"{stem}_{kind}.{fmt}" for kind in kinds for fmt in ("png", "pdf")]
    return sorted(names)


def test_one_layout_save_writes_the_png_plain_savefig_writes(store, tmp_path):
    """``save`` lays each figure out once for both files: the PNG is pixel for pixel what
    ``savefig(bbox_inches="tight")`` writes, the PDF page the same size (to a point)."""
    histories = figures.trial_histories(store["client"], store["trials"].loc["alwa1"])
    for kind, draw in (("losses", lambda: figures.losses_figure(histories, "rpn")),
                       ("window", lambda: figures.window_figure(histories)),
                       ("alpha", lambda: figures.alpha_figure(histories))):
        plain = draw()
        FigureCanvasAgg(plain)
        for fmt in ("png", "pdf"):
            plain.savefig(tmp_path / f"plain_{kind}.{fmt}", dpi=120, bbox_inches="tight")
        png, pdf = figures.save(draw(), tmp_path, f"one_{kind}")
        assert np.array_equal(pixels(png), pixels(tmp_path / f"plain_{kind}.png")), kind
        assert pdf.read_bytes().startswith(b"%PDF")
        assert media_box(pdf) == pytest.approx(media_box(tmp_path / f"plain_{kind}.pdf"), abs=1.0), kind


def test_parallel_and_serial_trial_figures_are_the_same_files_and_pixels(store, tmp_path):
    trials = store["trials"].reset_index(drop=True)
    done = []
    serial = figures.all_trial_figures(store["client"], trials, tmp_path / "serial", jobs=1)
    parallel = figures.all_trial_figures(store["client"], trials, tmp_path / "parallel", jobs=2,
                                         tracking_uri=store["uri"], on_done=lambda: done.append(1))
    assert len(done) == len(trials)
    # same names in the same order (the trials'), under the folder each was given
    assert [p.name for p in parallel] == [p.name for p in serial]
    assert sorted(p.name for p in serial) == expected_trial_files(store["trials"])
    assert all(p.parent == tmp_path / "parallel" for p in parallel)
    # nothing else was written
    assert sorted(p.name for p in (tmp_path / "parallel").iterdir()) == sorted(p.name for p in parallel)
    for a, b in zip(serial, parallel):
        if a.suffix == ".png":
            assert np.array_equal(pixels(a), pixels(b)), a.name
        else:
            assert b.read_bytes().startswith(b"%PDF") and b.stat().st_size > 1000
            assert media_box(a) == media_box(b)


def test_pool_workers_draw_what_this_process_draws(store, tmp_path):
    """The workers' own path (forkserver, a client opened on the URI, histories read
    there), every trial of the store through it, against the trials drawn here."""
    from concurrent.futures import ProcessPoolExecutor
    trials = store["trials"].reset_index(drop=True)
    with ProcessPoolExecutor(2, mp_context=figures._pool_context(), initializer=figures._start_worker,
                             initargs=(store["uri"], os.getcwd(), {})) as pool:
        drawn = [pool.submit(figures._worker_trial_figures, trial, tmp_path / "workers")
                 for _, trial in trials.iterrows()]
        names = [name for future in drawn for name in future.result()]
    here = figures.all_trial_figures(store["client"], trials, tmp_path / "here", jobs=1)
    assert names == [p.name for p in here]
    for path in here:
        if path.suffix == ".png":
            assert np.array_equal(pixels(path), pixels(tmp_path / "workers" / path.name)), path.name


def test_an_error_in_either_process_ends_the_stage(store, tmp_path):
    """A trial whose file cannot be written (a folder in its place) fails the stage with
    that error, first or last in the list (drawn by a worker or by this process)."""
    trials = store["trials"]
    stem = f"trial_alwa1_{trials.loc['alwa1', 'run_id'][:8]}"
    others = [name for name in trials.index if name != "alwa1"]
    for order in (["alwa1", *others], [*others, "alwa1"]):
        out = tmp_path / order[0]
        (out / f"{stem}_window.png").mkdir(parents=True)
        with pytest.raises(IsADirectoryError):
            figures.all_trial_figures(store["client"], trials.loc[order].reset_index(drop=True), out, jobs=2,
                                      tracking_uri=store["uri"])


def test_a_long_trial_name_still_makes_valid_file_names(store, tmp_path):
    """Run names may have 250 characters (spec.MAX_NAME_LENGTH); the file names stay
    under the usual 255-byte limit, the run id keeps them apart."""
    trial = store["trials"].loc["alwa1"].copy()
    trial["name"] = "w" * 250
    made = figures.trial_figures(store["client"], trial, tmp_path)
    assert len(made) == 6 and all(len(p.name) <= 255 and p.stat().st_size > 1000 for p in made)
    assert all(p.name.startswith("trial_www") and trial["run_id"][:8] in p.name for p in made)


def test_parallel_needs_the_tracking_uri(store, tmp_path):
    with pytest.raises(ValueError, match="tracking_uri"):
        figures.all_trial_figures(store["client"], store["trials"], tmp_path, jobs=2)


def test_default_jobs():
    cpus = figures.available_cpus()
    assert figures.auto_jobs(0) == figures.auto_jobs(7) == 1  # a handful of trials: no pool
    assert figures.auto_jobs(8) == min(cpus, 2)
    assert figures.auto_jobs(10_000) == min(cpus, figures.AUTO_JOBS_CAP)
    # report's --help states the same numbers without importing matplotlib
    assert (report_command.MAX_JOBS, report_command.AUTO_JOBS_CAP, report_command.TRIALS_PER_WORKER) == (
        figures.MAX_JOBS, figures.AUTO_JOBS_CAP, figures.TRIALS_PER_WORKER)


@pytest.mark.parametrize("value", ["0", "-3", "65", "two", "1.5", ""])
def test_report_refuses_a_bad_jobs_value(store, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--sweep", store["sweep"], "--tracking-uri", store["uri"], "--out", str(tmp_path),
              "--jobs", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--jobs" in err and "1..64" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "figures").exists()


def test_report_refuses_a_bad_jobs_value_from_a_namespace(store, tmp_path):
    """Callers that build the Namespace themselves get the same check (``ConfigError``)."""
    import argparse
    args = argparse.Namespace(experiment=None, sweep=store["sweep"], table=None, format="md", out=tmp_path,
                              metric=None, paper=False, tracking_uri=store["uri"], no_figures=False,
                              compact=False, jobs=0)
    with pytest.raises(ConfigError) as error:
        report_command.run(args)
    assert error.value.where == "--jobs" and "got 0" in str(error.value)


def test_report_with_jobs_writes_and_logs_every_figure(store, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["report", "--sweep", store["sweep"], "--tracking-uri", store["uri"], "--out", str(out),
                 "--format", "md", "--jobs", "2"])
    assert code == 0, capsys.readouterr().err
    expected = expected_trial_files(store["trials"]) + [
        f"{stem}.{fmt}" for stem in ("table1_heatmap", "metric_per_epoch") for fmt in ("png", "pdf")]
    written = sorted(p.name for p in (out / "figures").iterdir())
    assert written == sorted(expected)
    assert all((out / "figures" / name).stat().st_size > 1000 for name in written)
    logged = sorted(a.path.rsplit("/", 1)[-1]
                    for a in store["client"].list_artifacts(store["sweep"], "report/figures"))
    assert set(written) <= set(logged)
    # the same trial figures, pixel for pixel, as drawn here in one process
    serial = figures.all_trial_figures(store["client"], store["trials"].reset_index(drop=True),
                                       tmp_path / "serial", jobs=1)
    for path in serial:
        if path.suffix == ".png":
            assert np.array_equal(pixels(path), pixels(out / "figures" / path.name)), path.name
