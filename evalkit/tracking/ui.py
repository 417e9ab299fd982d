"""How evalkit's experiments open in the MLflow UI (3.17): the classic machine-learning view, the headline columns.

MLflow 3's UI opens every experiment on the GenAI overview unless told otherwise:
- the experiment tag `mlflow.experimentKind=custom_model_development` marks it as a classic ML experiment (the
  experiment-kind selector of MLflow 3.x reads it);
- MLflow 3.17 itself picks the view from a per-browser setting (the sidebar's "GenAI / Model training" switch,
  default GenAI) that the URL parameter `workflowType=machine_learning` overrides; so every link evalkit prints
  carries that parameter.
The runs table shows only a few attribute columns by default. The UI's own "share view" mechanism stores a view
(its selected columns) in the experiment tag `mlflow.sharedViewState.<key>` and opens it for
`?viewStateShareKey=<key>`: evalkit writes one view, `evalkit`, whose columns are the headline metrics, the
params that tell runs apart and the verdict, and links to it.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from evalkit.tracking.names import HEADLINE

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CLASSIC_ML_KIND = "custom_model_development"  # the "Machine learning" kind of MLflow's experiment-kind selector
VIEW_KEY = "evalkit"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
RUN_PARAMS = ("policy", "backend", "suite", "denoise_steps")  # what tells the runs of a sweep apart
VERDICT_TAG = "evalkit.verdict"


def run_columns() -> list[str]:
    """The runs table's columns in evalkit's view, as the UI names them (`metrics.`name``, `params.`name``)."""
    return ([f"metrics.`{m}`" for m in HEADLINE.values()] + [f"params.`{p}`" for p in RUN_PARAMS]
            + [f"tags.`{VERDICT_TAG}`"])


def view_state() -> str:
    """The value of the VIEW_TAG experiment tag (the JSON the UI's "share view" writes; unnamed keys keep defaults)."""
    return json.dumps({"selectedColumns": run_columns()})


def experiment_tags() -> dict[str, str]:
    """Tags an evalkit experiment is created with."""
    return {EXPERIMENT_KIND_TAG: CLASSIC_ML_KIND, VIEW_TAG: view_state()}


def ui_base(uri: str) -> str:
    """Where the UI of tracking store `uri` is: a server serves its own; a sqlite store is read by `mlflow ui`."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI


def open_command(uri: str) -> str | None:
    """The command that serves the UI of `uri` (None when a server already does)."""
    if uri.startswith(("http://", "https://")):
        return None
    return f"mlflow ui --backend-store-uri {uri}"


def _query(**extra: str) -> str:
    return urlencode({"workflowType": "machine_learning", **extra})


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}?{_query()}"


def runs_url(uri: str, experiment_id: str, charts: bool = False) -> str:
    """The experiment's runs table in evalkit's view; `charts`: the same runs side by side as charts (MLflow's
    chart view, whose first section is the headline metrics)."""
    extra = {"viewStateShareKey": VIEW_KEY, **({"compareRunsMode": "CHART"} if charts else {})}
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?{_query(**extra)}"
