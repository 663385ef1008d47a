from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: environment variables through which a sweep's parent run reaches its jobs
ENV_PARENT = "VQT_PARENT_RUN_ID"
ENV_SWEEP = "VQT_SWEEP_ID"
MAX_PARAM_LEN = 6000


def project_root() -> Path:
    """The checkout holding ``conf/`` (editable install), else the current directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "conf").is_dir() else Path.cwd()


def default_tracking_uri() -> str:
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """``logger.tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > SQLite file at the project root."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def get_client(tracking_uri: str | None = None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


def default_artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite/file store go next to it (absolute), not into the cwd."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {'a.b.c': value}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def with_retries(fn: Callable, what: str, retries: int = 3, delay: float = 0.5):
    """Call ``fn``; retry on any error with backoff; after the last try warn and return None."""
    for attempt in range(retries):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - tracking must never kill training
            if attempt == retries - 1:
                log.warning("MLflow: %s failed after %d tries (%s: %s); training continues without it",
                            what, retries, type(e).__name__, e)
                return None
            time.sleep(delay * 2**attempt)
    return None


class NullTracker:
    """Tracker of non-zero ranks and of ``logger=none``: accepts everything, records nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None
    enabled = False

    def __getattr__(self, name):
        return lambda *a, **k: None


class Tracker:
    """One MLflow run. ``start`` creates it (or re-opens ``run_id`` on resume)."""

    enabled = True

    def __init__(self, tracking_uri: str | None, experiment_name: str, retries: int = 3):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment_name = experiment_name
        self.retries = retries
        self.client = get_client(self.tracking_uri)
        self.run_id: str | None = None
        self._metrics: list = []

    def _retry(self, fn: Callable, what: str):
        return with_retries(fn, what, self.retries)

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.experiment_name,
                                                 artifact_location=default_artifact_location(self.tracking_uri))
        except Exception:  # noqa: BLE001 - created concurrently by another job
            return self.client.get_experiment_by_name(self.experiment_name).experiment_id

    def start(self, run_name: str | None = None, tags: dict[str, str] | None = None, run_id: str | None = None) -> str | None:
        tags = dict(tags or {})
        parent = os.environ.get(ENV_PARENT)
        if parent:
            tags.setdefault("mlflow.parentRunId", parent)
            tags.setdefault("vqt.parent_run_id", parent)
        if os.environ.get(ENV_SWEEP):
            tags.setdefault("vqt.sweep_id", os.environ[ENV_SWEEP])
        if run_id:  # resume: same run, running again
            def reopen():
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            self.run_id = self._retry(reopen, "re-opening run")
        else:
            def create():
                exp_id = self._experiment_id()
                return self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
            self.run_id = self._retry(create, "creating run")
        if self.run_id is None:
            self.enabled = False
        elif run_id and tags:
            self.set_tags(tags)
        return self.run_id

    # -- logging ------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            chunk = items[i:i + 100]
            self._retry(lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk), "logging params")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:MAX_PARAM_LEN]) for k, v in tags.items()]
        self._retry(lambda: self.client.log_batch(self.run_id, tags=items), "setting tags")

    def log_metrics(self, metrics: Mapping[str, float], step: int, flush: bool = False) -> None:
        """Buffered; flushed every 200 values, on ``flush=True`` and at ``finish``."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._metrics += [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        if flush or len(self._metrics) >= 200:
            self.flush()

    def flush(self) -> None:
        if not self.enabled or not self._metrics:
            return
        batch, self._metrics = self._metrics, []
        for i in range(0, len(batch), 1000):
            chunk = batch[i:i + 1000]
            self._retry(lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk), "logging metrics")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path), f"logging {path}")

    def log_image(self, image, name: str, artifact_path: str = "images") -> None:
        """``image``: float tensor [3,H,W] in [0,1] (or a PIL image), saved as PNG ``name``."""
        if not self.enabled:
            return
        from PIL import Image

        if not isinstance(image, Image.Image):
            arr = (image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
            image = Image.fromarray(arr)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            image.save(p)
            self.log_artifact(p, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self.flush()
        self._retry(lambda: self.client.set_terminated(self.run_id, status=status), "closing run")
