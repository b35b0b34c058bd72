"""``report --ci``: is each delta against its baseline real?

Every finished trial config (its params without ``train.seed``) that is not a baseline
is compared with its baseline: the config with the same params except ``weighting.*``
and method none (or fixed weights 1, 1). Per comparison:

* a paired bootstrap 95 % interval of the delta of the logged main metric over test
  images (``reports.bootstrap.paired_delta``: VOC mAP, or COCO bbox AP@[.5:.95] through
  ``reports.coco_bootstrap``) from the trials' ``detections.npz`` artifacts;
  with several seeds the seeds are paired by ``train.seed`` and the interval is that of
  the mean delta over the pairs;
* with at least two seeds on each side, the mean ± std over seeds of both and Welch's
  t-test on the logged final metric.

A delta whose interval excludes 0 is marked ``*``.
"""

from __future__ import annotations

import os

import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from reports import bootstrap
from reports import schema as S
from reports.tables import normalize
from trainers.errors import UserInputError

MARK = "*"


@dataclass
class Comparison:
    label: str                    # what differs from the baseline, e.g. "weighting.method = alwa, ..."
    context: str                  # what both share (detector, backbone, dataset)
    baseline_runs: list           # run names
    other_runs: list
    baseline_values: list         # final metric per seed, percent
    other_values: list
    interval: bootstrap.DeltaInterval | None = None
    welch_p: float = math.nan
    why_no_interval: str = ""
    seeds: list = field(default_factory=list)   # the seeds paired for the interval
    metric: str = ""              # the compared metric when not the runs' main one (--metric)


def _group_key(config: dict) -> tuple:
    return tuple(sorted(config.items()))


def comparisons(trials: pd.DataFrame, metric_column: str | None = None) -> list[Comparison]:
    """The comparisons of the finished trials (state ok, metric logged), without intervals.
    ``metric_column`` None: each trial's main metric (VOC mAP, else COCO AP), as logged."""
    runs = normalize(trials)
    default = metric_column is None
    values = pd.Series(np.nan, index=trials.index, dtype=float)
    for column in ([S.METRIC_PREFIX + name for name in S.MAIN_METRICS] if default else [metric_column]):
        values = values.fillna(_column(trials, column))
    runs = runs.assign(value=values * 100.0,
                       seed=trials.get(S.PARAM_PREFIX + S.PARAM_SEED, pd.Series("0", index=trials.index)))
    runs = runs[(runs["state"] == S.STATUS_OK) & np.isfinite(runs["value"])]
    groups: dict = {}
    for row, config in runs["config"].items():
        groups.setdefault(_group_key(config), []).append(row)
    found = []
    for key, rows in groups.items():
        if runs.loc[rows[0], "approach"] == "baseline":
            continue
        config = dict(key)
        base_key = _group_key({k: v for k, v in config.items()
                               if not k.startswith(S.PARAM_WEIGHTING_PREFIX)})
        base_rows = [r for r in groups.get(base_key, []) if runs.loc[r, "approach"] == "baseline"]
        if not base_rows:
            continue
        differs = ", ".join(f"{k} = {v}" for k, v in sorted(config.items())
                            if k.startswith(S.PARAM_WEIGHTING_PREFIX))
        context = " / ".join(str(runs.loc[rows[0], c]) for c in ("detector", "backbone", "dataset")
                             if runs.loc[rows[0], c])
        found.append(Comparison(
            label=differs, context=context,
            baseline_runs=list(runs.loc[base_rows, "run_id"]), other_runs=list(runs.loc[rows, "run_id"]),
            baseline_values=list(runs.loc[base_rows, "value"]), other_values=list(runs.loc[rows, "value"]),
            seeds=[list(runs.loc[base_rows, "seed"]), list(runs.loc[rows, "seed"])],
            metric="" if default else str(metric_column).removeprefix(S.METRIC_PREFIX)))
    return found


def _column(trials: pd.DataFrame, column: str) -> pd.Series:
    if column not in trials:
        return pd.Series(np.nan, index=trials.index, dtype=float)
    return pd.to_numeric(trials[column], errors="coerce").astype(float)


def _download(client, run_id: str, folder: Path) -> dict | None:
    from trainers.evaluation.detections_io import load_detections

    # report shows its own progress bar: MLflow's per-file one would print a bar per trial
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        path = client.download_artifacts(run_id, S.ARTIFACT_DETECTIONS, str(folder / run_id))
    except (MlflowException, OSError):
        return None
    return load_detections(path)


def with_intervals(client, found: list[Comparison], n_resamples: int = 1000, seed: int = 0,
                   progress: bool = False) -> list[Comparison]:
    """Fill in each comparison's bootstrap interval and Welch's p."""
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="alwa-ci-") as tmp:
        cache: dict = {}

        def detections(run_id):
            if run_id not in cache:
                cache[run_id] = _download(client, run_id, Path(tmp))
            return cache[run_id]

        for comparison in tqdm(found, desc="bootstrap", file=sys.stderr, disable=not progress,
                               leave=False):
            comparison.welch_p = bootstrap.welch(comparison.baseline_values, comparison.other_values)
            base_by_seed = dict(zip(comparison.seeds[0], comparison.baseline_runs))
            other_by_seed = dict(zip(comparison.seeds[1], comparison.other_runs))
            paired = sorted(set(base_by_seed) & set(other_by_seed))
            if not paired:  # no common seed: pair the first run of each
                paired_runs = [(comparison.baseline_runs[0], comparison.other_runs[0])]
            else:
                paired_runs = [(base_by_seed[s], other_by_seed[s]) for s in paired]
            loaded = [(detections(a), detections(b)) for a, b in paired_runs]
            missing = [run for (a, b), pair in zip(loaded, paired_runs)
                       for run, data in zip(pair, (a, b)) if data is None]
            if missing:
                comparison.why_no_interval = (f"no {S.ARTIFACT_DETECTIONS} in run(s) "
                                              + ", ".join(m[:8] for m in missing))
                continue
            main = S.METRIC_AP if loaded[0][0]["meta"].get("dataset") == "coco" else S.METRIC_MAP
            if comparison.metric and comparison.metric != main:
                comparison.why_no_interval = f"the bootstrap resamples {main}, not {comparison.metric}"
                continue
            try:
                comparison.interval = bootstrap.paired_delta([a for a, _ in loaded], [b for _, b in loaded],
                                                             n_resamples=n_resamples, seed=seed)
            except UserInputError as error:
                comparison.why_no_interval = error.problem
    return found


def to_markdown(found: list[Comparison], n_resamples: int) -> str:
    lines = ["### Is the delta real? Paired bootstrap over test images", "",
             "| Setting | Against baseline | Baseline (seeds) | Trial (seeds) | Δ | 95 % interval | "
             "Welch p |", "| :--- | :--- | ---: | ---: | ---: | ---: | ---: |"]
    for c in found:
        interval = c.interval
        if interval is not None:
            mark = f" {MARK}" if interval.excludes_zero else ""
            delta = f"{interval.delta:+.2f}{mark}"
            bounds = f"[{interval.low:+.2f}, {interval.high:+.2f}]"
        else:
            delta = f"{np.mean(c.other_values) - np.mean(c.baseline_values):+.2f}"
            bounds = f"– ({c.why_no_interval})" if c.why_no_interval else "–"
        p = "–" if math.isnan(c.welch_p) else f"{c.welch_p:.3f}"
        lines.append(f"| {c.context} | {c.label} | {_seeds_text(c.baseline_values)} | "
                     f"{_seeds_text(c.other_values)} | {delta} | {bounds} | {p} |")
    lines += ["", f"Δ: mAP (VOC) or bbox AP@[.5:.95] (COCO) of the trial − the baseline's on the test set, "
              f"recomputed from the "
              f"trials' {S.ARTIFACT_DETECTIONS} (mean over seeds paired by train.seed). Interval: "
              f"2.5–97.5 % of {n_resamples} paired resamples of the test images. {MARK}: the interval "
              "excludes 0. Welch p: Welch's t-test on the seeds' logged final metric (two seeds "
              "or more on each side)."]
    if not found:
        lines.insert(2, "No trial has a finished baseline with the same config (weighting aside).")
    return "\n".join(lines) + "\n"


def _seeds_text(values: list) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (n={len(values)})"
