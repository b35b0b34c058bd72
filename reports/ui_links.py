"""What MLflow 3's UI needs to open a sweep's training runs, and the links to them.

Found in MLflow 3.17's own UI bundle (``mlflow/server/js/build/static/js``):

* GenAI or model-training pages: 3.17 decides by the URL parameter
  ``workflowType=machine_learning`` (else the browser's localStorage
  ``mlflow.workflowType``, default ``genai``: an experiment then opens on the GenAI
  overview), so every link carries it. UIs that read the experiment tag
  ``mlflow.experimentKind`` instead (the same bundle, behind a feature flag) open the
  training-runs table for ``custom_model_development``. ``experiment_tags()``
  gives the tags to set when creating an experiment (the lead calls it in
  ``alwa_sweep.tracking.get_or_create_experiment``); ``alwa-sweep ui`` also sets them
  on existing experiments that hold alwa-sweep runs and no kind yet.
* The runs page honours URL parameters ``searchFilter``, ``orderByKey``, ``orderByAsc``,
  ``startTime``, ``lifecycleFilter``, ``modelVersionFilter``, ``datasetsFilter`` and
  ``viewStateShareKey``. Columns (``selectedColumns``) are UI state: only a *shared
  view* sets them — the experiment tag ``mlflow.sharedViewState.<key>`` holding JSON of
  the search facets and UI state, opened by ``?viewStateShareKey=<key>`` (the UI ignores
  the shared view when the URL also carries a search parameter). A shared view cannot
  expand a parent run (MLflow drops ``runsExpanded`` from it), and the table stops
  nesting children under their parent once sorted by a metric; so a sweep's link shows
  that sweep's trials (``tags.mlflow.parentRunId = <sweep>``), flat, sorted by mAP,
  with the status, mAP and α columns.
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote

from reports import schema as S

SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
COLUMNS = ("tags", "metrics", "params")


def experiment_tags() -> dict:
    """Tags for a new experiment of training runs (MLflow opens it on its runs table)."""
    return {S.TAG_EXPERIMENT_KIND: S.EXPERIMENT_KIND_TRAINING}


def column(kind: str, name: str) -> str:
    """The runs table's column id: ``metrics.`val/map```."""
    return f"{kind}.`{name}`"


def sweep_view(sweep_run_id: str, metric: str = S.METRIC_MAP) -> dict:
    """The shared view of one sweep: its trials, sorted by ``metric`` (best first)."""
    return {
        "searchFilter": f"tags.`{S.TAG_PARENT}` = '{sweep_run_id}'",
        "orderByKey": column("metrics", metric),
        "orderByAsc": False,
        # Few columns: the grid renders only the columns on screen, and tags come last.
        "selectedColumns": [column("metrics", metric), column("metrics", S.METRIC_ALPHA),
                            column("params", S.PARAM_METHOD), column("tags", S.TAG_STATUS)],
    }


def share_key(sweep_run_id: str) -> str:
    return "alwa-sweep-" + re.sub(r"[^A-Za-z0-9]", "", sweep_run_id)


# MLflow 3.17 picks GenAI or model-training pages by a global switch, the URL parameter
# ``workflowType`` (else localStorage ``mlflow.workflowType``, default ``genai``), before
# any experiment tag: the links carry it.
WORKFLOW = "workflowType=machine_learning"


def experiment_path(experiment_id: str) -> str:
    """The URL fragment of an experiment's training runs."""
    return f"/#/experiments/{experiment_id}/runs?{WORKFLOW}"


def sweep_path(experiment_id: str, sweep_run_id: str) -> str:
    return f"{experiment_path(experiment_id)}&viewStateShareKey={quote(share_key(sweep_run_id))}"


def run_path(experiment_id: str, run_id: str, tab: str = "model-metrics") -> str:
    """One trial's page (its metric charts by default), on the model-training side."""
    return f"/#/experiments/{experiment_id}/runs/{run_id}/{tab}?{WORKFLOW}"


def home_path() -> str:
    """The experiment list, on the model-training side of the UI."""
    return f"/#/experiments?{WORKFLOW}"


def install_views(client, experiment_id: str) -> dict:
    """Set the experiment kind (when unset) and one shared view per sweep of the experiment.

    Returns ``{sweep run id: (sweep run name, URL path)}``.
    """
    experiment = client.get_experiment(experiment_id)
    if S.TAG_EXPERIMENT_KIND not in experiment.tags:
        for key, value in experiment_tags().items():
            client.set_experiment_tag(experiment_id, key, value)
    sweeps = client.search_runs([experiment_id], filter_string=f"tags.`{S.TAG_KIND}` = '{S.KIND_SWEEP}'",
                                max_results=1000)
    links = {}
    for sweep in sweeps:
        run_id = sweep.info.run_id
        client.set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + share_key(run_id),
                                  json.dumps(sweep_view(run_id)))
        links[run_id] = (sweep.info.run_name or run_id, sweep_path(experiment_id, run_id))
    return links


def alwa_experiments(client) -> list:
    """The experiments holding at least one alwa-sweep run (any ``alwa.kind``)."""
    found = []
    for experiment in client.search_experiments():
        runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{S.TAG_KIND}` != ''",
                                  max_results=1)
        if runs:
            found.append(experiment)
    return found
