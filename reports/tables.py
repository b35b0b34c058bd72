"""The paper's Tables 1–6, rebuilt from the trial runs that ``reports.runs`` loads.

How runs map to cells (params per ``docs/tracking_schema.md``; a missing param takes
the engine's default: ``weighting.method`` none, weights 1, variant 1, λ0 = 1, C = 100,
regression loss ``l1``, weighted head ``rpn`` (``retina`` for RetinaNet)):

- *approach* of a run: ``baseline`` for ``weighting.method`` none, or fixed with
  cls = reg = 1; ``alwa_1`` / ``alwa_2`` for alwa with ``weighting.variant`` 1 / 2;
  otherwise the method's name (``guided``, ``dwa``, ``dtp``, ``fixed``, ...).
- *regression loss* of a run: ``model.losses.retina_reg.type`` for RetinaNet,
  ``model.losses.roi_reg.type`` for the others.
- Table 1: ``model.detector`` faster_rcnn with method none, or fixed on head rpn.
  Row = (``weighting.cls``, ``weighting.reg``) (none is (1, 1)); column =
  ``{dataset.kind}_{optimizer.type}_{regression loss}``. The (1, 1) row is absolute,
  the others are deltas against it, in bold where they improve on it.
- Table 2: detectors retinanet / faster_rcnn; block = (detector, ``model.backbone``),
  rows baseline / alwa_1 / alwa_2, column = regression loss; best of each block and
  column in bold.
- Table 3: detectors dynamic_rcnn / double_head_rcnn / libra_rcnn × baseline / alwa_1 /
  alwa_2, the ALWA cells followed by their delta against the baseline.
- Table 4: approaches baseline / guided / dwa / dtp / alwa_1 × detectors retinanet /
  faster_rcnn / libra_rcnn; a cell whose every run diverged prints the ``alwa.status``
  (``nan`` or ``overflow``); the ALWA_1 row carries its delta against the baseline; best
  per column in bold.
- Table 5: ``dataset.kind`` coco, metric AP; rows (detector, regression loss,
  backbone) for faster_rcnn / mask_rcnn, columns baseline / alwa_1 / alwa_2; best per
  row in bold.
- Table 6: faster_rcnn + alwa_2; the λ0 block has the runs at C = 100 (one row per
  ``weighting.lambda0``), the C block those at λ0 = 1 (one row per
  ``weighting.interval``), side by side; columns = regression loss; best per block and
  column in bold.

Settings the paper fixes but a table does not show (VOC, SGD, ResNet-50, L1, ALWA's
λ0 = 1 and C = 100) are *pinned*: when the runs include the paper's value, only those
runs count and a note under the table says which other values were left out; when
none has it (a demo on a tiny backbone), the runs count as they are.

Every cell aggregates its runs with ``alwa.status`` ok: the mean ± sample std over
seeds, with the number of runs when more than one. A cell with no finished run prints
``–``, or the divergence status when all its runs diverged. Runs that count for a cell
but not in its number (errors, still running, no metric, a diverged seed beside
finished ones) are listed under the table. Rows and columns are the paper's, plus any
further values found in the runs.

mAP / AP are stored as fractions; the tables print percent, 2 decimals for VOC mAP
(74.34) and 1 for COCO AP (36.6).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from reports import schema as S
from reports.runs import metric_column
from trainers.errors import ConfigError
from trainers.config import OptimizerConfig
from trainers.losses import BoxRegressionLoss
from trainers.weighting import ALWASettings, FixedSettings, NoneSettings

MISSING = "–"
DIVERGED = (S.STATUS_NAN, S.STATUS_OVERFLOW)

DETECTORS = {
    "faster_rcnn": "Faster R-CNN", "retinanet": "RetinaNet", "mask_rcnn": "Mask R-CNN",
    "dynamic_rcnn": "Dynamic R-CNN", "double_head_rcnn": "Double-Head R-CNN",
    "libra_rcnn": "Libra R-CNN",
}
BACKBONES = {"resnet50": "ResNet-50", "resnet101": "ResNet-101"}
LOSSES = {"l1": "L1", "smooth_l1": "SmoothL1", "giou": "GIoU", "diou": "DIoU", "ciou": "CIoU"}
APPROACHES = {
    "baseline": "Baseline", "alwa_1": "ALWA_1", "alwa_2": "ALWA_2", "guided": "Guided Loss",
    "dwa": "DWA", "dtp": "DTP", "uncertainty": "Uncertainty", "fixed": "Fixed",
}
DATASETS = {"voc": "VOC", "coco": "COCO"}
OPTIMIZERS = {"sgd": "SGD", "adamw": "AdamW"}

TABLE1_WEIGHTS = [
    (1.0, 1.0), (0.1, 0.5), (0.1, 0.75), (0.25, 0.25), (0.25, 0.5), (0.25, 0.75), (0.5, 0.25),
    (0.5, 0.5), (0.5, 0.75), (0.75, 0.5), (0.75, 0.75), (0.75, 1.0), (1.0, 0.75), (1.0, 1.25),
    (1.25, 1.25), (1.25, 1.5), (1.5, 1.5), (1.5, 2.0), (2.0, 1.5), (2.0, 2.0),
]
TABLE1_SETTINGS = ["voc_sgd_l1", "voc_sgd_smooth_l1", "voc_sgd_ciou", "voc_adamw_l1",
                   "coco_sgd_l1", "coco_adamw_l1"]
PAPER_LOSSES = ["l1", "smooth_l1", "ciou"]
ALWA_METHODS = ["baseline", "alwa_1", "alwa_2"]
TABLE2_BLOCKS = [("retinanet", "resnet50"), ("retinanet", "resnet101"),
                 ("faster_rcnn", "resnet50"), ("faster_rcnn", "resnet101")]
TABLE3_DETECTORS = ["dynamic_rcnn", "double_head_rcnn", "libra_rcnn"]
TABLE4_APPROACHES = ["baseline", "guided", "dwa", "dtp", "alwa_1"]
TABLE4_DETECTORS = ["retinanet", "faster_rcnn", "libra_rcnn"]
TABLE5_ROWS = [("faster_rcnn", "l1", "resnet50"), ("faster_rcnn", "ciou", "resnet50"),
               ("faster_rcnn", "smooth_l1", "resnet50"), ("mask_rcnn", "l1", "resnet50"),
               ("mask_rcnn", "ciou", "resnet50"), ("mask_rcnn", "smooth_l1", "resnet101")]
TABLE6_LAMBDA0 = [0.5, 0.75, 1.0, 1.25, 1.5]
TABLE6_INTERVALS = [20.0, 100.0, 200.0, 500.0]
# A missing param means "not recorded" (a run from before every resolved value was
# logged as a param); it then takes the typed config's default, the one source of them.
OLD_RUN_DEFAULTS = {
    S.PARAM_METHOD: NoneSettings().method, S.PARAM_CLS_WEIGHT: FixedSettings().cls,
    S.PARAM_REG_WEIGHT: FixedSettings().reg, S.PARAM_VARIANT: ALWASettings().variant,
    S.PARAM_LAMBDA0: ALWASettings().lambda0, S.PARAM_INTERVAL: float(ALWASettings().interval),
    S.PARAM_OPTIMIZER: OptimizerConfig().type, "regression_loss": BoxRegressionLoss().type,
}
DEFAULT_LAMBDA0 = float(OLD_RUN_DEFAULTS[S.PARAM_LAMBDA0])
DEFAULT_INTERVAL = float(OLD_RUN_DEFAULTS[S.PARAM_INTERVAL])

TITLES = {
    1: "Faster R-CNN R50: RPN (cls, reg) loss weights; the (1.00,1.00) row absolute, the "
       "others deltas against it (improvements in bold)",
    2: "RetinaNet and Faster R-CNN with ALWA on VOC07 test (mAP) per regression loss",
    3: "Other detectors with ALWA on VOC07 test (mAP)",
    4: "ALWA against other task-balancing approaches on VOC07 test (mAP)",
    5: "Faster R-CNN and Mask R-CNN with ALWA on COCO val2017 (AP)",
    6: "Ablation of ALWA_2's λ0 and C (Faster R-CNN, VOC07 test mAP)",
}


def name(names: dict, key) -> str:
    return names.get(key, str(key))


@dataclass
class Table:
    """One table in the paper's layout, ready to render.

    All frames share one RangeIndex (the printed rows). ``labels`` holds the row-label
    columns; ``cells``/``values``/``bold``/``keys`` the value columns (string keys, see
    ``headers``): the printed text, the printed number (NaN where none; deltas in the
    rows listed in ``signed_rows``), bold marks, and the cell's key in the paper's terms
    (what ``reports.published`` looks the published number up by; None for text-only cells).
    """

    number: int
    title: str
    labels: pd.DataFrame
    cells: pd.DataFrame
    values: pd.DataFrame
    bold: pd.DataFrame
    keys: pd.DataFrame
    headers: dict            # value column -> (group, name); group "" for none
    decimals: dict           # value column -> decimals printed
    signed_rows: set = field(default_factory=set)
    bold_labels: set = field(default_factory=set)  # rows whose labels print in bold too
    off_paper: list = field(default_factory=list)  # settings of the runs the paper did not use
    notes: list = field(default_factory=list)      # how the runs were selected
    left_out: list = field(default_factory=list)   # runs that are not in a cell's number
    n_runs: int = 0          # runs that matched the table at all


@dataclass(frozen=True)
class CellStats:
    mean: float = math.nan   # percent, over the finished runs
    std: float = math.nan    # sample std (ddof=1); NaN below two runs
    n: int = 0
    diverged: str = ""       # "nan", "overflow" or "nan/overflow" when no run finished


NO_RUNS = CellStats()


def normalize(trials: pd.DataFrame) -> pd.DataFrame:
    """The params the tables group by, typed and with the engine's defaults filled in."""
    defaults = OLD_RUN_DEFAULTS

    def text(key, default):
        column = trials.get(S.PARAM_PREFIX + key)
        if column is None:
            return pd.Series(default, index=trials.index, dtype=object)
        return column.where(column.notna(), default).astype(str)

    def number(key, default):
        column = trials.get(S.PARAM_PREFIX + key)
        if column is None:
            return pd.Series(default, index=trials.index, dtype=float)
        return pd.to_numeric(column, errors="coerce").fillna(default).round(4)

    detector = text(S.PARAM_DETECTOR, "")
    one_stage = detector == "retinanet"
    method = text(S.PARAM_METHOD, defaults[S.PARAM_METHOD])
    cls_weight = number(S.PARAM_CLS_WEIGHT, defaults[S.PARAM_CLS_WEIGHT]).where(method != "none", 1.0)
    reg_weight = number(S.PARAM_REG_WEIGHT, defaults[S.PARAM_REG_WEIGHT]).where(method != "none", 1.0)
    variant = number(S.PARAM_VARIANT, defaults[S.PARAM_VARIANT]).astype(int).astype(str)
    approach = method.copy()
    approach[(method == "none") | ((method == "fixed") & (cls_weight == 1) & (reg_weight == 1))] = "baseline"
    approach[method == "alwa"] = "alwa_" + variant[method == "alwa"]
    head = text(S.PARAM_HEAD, "")
    head = head.where(~head.isin(["", "auto"]), np.where(one_stage, "retina", "rpn"))
    loss_default = defaults["regression_loss"]
    reg_loss = text(S.param_loss_type("roi_reg"), loss_default).where(
        ~one_stage, text(S.param_loss_type("retina_reg"), loss_default))
    return pd.DataFrame({
        "run_id": trials["run_id"], "name": trials["name"], "state": trials["state"],
        "reason": trials["reason"], "detector": detector,
        "backbone": text(S.PARAM_BACKBONE, ""), "dataset": text(S.PARAM_DATASET_KIND, ""),
        "optimizer": text(S.PARAM_OPTIMIZER, defaults[S.PARAM_OPTIMIZER]), "method": method,
        "approach": approach, "head": head, "cls_weight": cls_weight, "reg_weight": reg_weight,
        "lambda0": number(S.PARAM_LAMBDA0, DEFAULT_LAMBDA0),
        "interval": number(S.PARAM_INTERVAL, DEFAULT_INTERVAL), "reg_loss": reg_loss,
        "schedule": _schedule(trials), "config": config_keys(trials, approach),
    }, index=trials.index)


def _schedule(trials: pd.DataFrame) -> pd.Series:
    """``12 epochs`` / ``40 iterations``: the training length, "" when not recorded."""
    def param(key):
        return trials.get(S.PARAM_PREFIX + key, pd.Series(None, index=trials.index, dtype=object))

    unit, epochs, iters = (param(S.PARAM_SCHEDULE_UNIT), param(S.PARAM_EPOCHS),
                           param(S.PARAM_MAX_ITERS))
    shown = []
    for u, e, i in zip(unit, epochs, iters):
        if u == "iter" and isinstance(i, str) and i not in ("None", ""):
            shown.append(f"{i} iterations")
        elif isinstance(e, str) and e not in ("None", ""):
            shown.append(f"{e} epochs")
        else:
            shown.append("")
    return pd.Series(shown, index=trials.index, dtype=object)


# The paper's setting of what a table does not show (PAPER.md §4), as normalize() spells it.
PAPER_SETTING = {"backbone": (S.PARAM_BACKBONE, ["resnet50", "resnet101"]),
                 "optimizer": (S.PARAM_OPTIMIZER, ["sgd", "adamw"]),
                 "schedule": ("schedule", ["12 epochs"]),
                 "lambda0": (f"{S.PARAM_LAMBDA0} (ALWA)", TABLE6_LAMBDA0),
                 "interval": (f"{S.PARAM_INTERVAL} (ALWA)", TABLE6_INTERVALS)}


def off_paper(runs: pd.DataFrame) -> list:
    """The settings of ``runs`` that none of the paper's experiments used (a demo's tiny
    backbone, a 40-iteration schedule): their numbers are not comparable to the paper's."""
    found = []
    alwa = runs["method"] == "alwa"
    for column, (param, paper) in PAPER_SETTING.items():
        values = runs.loc[alwa, column] if column in ("lambda0", "interval") else runs[column]
        other = sorted({f"{v:g}" if isinstance(v, float) else str(v)
                        for v in values if v != "" and v not in paper})
        if other:
            found.append(f"{param} = {', '.join(other)}")
    return found


def config_keys(trials: pd.DataFrame, approach: pd.Series | None = None) -> pd.Series:
    """Each run's config without its seed: ``{param: value}`` of every recorded param but
    ``train.seed`` (and those in ``schema.PARAMS_NOT_CONFIG``). A baseline's ``weighting.*``
    params are left out too: method none and fixed weights (1, 1) train the same model."""
    columns = [c for c in trials.columns if c.startswith(S.PARAM_PREFIX)
               and c[len(S.PARAM_PREFIX):] not in (S.PARAM_SEED, *S.PARAMS_NOT_CONFIG)]
    keys = []
    for row in trials.index:
        baseline = approach is not None and approach[row] == "baseline"
        config = {}
        for column in columns:
            value = trials.at[row, column]
            param = column[len(S.PARAM_PREFIX):]
            if isinstance(value, str) and not (baseline and param.startswith(S.PARAM_WEIGHTING_PREFIX)):
                config[param] = value
        keys.append(config)
    return pd.Series(keys, index=trials.index, dtype=object)


def mixed_configs(configs: list[dict]) -> dict:
    """``{param: sorted values}`` of the params recorded with different values by runs that
    would share a cell (a param missing from a run, an old run's, does not conflict)."""
    values: dict = {}
    for config in configs:
        for param, value in config.items():
            values.setdefault(param, set()).add(value)
    return {param: sorted(found) for param, found in sorted(values.items()) if len(found) > 1}


def build(number: int, trials: pd.DataFrame, metric: str | None = None) -> Table:
    """Table ``number`` (1–6) from the trial runs; ``metric`` overrides the paper's."""
    builders = {1: table1, 2: table2, 3: table3, 4: table4, 5: table5, 6: table6}
    return builders[number](trials, metric)


# ---------------------------------------------------------------- selection helpers

def _percent(trials: pd.DataFrame, metric: str | pd.Series) -> pd.Series:
    """The metric of each run in percent (NaN where the run has none)."""
    if isinstance(metric, str):
        metric = pd.Series(metric, index=trials.index)
    values = pd.Series(math.nan, index=trials.index)
    for name_, rows in metric.groupby(metric).groups.items():
        column = metric_column(name_)
        if column in trials:
            values[rows] = pd.to_numeric(trials.loc[rows, column], errors="coerce") * 100.0
    return values


def _pin(runs: pd.DataFrame, column: str, preferred, notes: list, param: str,
         scope: pd.Series | None = None) -> pd.DataFrame:
    """Keep only the runs at the paper's ``preferred`` value of ``column`` when there are any.

    ``scope`` limits the pin to some runs (λ0/C apply to ALWA runs only).
    """
    scope = pd.Series(True, index=runs.index) if scope is None else scope
    values = runs.loc[scope, column]
    if not (values == preferred).any():
        return runs
    others = sorted({f"{v:g}" if isinstance(v, float) else str(v) for v in values[values != preferred]})
    if others:
        shown = f"{preferred:g}" if isinstance(preferred, float) else preferred
        notes.append(f"Only runs with {param} = {shown} (also found: {', '.join(others)}).")
    return runs.drop(values.index[values != preferred])


def _pin_paper_setting(runs: pd.DataFrame, notes: list, *, dataset=True, optimizer=True,
                       backbone=True, reg_loss=True, alwa_defaults=True) -> pd.DataFrame:
    if dataset:
        runs = _pin(runs, "dataset", "voc", notes, S.PARAM_DATASET_KIND)
    if optimizer:
        runs = _pin(runs, "optimizer", "sgd", notes, S.PARAM_OPTIMIZER)
    if backbone:
        runs = _pin(runs, "backbone", "resnet50", notes, S.PARAM_BACKBONE)
    if reg_loss:
        runs = _pin(runs, "reg_loss", "l1", notes, "regression loss type")
    if alwa_defaults:
        is_alwa = runs["method"] == "alwa"
        runs = _pin(runs, "lambda0", DEFAULT_LAMBDA0, notes, f"{S.PARAM_LAMBDA0} (ALWA)", is_alwa)
        is_alwa = runs["method"] == "alwa"
        runs = _pin(runs, "interval", DEFAULT_INTERVAL, notes, f"{S.PARAM_INTERVAL} (ALWA)", is_alwa)
    return runs


def _collect(runs: pd.DataFrame, cell_keys: pd.Series, left_out: list,
             metric_name: str | pd.Series) -> dict:
    """CellStats per cell key; runs that count for a cell but not in its number go to left_out."""
    metric_name = (pd.Series(metric_name, index=runs.index)
                   if isinstance(metric_name, str) else metric_name)
    buckets: dict = {}
    for row, key in cell_keys.items():
        buckets.setdefault(key, []).append(row)
    stats = {}
    for key, rows in buckets.items():
        group = runs.loc[rows]
        finished = group["state"].eq(S.STATUS_OK) & np.isfinite(group["value"])
        values = group.loc[finished, "value"]
        conflicts = mixed_configs(list(group.loc[finished, "config"]))
        if conflicts:
            differing = "; ".join(f"{p} = {', '.join(v)}" for p, v in conflicts.items())
            names = ", ".join(f"{n} ({r[:8]})" for n, r in zip(group.loc[finished, "name"],
                                                              group.loc[finished, "run_id"]))
            raise ConfigError(
                "--experiment/--sweep", f"the cell {_key_text(key)} would average runs with different "
                f"configs, not seeds of one: {names} differ in {differing}.",
                "Report one sweep with --sweep <parent run id>, or put the runs of different "
                "configs in different experiments.")
        diverged = sorted(set(group["state"]) & set(DIVERGED))
        stats[key] = CellStats(
            mean=float(values.mean()) if len(values) else math.nan,
            std=float(values.std(ddof=1)) if len(values) > 1 else math.nan,
            n=len(values),
            diverged="/".join(diverged) if not len(values) else "",
        )
        for row, run in group[~finished].iterrows():
            if run["state"] in DIVERGED and not len(values):
                continue  # the cell prints the divergence itself
            if run["state"] in DIVERGED:
                why = f"{run['state']}, left out of the mean of the finished seeds"
            elif run["state"] == S.STATUS_OK:
                why = f"finished without a val/{metric_name[row]} metric"
            else:
                why = "still running" if run["state"] == S.STATUS_RUNNING else run["state"]
                why += f": {run['reason']}" if run["reason"] else ""
            left_out.append(f"{run['name']} ({run['run_id'][:8]}) at {_key_text(key)}: {why}")
    return stats


def _key_text(key) -> str:
    return "(" + ", ".join(f"{k:g}" if isinstance(k, float) else str(k) for k in key) + ")"


def _select(trials: pd.DataFrame, mask) -> pd.DataFrame:
    runs = normalize(trials)
    return runs[mask(runs)]


# ---------------------------------------------------------------- formatting helpers

def format_number(value: float, decimals: int, signed: bool = False) -> str:
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def _cell_text(stats: CellStats, decimals: int, value: float | None = None,
               signed: bool = False) -> str:
    """``74.34``, ``74.34 ± 0.12 (n=3)``, ``nan``/``overflow`` or ``–``.

    ``value`` replaces the mean (a delta) while the spread stays that of the seeds.
    """
    if stats.n == 0 and not stats.diverged:
        return MISSING
    if stats.n == 0:
        return stats.diverged
    shown = format_number(stats.mean if value is None else value, decimals, signed)
    if stats.n > 1:
        shown += f" ± {stats.std:.{decimals}f} (n={stats.n})"
    return shown


def _ordered(paper: list, found) -> list:
    """The paper's values in its order, then any other values found, sorted."""
    extra = sorted(set(found) - set(paper))  # one axis holds one type: str, float or tuple
    return list(paper) + extra


class _Grid:
    """Row-by-row assembly of a Table's frames."""

    def __init__(self, columns: list, headers: dict, decimals: dict):
        self.columns, self.headers, self.decimals = columns, headers, decimals
        self.labels, self.cells, self.values, self.keys = [], [], [], []
        self.signed_rows: set = set()

    def add(self, labels: dict, cells: dict, values: dict, keys: dict, signed=False) -> int:
        if signed:
            self.signed_rows.add(len(self.labels))
        self.labels.append(labels)
        self.cells.append({c: cells.get(c, "") for c in self.columns})
        self.values.append({c: values.get(c, math.nan) for c in self.columns})
        self.keys.append({c: keys.get(c) for c in self.columns})
        return len(self.labels) - 1

    def table(self, number, notes, left_out, runs: pd.DataFrame | None, bold_groups=()) -> Table:
        n_runs = 0 if runs is None else len(runs)
        values = pd.DataFrame(self.values, columns=self.columns, dtype=float)
        bold = pd.DataFrame(False, index=values.index, columns=self.columns)
        for rows, columns in bold_groups:
            block = values.loc[rows, columns].round(4)
            best = block.max(axis=None)
            if not math.isnan(best):
                bold.loc[rows, columns] = block.eq(best)
        return Table(
            number=number, title=TITLES[number], labels=pd.DataFrame(self.labels),
            cells=pd.DataFrame(self.cells, columns=self.columns), values=values, bold=bold,
            keys=pd.DataFrame(self.keys, columns=self.columns, dtype=object),
            headers=self.headers, decimals=self.decimals, signed_rows=self.signed_rows,
            notes=notes, left_out=list(dict.fromkeys(left_out)), n_runs=n_runs,
            off_paper=off_paper(runs) if runs is not None else [])


def _decimals(metric: str) -> int:
    return 2 if metric == "map" else 1


# ---------------------------------------------------------------- the tables

def _table1_metric(setting: str, metric: str | None) -> str:
    """The paper's metric of a Table 1 column (AP on COCO, mAP otherwise), unless overridden."""
    return metric or ("ap" if setting.startswith("coco_") else "map")


def _setting_name(setting: str) -> tuple:
    dataset, optimizer, loss = setting.split("_", 2)
    return f"{name(DATASETS, dataset)} {name(OPTIMIZERS, optimizer)}", name(LOSSES, loss)


def table1(trials: pd.DataFrame, metric: str | None = None) -> Table:
    notes, left_out = [], []
    runs = _select(trials, lambda r: (r["detector"] == "faster_rcnn") & (
        (r["method"] == "none") | ((r["method"] == "fixed") & (r["head"] == "rpn"))))
    runs = _pin(runs, "backbone", "resnet50", notes, S.PARAM_BACKBONE)
    settings = runs["dataset"] + "_" + runs["optimizer"] + "_" + runs["reg_loss"]
    metric_of = settings.map(lambda setting: _table1_metric(setting, metric))
    runs = runs.assign(value=_percent(trials.loc[runs.index], metric_of))
    pairs = list(zip(runs["cls_weight"], runs["reg_weight"]))
    stats = _collect(runs, pd.Series([(c, r, s) for (c, r), s in zip(pairs, settings)],
                                     index=runs.index, dtype=object), left_out, metric_of)

    columns = _ordered(TABLE1_SETTINGS, settings)
    decimals = {s: _decimals(_table1_metric(s, metric)) for s in columns}
    grid = _Grid(columns, {s: _setting_name(s) for s in columns}, decimals)
    absolute_shown = False
    for cls_weight, reg_weight in _ordered(TABLE1_WEIGHTS, pairs):
        is_base = (cls_weight, reg_weight) == (1.0, 1.0)
        cells, values, keys = {}, {}, {}
        for s in columns:
            keys[s] = (cls_weight, reg_weight, s)
            cell = stats.get(keys[s], NO_RUNS)
            base = stats.get((1.0, 1.0, s), NO_RUNS)
            if is_base or cell.n == 0:
                cells[s] = _cell_text(cell, decimals[s])
                values[s] = cell.mean if is_base else math.nan
            elif base.n == 0:
                cells[s] = "(" + _cell_text(cell, decimals[s]) + ")"
                absolute_shown = True
            else:
                values[s] = cell.mean - base.mean
                cells[s] = _cell_text(cell, decimals[s], values[s], signed=True)
        grid.add({"Loss weight (cls, reg)": f"({cls_weight:.2f},{reg_weight:.2f})"},
                 cells, values, keys, signed=not is_base)
    if absolute_shown:
        notes.append("Values in parentheses are absolute: their column has no finished "
                     "(1.00,1.00) run to take the delta against.")
    table = grid.table(1, notes, left_out, runs)
    # The paper marks rows, not cells: a weight pair in bold (label and cells) improves on
    # (1, 1) in every setting measured: no printed delta below 0 and at least one above.
    rounded = pd.DataFrame({s: table.values[s].round(decimals[s]) for s in columns})
    for row in sorted(table.signed_rows):
        measured = rounded.loc[row].dropna()
        if len(measured) and (measured >= 0).all() and (measured > 0).any():
            table.bold.loc[row, columns] = table.values.loc[row, columns].notna()
            table.bold_labels.add(row)
    if table.bold_labels:
        table.notes.append("Rows in bold improve on (1.00,1.00) in every setting measured.")
    return table


def _alwa_runs(trials: pd.DataFrame, detectors, notes, **pins) -> pd.DataFrame:
    runs = _select(trials, lambda r: r["detector"].isin(detectors) & r["approach"].isin(ALWA_METHODS))
    return _pin_paper_setting(runs, notes, **pins)


def table2(trials: pd.DataFrame, metric: str | None = None) -> Table:
    metric = metric or "map"
    notes, left_out = [], []
    runs = _alwa_runs(trials, ["retinanet", "faster_rcnn"], notes, backbone=False, reg_loss=False)
    runs = runs.assign(value=_percent(trials.loc[runs.index], metric))
    stats = _collect(runs, pd.Series(list(zip(runs["detector"], runs["backbone"], runs["approach"],
                                              runs["reg_loss"])), index=runs.index, dtype=object),
                     left_out, metric)
    columns = _ordered(PAPER_LOSSES, runs["reg_loss"])
    decimals = {c: _decimals(metric) for c in columns}
    grid = _Grid(columns, {c: ("", name(LOSSES, c)) for c in columns}, decimals)
    blocks = _ordered(TABLE2_BLOCKS, zip(runs["detector"], runs["backbone"]))
    bold_groups = []
    for detector, backbone in blocks:
        rows = []
        for approach in ALWA_METHODS:
            method_label = (name(DETECTORS, detector) if approach == "baseline"
                            else "+" + name(APPROACHES, approach))
            cells, values, keys = {}, {}, {}
            for loss in columns:
                keys[loss] = (detector, backbone, approach, loss)
                cell = stats.get(keys[loss], NO_RUNS)
                cells[loss], values[loss] = _cell_text(cell, decimals[loss]), cell.mean
            rows.append(grid.add({"Method": method_label, "Backbone": name(BACKBONES, backbone)},
                                 cells, values, keys))
        bold_groups += [(rows, [loss]) for loss in columns]
    return grid.table(2, notes, left_out, runs, bold_groups)


def table3(trials: pd.DataFrame, metric: str | None = None) -> Table:
    metric = metric or "map"
    notes, left_out = [], []
    runs = _alwa_runs(trials, TABLE3_DETECTORS, notes)
    runs = runs.assign(value=_percent(trials.loc[runs.index], metric))
    stats = _collect(runs, pd.Series(list(zip(runs["detector"], runs["approach"])),
                                     index=runs.index, dtype=object), left_out, metric)
    decimals = {a: _decimals(metric) for a in ALWA_METHODS}
    headers = {"baseline": ("", "Initial"), "alwa_1": ("", "+ALWA_1"), "alwa_2": ("", "+ALWA_2")}
    grid = _Grid(ALWA_METHODS, headers, decimals)
    for detector in _ordered(TABLE3_DETECTORS, runs["detector"]):
        base = stats.get((detector, "baseline"), NO_RUNS)
        cells, values, keys = {}, {}, {}
        for approach in ALWA_METHODS:
            keys[approach] = (detector, approach)
            cell = stats.get(keys[approach], NO_RUNS)
            values[approach] = cell.mean
            cells[approach] = _with_delta(cell, base, decimals[approach], approach != "baseline")
        grid.add({"Method": name(DETECTORS, detector)}, cells, values, keys)
    return grid.table(3, notes, left_out, runs)


def _with_delta(cell: CellStats, base: CellStats, decimals: int, show: bool) -> str:
    """The cell, followed by ``(+Δ)`` against the baseline when both have a number."""
    text = _cell_text(cell, decimals)
    if show and cell.n and base.n:
        text += f" ({format_number(cell.mean - base.mean, decimals, signed=True)})"
    return text


def table4(trials: pd.DataFrame, metric: str | None = None) -> Table:
    metric = metric or "map"
    notes, left_out = [], []
    runs = _select(trials, lambda r: r["detector"].isin(TABLE4_DETECTORS) & (r["approach"] != "fixed")
                   & (r["approach"] != "alwa_2"))
    runs = _pin_paper_setting(runs, notes)
    runs = runs.assign(value=_percent(trials.loc[runs.index], metric))
    stats = _collect(runs, pd.Series(list(zip(runs["approach"], runs["detector"])),
                                     index=runs.index, dtype=object), left_out, metric)
    columns = _ordered(TABLE4_DETECTORS, runs["detector"])
    decimals = {d: _decimals(metric) for d in columns}
    grid = _Grid(columns, {d: ("", name(DETECTORS, d)) for d in columns}, decimals)
    for approach in _ordered(TABLE4_APPROACHES, runs["approach"]):
        cells, values, keys = {}, {}, {}
        for detector in columns:
            keys[detector] = (approach, detector)
            cell = stats.get(keys[detector], NO_RUNS)
            values[detector] = cell.mean
            cells[detector] = _with_delta(cell, stats.get(("baseline", detector), NO_RUNS),
                                          decimals[detector], approach == "alwa_1")
        grid.add({"Approach": name(APPROACHES, approach)}, cells, values, keys)
    rows = list(range(len(grid.labels)))
    return grid.table(4, notes, left_out, runs, [(rows, [d]) for d in columns])


def table5(trials: pd.DataFrame, metric: str | None = None) -> Table:
    metric = metric or "ap"
    notes, left_out = [], []
    runs = _select(trials, lambda r: (r["dataset"] == "coco")
                   & r["detector"].isin(["faster_rcnn", "mask_rcnn"]) & r["approach"].isin(ALWA_METHODS))
    runs = _pin_paper_setting(runs, notes, dataset=False, backbone=False, reg_loss=False)
    runs = runs.assign(value=_percent(trials.loc[runs.index], metric))
    stats = _collect(runs, pd.Series(list(zip(runs["detector"], runs["reg_loss"], runs["backbone"],
                                              runs["approach"])), index=runs.index, dtype=object),
                     left_out, metric)
    decimals = {a: _decimals(metric) for a in ALWA_METHODS}
    headers = {"baseline": ("", "Initial"), "alwa_1": ("", "+ALWA_1"), "alwa_2": ("", "+ALWA_2")}
    grid = _Grid(ALWA_METHODS, headers, decimals)
    bold_groups = []
    found = zip(runs["detector"], runs["reg_loss"], runs["backbone"])
    for detector, loss, backbone in _ordered(TABLE5_ROWS, found):
        cells, values, keys = {}, {}, {}
        for approach in ALWA_METHODS:
            keys[approach] = (detector, loss, backbone, approach)
            cell = stats.get(keys[approach], NO_RUNS)
            cells[approach], values[approach] = _cell_text(cell, decimals[approach]), cell.mean
        row = grid.add({"Setting": f"{name(DETECTORS, detector)} + {name(LOSSES, loss)}",
                        "Backbone": name(BACKBONES, backbone)}, cells, values, keys)
        bold_groups.append(([row], ALWA_METHODS))
    return grid.table(5, notes, left_out, runs, bold_groups)


def table6(trials: pd.DataFrame, metric: str | None = None) -> Table:
    metric = metric or "map"
    notes, left_out = [], []
    runs = _select(trials, lambda r: (r["detector"] == "faster_rcnn") & (r["approach"] == "alwa_2"))
    runs = _pin_paper_setting(runs, notes, reg_loss=False, alwa_defaults=False)
    runs = runs.assign(value=_percent(trials.loc[runs.index], metric))
    at_default_c = runs[runs["interval"] == DEFAULT_INTERVAL]
    at_default_lambda0 = runs[runs["lambda0"] == DEFAULT_LAMBDA0]
    lambda0_stats = _collect(at_default_c, pd.Series(
        list(zip(["lambda0"] * len(at_default_c), at_default_c["lambda0"], at_default_c["reg_loss"])),
        index=at_default_c.index, dtype=object), left_out, metric)
    interval_stats = _collect(at_default_lambda0, pd.Series(
        list(zip(["C"] * len(at_default_lambda0), at_default_lambda0["interval"],
                 at_default_lambda0["reg_loss"])), index=at_default_lambda0.index, dtype=object),
        left_out, metric)
    elsewhere = runs.index.difference(at_default_c.index.union(at_default_lambda0.index))
    for _, run in runs.loc[elsewhere].iterrows():
        left_out.append(f"{run['name']} ({run['run_id'][:8]}): λ0 = {run['lambda0']:g} with "
                        f"C = {run['interval']:g} is in neither ablation (one of them must be "
                        f"at its default, λ0 = 1 or C = 100)")

    losses = _ordered(PAPER_LOSSES, runs["reg_loss"])
    lambda0_rows = _ordered(TABLE6_LAMBDA0, at_default_c["lambda0"])
    interval_rows = _ordered(TABLE6_INTERVALS, at_default_lambda0["interval"])
    decimals = {f"{block}:{loss}": _decimals(metric) for block in ("lambda0", "C") for loss in losses}
    columns = [f"lambda0:{loss}" for loss in losses] + ["C"] + [f"C:{loss}" for loss in losses]
    headers = {f"{block}:{loss}": ("λ0" if block == "lambda0" else "C", name(LOSSES, loss))
               for block in ("lambda0", "C") for loss in losses}
    headers["C"] = ("", "C")
    grid = _Grid(columns, headers, decimals)
    for i in range(max(len(lambda0_rows), len(interval_rows))):
        cells, values, keys = {}, {}, {}
        for block, rows, stats in (("lambda0", lambda0_rows, lambda0_stats),
                                   ("C", interval_rows, interval_stats)):
            if i >= len(rows):
                continue  # the shorter block ends early: blank, not missing
            for loss in losses:
                column = f"{block}:{loss}"
                keys[column] = (block, rows[i], loss)
                cell = stats.get(keys[column], NO_RUNS)
                cells[column], values[column] = _cell_text(cell, decimals[column]), cell.mean
        if i < len(interval_rows):
            cells["C"] = f"{interval_rows[i]:g}"
        grid.add({"λ0": f"{lambda0_rows[i]:.2f}" if i < len(lambda0_rows) else ""},
                 cells, values, keys)
    lambda0_positions = list(range(len(lambda0_rows)))
    interval_positions = list(range(len(interval_rows)))
    bold_groups = ([(lambda0_positions, [f"lambda0:{loss}"]) for loss in losses]
                   + [(interval_positions, [f"C:{loss}"]) for loss in losses])
    return grid.table(6, notes, left_out, runs, bold_groups)


def compact(table: Table) -> Table:
    """The table without the rows and value columns that hold no measured cell (only
    ``–``): the paper's full layout is for paper-scale sweeps; a small sweep (the demo)
    reads better without its empty cells."""
    measured = (table.cells != MISSING) & (table.cells != "") & table.keys.notna()
    text_only = [c for c in table.cells.columns if table.keys[c].isna().all()]  # Table 6's C labels
    rows = [i for i in table.cells.index if measured.loc[i].any()]
    columns = [c for c in table.cells.columns if measured.loc[rows, c].any() or c in text_only]
    if not columns or not rows:
        return table
    renumber = {old: new for new, old in enumerate(rows)}

    def keep(frame: pd.DataFrame, value_columns: bool = True) -> pd.DataFrame:
        frame = frame.loc[rows, columns] if value_columns else frame.loc[rows]
        return frame.reset_index(drop=True)

    labels = keep(table.labels, value_columns=False)
    if table.number == 6 and not any(str(c).startswith("lambda0:") for c in columns):
        labels["λ0"] = ""  # the λ0 block is gone: its labels would sit beside the C block's rows
    return dataclasses.replace(
        table, labels=labels, cells=keep(table.cells),
        values=keep(table.values), bold=keep(table.bold), keys=keep(table.keys),
        headers={c: table.headers[c] for c in columns},
        decimals={c: table.decimals[c] for c in columns if c in table.decimals},
        signed_rows={renumber[i] for i in table.signed_rows if i in renumber},
        bold_labels={renumber[i] for i in table.bold_labels if i in renumber})
