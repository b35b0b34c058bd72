"""What a trial run needs to be reproduced: code version, environment, dataset inputs,
the training log and (opt-in) system metrics. ``MlflowHook.start`` calls these.

Tag names live in ``reports/schema.py``. Everything here is cheap (< 0.1 s on a VOC
tree: the split files and annotation JSON files are hashed, not the images) and never
fails a run: a value that cannot be found is recorded as ``unknown``.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from mlflow.entities import DatasetInput, InputTag, RunTag

from reports.schema import (ARTIFACT_LOG_DIR, INPUT_CONTEXT_TEST, INPUT_CONTEXT_TRAIN, TAG_CODE_VERSION,
                            TAG_GIT_COMMIT, TAG_GIT_DIRTY, TAG_PACKAGE_VERSION, TAG_SOURCE_GIT_COMMIT,
                            TAG_SOURCE_NAME, TAG_SOURCE_TYPE, TAG_USER, env_tag)

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the checkout (or site-packages) holding alwa_sweep
LOGGERS = ("trainers", "alwa_sweep")  # whose records go to train.log
UNKNOWN = "unknown"
_LOG = logging.getLogger(__name__)


# ---- code version ----------------------------------------------------------------------

def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("alwa-sweep")
    except PackageNotFoundError:
        return UNKNOWN


@lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """The git commit and dirty flag of the checkout the code runs from (an editable
    install or a source tree), else the installed package's version."""
    commit = _git("rev-parse", "HEAD")
    version = package_version()
    if not commit:
        return {TAG_CODE_VERSION: f"package {version}", TAG_PACKAGE_VERSION: version}
    # Tracked files only: a run's own outputs (ignored or untracked) do not make it dirty.
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {TAG_CODE_VERSION: commit + ("-dirty" if dirty else ""), TAG_GIT_COMMIT: commit,
            TAG_GIT_DIRTY: "true" if dirty else "false", TAG_PACKAGE_VERSION: version}


def source_tags() -> dict[str, str]:
    """MLflow's own source and user tags, as ``mlflow.start_run`` sets them, with the
    git commit of this package's checkout (not of whatever script started the process:
    inside Ray that is Ray's worker)."""
    from mlflow.tracking.context.registry import resolve_tags
    try:
        tags = {k: v for k, v in resolve_tags().items()
                if k in (TAG_SOURCE_NAME, TAG_SOURCE_TYPE, TAG_USER, TAG_SOURCE_GIT_COMMIT)}
    except Exception:  # a context provider that fails must not fail the run
        tags = {}
    name = tags.get(TAG_SOURCE_NAME) or sys.argv[0] or "-"
    if "ray" in Path(name).parts or name in ("-", "-c", ""):
        name = "alwa_sweep"  # a Ray worker or an interactive session: name the package
    tags[TAG_SOURCE_NAME] = name
    tags.setdefault(TAG_SOURCE_TYPE, "LOCAL")
    if not tags.get(TAG_USER):
        try:
            tags[TAG_USER] = getpass.getuser()
        except Exception:
            tags[TAG_USER] = UNKNOWN
    commit = code_version().get(TAG_GIT_COMMIT)
    if commit:
        tags[TAG_SOURCE_GIT_COMMIT] = commit
    return tags


# ---- environment -----------------------------------------------------------------------

def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:
        return UNKNOWN


@lru_cache(maxsize=1)
def environment() -> dict[str, str]:
    """Versions of the stack and the machine: torch, torchvision, CUDA, cuDNN, GPU model
    and count, hostname, Ray, MLflow, Python."""
    import torch
    cuda = torch.version.cuda or "none"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = sorted({torch.cuda.get_device_name(i) for i in range(count)}) if count else []
    values = {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": _version("torchvision"),
        "cuda": cuda, "cudnn": str(cudnn) if cudnn else "none", "gpu": ", ".join(gpus) or "none",
        "gpu_count": str(count), "hostname": socket.gethostname(), "ray": _version("ray"),
        "mlflow": _version("mlflow"), "platform": platform.platform(),
    }
    return {env_tag(name): value for name, value in values.items()}


# ---- datasets --------------------------------------------------------------------------

def file_digest(paths) -> str:
    """SHA-256 (first 16 hex digits) over the files' names and bytes, in order."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def dataset_files(dataset) -> dict[str, list[Path]]:
    """The files that define each split's annotation list: VOC's ImageSets/Main split
    files, COCO's annotation JSON. Keyed by the input's context (train, test)."""
    if dataset.kind == "coco":
        return {INPUT_CONTEXT_TRAIN: [Path(dataset.train_ann)] if dataset.train_ann else [],
                INPUT_CONTEXT_TEST: [Path(dataset.val_ann)] if dataset.val_ann else []}
    root = Path(dataset.root or ".")

    def split_files(sets):
        files = []
        for entry in sets:
            year, _, split = str(entry).partition("/")
            files.append(root / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt")
        return files
    return {INPUT_CONTEXT_TRAIN: split_files(dataset.train_sets),
            INPUT_CONTEXT_TEST: split_files(dataset.test_sets)}


def dataset_inputs(dataset) -> list[DatasetInput]:
    """The run's datasets as MLflow inputs (``mlflow.data`` MetaDatasets): name, source
    folder/file, digest of the annotation lists; a missing file is skipped."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    inputs = []
    for context, files in dataset_files(dataset).items():
        files = [f for f in files if f.is_file()]
        if not files:
            continue
        if dataset.kind == "coco":
            name, source = f"coco/{files[0].stem}", files[0]
        else:
            sets = dataset.train_sets if context == INPUT_CONTEXT_TRAIN else dataset.test_sets
            name, source = "voc/" + "+".join(sets), Path(dataset.root)
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path
            warnings.simplefilter("ignore")
            resolved_source = resolve_dataset_source(str(source.resolve()))
        meta = MetaDataset(resolved_source, name=name, digest=file_digest(files))
        inputs.append(DatasetInput(meta._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    return inputs


def provenance_tags() -> dict[str, str]:
    return {**source_tags(), **code_version(), **environment()}


def log_provenance(client, run_id: str, config) -> None:
    """Tags (code version, source, user, environment) and dataset inputs on one run."""
    try:
        tags = provenance_tags()
        client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
        inputs = dataset_inputs(config.dataset)
        if inputs:
            existing = {(d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs}
            fresh = [d for d in inputs if (d.dataset.name, d.dataset.digest) not in existing]
            if fresh:
                client.log_inputs(run_id, datasets=fresh)
    except Exception as exc:  # provenance must never fail a training run
        _LOG.warning("could not record the run's provenance: %s", exc)


# ---- the training log ------------------------------------------------------------------

class TrainLog:
    """A file handler on the ``trainers`` and ``alwa_sweep`` loggers for one training
    segment; ``close_and_upload`` puts it under ``logs/`` of the run (``train.log``, a
    resumed segment ``train_from_<iteration>.log``)."""

    FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

    def __init__(self, path: Path, artifact_name: str):
        self.path = path
        self.artifact_name = artifact_name
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter(self.FORMAT))
        self.handler.setLevel(logging.INFO)
        self._levels = {}
        for name in LOGGERS:
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
            logger.addHandler(self.handler)
        logging.getLogger("alwa_sweep.train").info(
            "host %s, pid %d, python %s, %s", socket.gethostname(), os.getpid(), platform.python_version(),
            time.strftime("%Y-%m-%d %H:%M:%S %Z"))

    @classmethod
    def open(cls, start_iteration: int = 0) -> "TrainLog":
        folder = Path(tempfile.mkdtemp(prefix="alwa-log-"))
        name = "train.log" if start_iteration == 0 else f"train_from_{start_iteration}.log"
        return cls(folder / name, name)

    def close(self) -> None:
        for name in LOGGERS:
            logger = logging.getLogger(name)
            logger.removeHandler(self.handler)
            logger.setLevel(self._levels.get(name, logging.NOTSET))
        self.handler.close()

    def close_and_upload(self, client, run_id: str) -> None:
        self.close()
        try:
            client.log_artifact(run_id, str(self.path), ARTIFACT_LOG_DIR)
        finally:
            self.path.unlink(missing_ok=True)
            try:
                self.path.parent.rmdir()
            except OSError:
                pass


# ---- system metrics (opt-in) -----------------------------------------------------------

def start_system_metrics(client, run_id: str, *, resume: bool = False, sampling_interval: float = 10.0):
    """MLflow's system-metrics monitor (CPU, memory, disk, network, GPU) on one run, as
    ``system/…`` metrics; needs ``psutil`` (and ``pynvml`` for GPUs). Returns the monitor
    (call ``finish()``), or None when it cannot run here."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval, resume_logging=resume,
                                       tracking_uri=client.tracking_uri)
        monitor.start()
        return monitor
    except Exception as exc:  # psutil missing, …
        _LOG.warning("system metrics are off: %s", exc)
        return None
