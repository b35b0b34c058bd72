"""Each trial's stdout/stderr kept with the sweep: in its storage and in its MLflow run.

Tune writes a trial's output to ``stdout.log``/``stderr.log`` in the trial's folder
(``RunConfig(log_to_file=…)``) on the node that runs it and, with
``SyncConfig(sync_artifacts=True)``, uploads that folder to the storage at every
checkpoint and at the end — so the output of a trial whose node died is kept up to its
last checkpoint. After ``Tuner.fit()`` the driver copies each file into the trial's
MLflow run as ``logs/stdout.log`` / ``logs/stderr.log`` (:func:`upload_trial_logs`);
a resumed sweep replaces them with the longer files.
"""

from __future__ import annotations

import posixpath
import tempfile
from pathlib import Path

from reports.schema import TAG_PARENT, TAG_TRIAL_KEY

LOG_FILES = ("stdout.log", "stderr.log")
ARTIFACT_DIR = "logs"
MAX_BYTES = 50 * 2**20  # the tail of a longer file is kept


def upload_trial_logs(tune_location, state: dict) -> dict:
    """Copy every trial's log files from ``tune_location`` (a :class:`Storage` of the Tune
    experiment) into its MLflow run. Returns trial key → uploaded file names."""
    import pyarrow.fs as pafs
    from mlflow.tracking import MlflowClient

    fs = tune_location.filesystem
    root = tune_location.path
    if fs is None:
        fs, root = (pafs.FileSystem.from_uri(root) if tune_location.is_remote else (pafs.LocalFileSystem(), root))
    client = MlflowClient(state["tracking_uri"])
    runs = client.search_runs([state["experiment_id"]], filter_string=f"tags.`{TAG_PARENT}` = '{state['parent_run_id']}'",
                              max_results=10000)
    by_key = {r.data.tags.get(TAG_TRIAL_KEY): r.info.run_id for r in runs}
    uploaded: dict = {}
    for key, run_id in by_key.items():
        if not key:
            continue
        with tempfile.TemporaryDirectory(prefix="alwa_logs_") as tmp:
            names = []
            for name in LOG_FILES:
                source = posixpath.join(root, key, name)
                info = fs.get_file_info(source)
                if info.type != pafs.FileType.File:
                    continue
                with fs.open_input_file(source) as stream:
                    if info.size > MAX_BYTES:
                        stream.seek(info.size - MAX_BYTES)
                    Path(tmp, name).write_bytes(stream.read())
                names.append(name)
            for name in names:
                client.log_artifact(run_id, str(Path(tmp, name)), ARTIFACT_DIR)
            if names:
                uploaded[key] = names
    return uploaded
