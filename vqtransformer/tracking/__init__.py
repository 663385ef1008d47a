"""MLflow tracking: the run lifecycle, flattened params, metrics, images and checkpoints.

One wrapper for every entry point (train, evaluate, sample, sweeps). It talks to MLflow
through ``MlflowClient`` with an explicit run id (no global "active run"), retries
failed calls and then only warns, so a tracking outage never kills training.
"""

from vqtransformer.tracking.mlflow_tracker import (
    NullTracker,
    Tracker,
    default_tracking_uri,
    flatten,
    get_client,
    project_root,
    resolve_tracking_uri,
)

__all__ = ["Tracker", "NullTracker", "flatten", "get_client", "resolve_tracking_uri", "default_tracking_uri",
           "project_root"]
