"""Figures from MLflow metric histories, saved as PNG and PDF.

Per trial: the raw and weighted cls/reg losses of the weighted head over iterations
(the paper's Fig. 1a), the window mean and std of both (Fig. 3) and ALWA's α. Per
sweep: a heatmap of Table 1's grid (Δ metric per RPN cls × reg weight, one panel per
setting) and the validation metric per epoch of every trial.

Each ``*_figure`` function only draws (and returns None when it has nothing to draw);
the functions that take a client read the histories and save. Figures are built on
``matplotlib.figure.Figure`` with the Agg canvas, never pyplot, so no global backend
or figure registry is touched.

Saving: the constrained layout and the tight bounding box are computed once per figure
(on Agg, at the saving dpi) and both files reuse them, instead of ``savefig(...,
bbox_inches="tight")`` laying the figure out again for each format; the PNG is pixel for
pixel what that call writes. ``all_trial_figures`` draws the trials in ``jobs`` processes
(this one and a pool), each reading its trials' histories through its own client
(``benchmarks/bench_figures.py`` measures both, and the reads in this process instead).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from reports import schema as S
from reports.tables import Table, format_number

FORMATS = ("png", "pdf")
DPI = 120
MAX_JOBS = 64  # --jobs accepts 1..MAX_JOBS
AUTO_JOBS_CAP = 8  # the default: the CPUs, at most this many ...
TRIALS_PER_WORKER = 4  # ... and one worker per this many trials (a worker's start ≈ a few trials' figures)
_MAX_LEGEND = 12
WINDOW_KEYS = ("cls_mean", "reg_mean", "cls_std", "reg_std")
_UPDATE_KEY = S.metric_window("cls_mean")  # logged once per ALWA update


def save(figure: Figure, out_dir: Path, stem: str) -> list[Path]:
    """``stem.png`` and ``stem.pdf``, cropped to the figure's tight bounding box.

    One layout for both: the constrained layout runs once (Agg, at ``DPI``), the tight box
    is measured on it, then the layout is frozen and each format only draws. The PNG
    equals ``savefig(path, dpi=DPI, bbox_inches="tight")`` pixel for pixel; the PDF has
    the same layout and box (measured with Agg's text extents rather than the PDF
    renderer's, which differ by a fraction of a point). The figure is left at ``DPI`` with
    its layout frozen."""
    FigureCanvasAgg(figure)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure.set_dpi(DPI)
    figure.draw_without_rendering()
    pad = rcParams["savefig.pad_inches"]
    bbox = figure.get_tightbbox().padded(0.1 if pad in (None, "layout") else float(pad))
    figure.set_layout_engine("none")
    paths = []
    for fmt in FORMATS:
        path = out_dir / f"{stem}.{fmt}"
        figure.savefig(path, dpi=DPI, bbox_inches=bbox)
        paths.append(path)
    return paths


def history(client, run_id: str, key: str) -> pd.Series:
    """A metric's history as a Series indexed by step; a repeated step keeps its last value
    (the final result is logged once more at the last epoch's step)."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda p: (p.step, p.timestamp))
    series = pd.Series([p.value for p in points], index=[p.step for p in points], dtype=float)
    return series[~series.index.duplicated(keep="last")]


def weighted_head(trial: pd.Series) -> str:
    """The head the weighting acts on: ``weighting.head``, else the detector's default."""
    head = trial.get(S.PARAM_PREFIX + S.PARAM_HEAD)
    if isinstance(head, str) and head and head != "auto":
        return head
    return "retina" if trial.get(S.PARAM_PREFIX + S.PARAM_DETECTOR) == "retinanet" else "rpn"


def trial_histories(client, trial: pd.Series) -> dict:
    """Every per-iteration series the trial figures draw, keyed by metric name."""
    head = weighted_head(trial)
    keys = [S.metric_train(f"{head}_{part}") for part in ("cls", "reg")]
    keys += [S.metric_weighted(head, part) for part in ("cls", "reg")]
    keys += [S.metric_window(name) for name in WINDOW_KEYS] + [S.METRIC_ALPHA]
    return {key: history(client, trial["run_id"], key) for key in keys}


def losses_figure(histories: dict, head: str) -> Figure | None:
    """Fig. 1a: the raw losses of the weighted head, and beside them the weighted ones.

    On a log axis: the cls loss starts an order of magnitude above reg and falls faster,
    which a linear axis flattens into one line at the bottom."""
    panels = []
    for kind, key_of in (("raw", lambda part: S.metric_train(f"{head}_{part}")),
                         ("weighted", lambda part: S.metric_weighted(head, part))):
        series = {part: histories.get(key_of(part), pd.Series(dtype=float)) for part in ("cls", "reg")}
        if any(len(s) for s in series.values()):
            panels.append((kind, series))
    if not panels:
        return None
    figure = Figure(figsize=(5 * len(panels), 3.5), layout="constrained")
    for i, (kind, series) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), i + 1)
        positive = True
        for part, values in series.items():
            if len(values):
                axes.plot(values.index, values.values, label=f"{head} {part}", linewidth=0.8)
                positive &= bool((values.values > 0).all())
        if positive:
            axes.set_yscale("log")
        axes.set(title=f"{kind} {head.upper()} losses", xlabel="iteration",
                 ylabel="loss (log scale)" if positive else "loss")
        axes.legend()
    return figure


def window_figure(histories: dict) -> Figure | None:
    """Fig. 3: window mean (left) and std (right) of the weighted cls and reg losses."""
    if not any(len(histories.get(S.metric_window(name), ())) for name in WINDOW_KEYS):
        return None
    figure = Figure(figsize=(10, 3.5), layout="constrained")
    for i, statistic in enumerate(("mean", "std")):
        axes = figure.add_subplot(1, 2, i + 1)
        for part in ("cls", "reg"):
            values = histories.get(S.metric_window(f"{part}_{statistic}"), pd.Series(dtype=float))
            if len(values):
                axes.plot(values.index, values.values, marker=".", label=f"{part}_{statistic}")
        axes.set(title=f"window {statistic} of the weighted losses", xlabel="iteration")
        axes.legend()
    return figure


def alpha_figure(histories: dict) -> Figure | None:
    """ALWA's α per iteration, its update points marked (the iterations with a window
    statistic logged, else those where α changes)."""
    alpha = histories.get(S.METRIC_ALPHA, pd.Series(dtype=float))
    if not len(alpha):
        return None
    figure = Figure(figsize=(5, 3.5), layout="constrained")
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(alpha.index, alpha.values, linewidth=0.8, drawstyle="steps-post", label="α")
    updates = histories.get(_UPDATE_KEY, pd.Series(dtype=float)).index
    if not len(updates):
        changed = alpha.values[1:] != alpha.values[:-1]
        updates = alpha.index[1:][changed]
    updates = [step for step in updates if step in alpha.index]
    if updates:
        axes.plot(updates, alpha.loc[updates].values, linestyle="none", marker="o", markersize=4,
                  color="tab:red", label=f"update ({len(updates)})")
    axes.set(title="ALWA α", xlabel="iteration", ylabel="α")
    axes.legend(fontsize=8)
    return figure


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def trial_stem(trial: pd.Series) -> str:
    """The file-name stem of a trial's figures: ``trial_<name>_<run id[:8]>``, the name cut to
    200 characters (run names may have 250: a file name has at most 255 bytes)."""
    return f"trial_{_safe(str(trial.get('name') or ''))[:200]}_{trial['run_id'][:8]}"


def trial_figures(client, trial: pd.Series, out_dir: Path) -> list[Path]:
    """The per-trial figures of one row of ``reports.runs.load_trials``; those without data are skipped."""
    return save_trial_figures(trial_histories(client, trial), trial, out_dir)


def save_trial_figures(histories: dict, trial: pd.Series, out_dir: Path) -> list[Path]:
    """The per-trial figures drawn from histories already read (``trial_histories``)."""
    stem = trial_stem(trial)
    paths = []
    for kind, draw in (("losses", lambda: losses_figure(histories, weighted_head(trial))),
                       ("window", lambda: window_figure(histories)), ("alpha", lambda: alpha_figure(histories))):
        figure = draw()  # one figure alive at a time
        if figure is not None:
            paths += save(figure, out_dir, f"{stem}_{kind}")
    return paths


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_jobs(n_trials: int) -> int:
    """The default number of drawing processes: the CPUs (at most ``AUTO_JOBS_CAP``), and no
    more than one per ``TRIALS_PER_WORKER`` trials; 1 (no pool) for a handful of trials."""
    return max(1, min(available_cpus(), AUTO_JOBS_CAP, n_trials // TRIALS_PER_WORKER))


_worker_client = None


def _start_worker(tracking_uri: str, cwd: str, mlflow_env: dict) -> None:
    """A worker's client. The forkserver may have started in another folder or before
    the caller's environment changed: the caller's folder (a relative ``sqlite:///./…``)
    and its ``MLFLOW_*`` variables (credentials, timeouts) come along."""
    global _worker_client
    os.chdir(cwd)
    for name in [name for name in os.environ if name.startswith("MLFLOW_")]:
        del os.environ[name]
    os.environ.update(mlflow_env)
    from reports import runs
    _worker_client = runs.open_client(tracking_uri)


def _worker_trial_figures(trial: pd.Series, out_dir: Path) -> list[str]:
    return [path.name for path in trial_figures(_worker_client, trial, out_dir)]


def _worker_ready() -> int:
    return os.getpid()


def _pool_context():
    """forkserver (a clean single-threaded process forks the workers: no inherited MLflow
    store, SQLite connection or thread), spawn where there is none."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["reports.figures", "reports.runs"])
        return context
    return multiprocessing.get_context("spawn")


def all_trial_figures(client, trials: pd.DataFrame, out_dir: Path, *, jobs: int = 1,
                      tracking_uri: str | None = None, on_done=None) -> list[Path]:
    """``trial_figures`` of every trial, in the trials' order.

    ``jobs`` processes draw. ``jobs`` = 1: one trial after the other, here. ``jobs`` > 1:
    this process takes the trials from the back, through ``client``, while ``jobs - 1``
    workers of a process pool take them from the front, each with its own client on
    ``tracking_uri`` reading the histories of the trials it draws. A worker is handed a
    trial only once it has answered (started) and is free, so while the pool starts this
    process draws on, and no trial waits on a worker that is not there yet.
    ``on_done()`` is called after each trial (a progress bar)."""
    rows = [trial for _, trial in trials.iterrows()]
    jobs = min(jobs, len(rows))
    out_dir = Path(out_dir)
    done: list[list[Path] | None] = [None] * len(rows)
    lock = threading.Lock()  # the claims on trials, and on_done (the pool's results come in on a thread)
    bounds = [0, len(rows)]  # the trials not yet claimed: rows[bounds[0]:bounds[1]]

    def claim(front: bool) -> int | None:
        with lock:
            if bounds[0] >= bounds[1]:
                return None
            if front:
                bounds[0] += 1
                return bounds[0] - 1
            bounds[1] -= 1
            return bounds[1]

    def tick() -> None:
        if on_done is not None:
            with lock:
                on_done()

    def draw_here() -> None:
        while (i := claim(front=False)) is not None and not failed:
            done[i] = trial_figures(client, rows[i], out_dir)
            tick()

    failed: list[BaseException] = []
    if jobs <= 1:
        draw_here()
        return [path for paths in done for path in paths]
    if tracking_uri is None:
        raise ValueError("all_trial_figures: jobs > 1 needs the tracking_uri the workers open")
    mlflow_env = {name: value for name, value in os.environ.items() if name.startswith("MLFLOW_")}
    with ProcessPoolExecutor(jobs - 1, mp_context=_pool_context(), initializer=_start_worker,
                             initargs=(tracking_uri, os.getcwd(), mlflow_env)) as pool:
        def feed() -> None:
            """Hand a trial to each worker that answers or finishes one, until none is left."""
            try:
                in_flight = {pool.submit(_worker_ready): None for _ in range(jobs - 1)}
                while in_flight and not failed:
                    finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in finished:
                        i = in_flight.pop(future)
                        names = future.result()
                        if i is not None:
                            done[i] = [out_dir / name for name in names]
                            tick()
                        j = claim(front=True)
                        if j is not None and not failed:
                            in_flight[pool.submit(_worker_trial_figures, rows[j], out_dir)] = j
            except BaseException as error:  # a worker's error (or a pool shut down by one here)
                failed.append(error)

        feeder = threading.Thread(target=feed, name="trial-figures-pool", daemon=True)
        feeder.start()
        try:
            draw_here()
        except BaseException as error:  # this process's error, Ctrl-C, SIGTERM: stop handing out trials
            failed.append(error)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            feeder.join()
        if failed:
            raise failed[0]
    return [path for paths in done for path in paths]


def heatmap_grids(table: Table) -> dict:
    """Table 1 as one (cls weight × reg weight) grid of deltas per setting; (1, 1) is 0."""
    points = []
    for row in table.values.index:
        for column in table.values.columns:
            value, key = table.values.at[row, column], table.keys.at[row, column]
            if key is None or math.isnan(value):
                continue
            cls_weight, reg_weight, setting = key
            points.append((setting, cls_weight, reg_weight, value if row in table.signed_rows else 0.0))
    frame = pd.DataFrame(points, columns=["setting", "cls", "reg", "delta"])
    return {setting: frame[frame["setting"] == setting].pivot(index="cls", columns="reg", values="delta")
            for setting in dict.fromkeys(frame["setting"])}


def heatmap_figure(table: Table) -> Figure | None:
    grids = heatmap_grids(table)
    if not grids:
        return None
    figure = Figure(figsize=(4.8 * len(grids), 4.0), layout="constrained")
    for i, (setting, grid) in enumerate(grids.items()):
        axes = figure.add_subplot(1, len(grids), i + 1)
        limit = max(float(np.nanmax(np.abs(grid.values))), 1e-6)
        image = axes.imshow(grid.values, cmap="RdYlGn", origin="lower",
                            norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit))
        axes.set_xticks(range(len(grid.columns)), [f"{v:g}" for v in grid.columns])
        axes.set_yticks(range(len(grid.index)), [f"{v:g}" for v in grid.index])
        for (y, x), value in np.ndenumerate(grid.values):
            if not math.isnan(value):
                axes.text(x, y, format_number(value, table.decimals[setting], signed=True),
                          ha="center", va="center", fontsize=7,
                          color=_text_colour(image.cmap(image.norm(value))))
        axes.set(title=" ".join(table.headers[setting]).strip(), xlabel="RPN reg weight",
                 ylabel="RPN cls weight")
        figure.colorbar(image, ax=axes, shrink=0.8, label="Δ vs (1, 1)")
    return figure


def _text_colour(rgba) -> str:
    """Black on a light cell, white on a dark one (WCAG relative luminance)."""
    def linear(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    red, green, blue = (linear(c) for c in rgba[:3])
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return "black" if luminance > 0.179 else "white"


def table1_heatmap(table: Table, out_dir: Path, stem: str = "table1_heatmap") -> list[Path]:
    figure = heatmap_figure(table)
    return [] if figure is None else save(figure, out_dir, stem)


def metric_figure(curves: list) -> Figure | None:
    """One line per trial: (label, Series of the metric in percent per epoch) pairs."""
    curves = [(label, values) for label, values in curves if len(values)]
    if not curves:
        return None
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot(1, 1, 1)
    for label, values in curves:
        axes.plot(values.index, values.values, marker=".", linewidth=0.8, label=label)
    axes.set(title="validation metric per epoch", xlabel="epoch", ylabel="%")
    epochs = sorted({int(e) for _, values in curves for e in values.index})
    if len(epochs) <= 20:  # the epochs evaluated, as ticks (one evaluation: one tick, not 0.945…1.05)
        axes.set_xticks(epochs)
        axes.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    else:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(curves) <= _MAX_LEGEND:
        axes.legend(fontsize=7)
    return figure


def metric_per_epoch(client, trials: pd.DataFrame, out_dir: Path, metric: str | None = None,
                     stem: str = "metric_per_epoch") -> list[Path]:
    """The validation metric per epoch of every trial (``val/map``, or ``val/ap`` on COCO)."""
    curves = []
    for _, trial in trials.iterrows():
        name = metric or ("ap" if trial.get(S.PARAM_PREFIX + S.PARAM_DATASET_KIND) == "coco" else "map")
        label = f"{trial.get('name') or trial['run_id'][:8]} ({name})"
        curves.append((label, history(client, trial["run_id"], S.metric_val(name)) * 100.0))
    figure = metric_figure(curves)
    return [] if figure is None else save(figure, out_dir, stem)
