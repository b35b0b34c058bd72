"""The MLflow vocabulary of alwa-sweep: every tag, status, param and metric name.

The writer (``alwa_sweep/tracking.py``, ``alwa_sweep/trial.py``, ``alwa_sweep/tune.py``)
and every reader (``reports/runs.py``, ``tables.py``, ``figures.py``) import their names
from here; nothing else spells them. ``docs/tracking_schema.md`` explains them and
``tests/reports/test_schema_contract.py`` writes a real run through the real logger and
reads it back into a table.

This module imports nothing heavy: the trainers, the CLI and the reports all use it.
"""

from __future__ import annotations

# ---- tags -------------------------------------------------------------------------------
TAG_KIND = "alwa.kind"  # one of KINDS
TAG_STATUS = "alwa.status"  # one of STATUSES
TAG_REASON = "alwa.status_reason"  # why a run is not ok (one line)
TAG_TRIAL_KEY = "alwa.trial_key"  # deterministic key of a trial's overrides
TAG_SWEEP = "alwa.sweep_name"
TAG_SUMMARY = "alwa.summary"  # on a sweep's run: "ok=5 nan=1"
TAG_CHECKPOINT = "alwa.checkpoint"  # the last checkpoint file (a sweep trial: its folder in the storage)
TAG_SEARCH = "alwa.search"  # on a search trial: the sampled fields, comma-joined (weighting.cls,weighting.reg)
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own nesting tag
TAG_NOTE = "mlflow.note.content"  # MLflow's run description

KIND_SWEEP, KIND_TRIAL, KIND_TRAIN = "sweep", "trial", "train"
KINDS = (KIND_SWEEP, KIND_TRIAL, KIND_TRAIN)
TRIAL_KINDS = (KIND_TRIAL, KIND_TRAIN)  # runs that train (a lone `train` run has no parent)

# ---- statuses ---------------------------------------------------------------------------
STATUS_PENDING = "pending"  # a trial's run exists, training has not started
STATUS_RUNNING = "running"
STATUS_OK = "ok"
STATUS_NAN = "nan"  # a non-finite loss
STATUS_OVERFLOW = "overflow"  # a weighting method produced a non-finite weight (DWA)
STATUS_STOPPED = "stopped"  # stopped early by a scheduler (ASHA) or by the user
STATUS_ERROR = "error"  # anything else
STATUS_INTERRUPTED = "interrupted"  # SIGTERM / Ctrl-C: resumable, not an outcome
FINAL_STATUSES = (STATUS_OK, STATUS_NAN, STATUS_OVERFLOW, STATUS_STOPPED, STATUS_ERROR)
# Outcomes that training the same config again would only repeat (a sweep skips them).
DONE_STATUSES = (STATUS_OK, STATUS_NAN, STATUS_OVERFLOW, STATUS_STOPPED)
# Outcomes a sweep may expect (Table 4's nan/overflow cells): they do not fail it.
EXPECTED_STATUSES = DONE_STATUSES

# A sweep's parent run: alwa.status is one of these.
SWEEP_FINISHED = "finished"  # every trial reached an outcome
SWEEP_INCOMPLETE = "incomplete"  # some trials have none yet (resume it)

# ---- params: the flattened resolved training config, dotted (``trainers.config``) -------
PARAM_DETECTOR = "model.detector"
PARAM_BACKBONE = "model.backbone"
PARAM_DATASET_KIND = "dataset.kind"
PARAM_METHOD = "weighting.method"
PARAM_HEAD = "weighting.head"
PARAM_SEED = "train.seed"
PARAM_OPTIMIZER = "optimizer.type"


def param_loss_type(head: str) -> str:
    """The regression-loss param of one head: ``model.losses.roi_reg.type``."""
    return f"model.losses.{head}.type"


def param_weighting(name: str) -> str:
    """A weighting hyper-parameter: ``weighting.interval``, ``weighting.cls``…"""
    return f"weighting.{name}"


# ---- metrics ----------------------------------------------------------------------------
# Per training step (step = global iteration, from 1).
METRIC_LOSS = "train/loss"
METRIC_LR = "lr"
METRIC_ALPHA = "weight/alpha"
WINDOW_STATS = ("cls_mean", "cls_std", "reg_mean", "reg_std")


def metric_train(loss_key: str) -> str:
    """A raw head loss: ``train/rpn_cls``."""
    return f"train/{loss_key}"


def metric_weighted(head: str, part: str) -> str:
    """The weighted loss of the weighted head: ``train/rpn_cls_weighted``."""
    return f"train/{head}_{part}_weighted"


def metric_weight(name: str) -> str:
    """A multiplier applied by the weighting method: ``weight/cls``, ``weight/alpha``."""
    return f"weight/{name}"


def metric_window(stat: str) -> str:
    """ALWA's window statistic at an update: ``window/cls_mean``."""
    return f"window/{stat}"


# Per evaluation (step = epoch, from 1). VOC: map and ap/<class>; COCO: ap, ap50, …
VAL_PREFIX = "val/"
METRIC_MAP = "val/map"
METRIC_AP = "val/ap"
MAIN_METRICS = (METRIC_MAP, METRIC_AP)  # the headline number, VOC then COCO


def metric_val(name: str) -> str:
    """An evaluation metric: ``map`` → ``val/map``; ``ap/cat`` → ``val/ap/cat``."""
    return f"{VAL_PREFIX}{name}"


def main_metric(metrics: dict) -> float | None:
    """The headline number of a run's metrics (VOC mAP, else COCO AP), or None."""
    for name in MAIN_METRICS:
        if name in metrics:
            return metrics[name]
    return None


# ---- artifacts --------------------------------------------------------------------------
ARTIFACT_CONFIG = "config.yaml"  # a trial's resolved config
ARTIFACT_SPEC = "spec.yaml"  # a sweep's spec as run
ARTIFACT_DETECTIONS = "detections.npz"  # a trial's final test-set detections (detections_io)

# ---- grouping trials into cells (reports.tables) ------------------------------------------
PARAM_PREFIX = "params."  # the DataFrame column prefixes of reports.runs.load_trials
METRIC_PREFIX = "metrics."
TAG_PREFIX = "tags."
PARAM_WEIGHTING_PREFIX = "weighting."
PARAM_SCHEDULE_UNIT = "schedule.unit"
PARAM_EPOCHS = "schedule.epochs"
PARAM_MAX_ITERS = "schedule.max_iters"
PARAM_LAMBDA0 = "weighting.lambda0"
PARAM_INTERVAL = "weighting.interval"
PARAM_VARIANT = "weighting.variant"
PARAM_CLS_WEIGHT = "weighting.cls"
PARAM_REG_WEIGHT = "weighting.reg"
# Params that do not change what a trial computes: seeds of one config are averaged over
# trials that differ only in PARAM_SEED and these.
PARAMS_NOT_CONFIG = ("train.device", "dataset.num_workers", "train.log_every", "train.log_interval",
                     "train.checkpoint_every_iters", "train.eval_batch_size", "train.system_metrics",
                     "train.log_model")

# ---- the MLflow UI (alwa-sweep ui) ------------------------------------------------------
# MLflow 3's UI opens an experiment on its GenAI pages unless the experiment says it holds
# training runs: set these tags when creating an experiment (reports.ui_links).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"


# ---- interval points (``train.log_interval``) -------------------------------------------
# A training point at step s (s = the last iteration of its interval, or the iteration of
# a checkpoint/evaluation/end that closed it early) holds, over the interval's iterations:
# the mean of every ``train/…`` loss; ``train/loss/min`` and ``train/loss/max`` (the total
# loss's extremes, for spikes). ``weight/…`` is written at the first iteration and at each
# iteration it changed (an ALWA update: a step function), ``window/…`` only on updates, and
# ``lr`` at the first iteration of an interval where it changed and at the interval's end
# when it differs from the last value written.
EXTREME_METRICS = (METRIC_LOSS,)  # the losses that also get /min and /max


def metric_min(name: str) -> str:
    """The smallest per-iteration value of ``name`` in an interval: ``train/loss/min``."""
    return f"{name}/min"


def metric_max(name: str) -> str:
    """The largest per-iteration value of ``name`` in an interval: ``train/loss/max``."""
    return f"{name}/max"


# ---- the run's summary: written once when training ends (step = the last iteration) ----
# Tables read these (``metrics.final/...`` columns of ``reports.runs.load_trials``), never
# histories. ``final/val/<name>`` = the last evaluation's metrics; ``final/weight/<name>``
# = each weight's last value (``final/weight/alpha``: ALWA's final α);
# ``final/train/<loss>`` = the loss means over the last interval.
FINAL_PREFIX = "final/"
METRIC_FINAL_ITERATIONS = "final/iterations"  # the last iteration trained (resumes included)
METRIC_FINAL_SECONDS = "final/seconds"  # training wall time, summed over resumed segments
METRIC_FINAL_ALPHA = "final/weight/alpha"
METRIC_FINAL_LOSS = "final/train/loss"
METRIC_FINAL_MAP = "final/val/map"  # VOC
METRIC_FINAL_AP = "final/val/ap"  # COCO
FINAL_MAIN_METRICS = (METRIC_FINAL_MAP, METRIC_FINAL_AP)


def metric_final(name: str) -> str:
    """A summary metric: ``val/map`` → ``final/val/map``; ``weight/alpha`` → ``final/weight/alpha``."""
    return f"{FINAL_PREFIX}{name}"


# ---- provenance: tags on every trial run (``alwa_sweep/provenance.py``) ----------------
TAG_CODE_VERSION = "alwa.code.version"  # "<commit>[-dirty]" of the checkout, else "package <version>"
TAG_GIT_COMMIT = "alwa.code.git_commit"
TAG_GIT_DIRTY = "alwa.code.git_dirty"  # "true" / "false"
TAG_PACKAGE_VERSION = "alwa.code.package_version"
ENV_TAG_PREFIX = "alwa.env."  # alwa.env.torch, .torchvision, .cuda, .cudnn, .gpu, .gpu_count, .hostname, .ray, ...
TAG_SOURCE_NAME = "mlflow.source.name"  # MLflow's own source and user tags
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_SOURCE_GIT_COMMIT = "mlflow.source.git.commit"
TAG_USER = "mlflow.user"
INPUT_CONTEXT_TRAIN, INPUT_CONTEXT_TEST = "train", "test"  # mlflow.data.context of a run's dataset inputs


def env_tag(name: str) -> str:
    return f"{ENV_TAG_PREFIX}{name}"


ARTIFACT_LOG_DIR = "logs"  # train.log (a resumed segment: train_from_<iteration>.log)
ARTIFACT_MODEL_DIR = "model"  # the final checkpoint, for trials that opt in
SYSTEM_METRIC_PREFIX = "system/"  # MLflow's system metrics (opt-in)
