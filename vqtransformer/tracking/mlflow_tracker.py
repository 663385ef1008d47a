from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: environment variables through which a sweep's parent run reaches its jobs
ENV_PARENT = "VQT_PARENT_RUN_ID"
ENV_SWEEP = "VQT_SWEEP_ID"
#: a sweep job's run name and description (set per job by tracking/sweep.py; used when no run_name is given)
ENV_RUN_NAME = "VQT_RUN_NAME"
ENV_RUN_NOTE = "VQT_RUN_NOTE"
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
    """An ``MlflowClient``; for a local SQLite store under a file lock (``STORE.lock``), because the client
    creates a new store's schema and jobs that start together would race in it."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    with _StoreLock(uri):
        return MlflowClient(tracking_uri=uri)


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


class _StoreLock:
    """An exclusive file lock beside a local SQLite store while MLflow creates its schema: jobs that
    start together into a new store would otherwise race in the schema set-up (alembic)."""

    def __init__(self, uri: str):
        self.path = None
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///"):])
            self.path = db.with_name(db.name + ".lock")
        self._fd = None

    def __enter__(self):
        if self.path is not None:
            import fcntl

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o666)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        return False


def limit_mlflow_http_retries() -> None:
    """Our calls retry on their own (in the background): MLflow's HTTP client must not add its own
    7 exponential-backoff retries and 120 s timeout inside each of them. Values set by the user win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # MLflow's SQL store logs every OperationalError ("database is locked") with a full traceback;
    # the tracker reports an unreachable store in one line instead
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _permanent(e: BaseException) -> bool:
    """An error that retrying cannot cure (a bad request), as opposed to an unreachable / locked store."""
    code = getattr(e, "error_code", None)
    if code is not None:
        return code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
                        "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED")
    return isinstance(e, (TypeError, AttributeError, KeyError, FileNotFoundError))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


class _Sender:
    """The tracker's background thread: sends queued operations in order, off the training thread.

    Metric points are batched (up to 1000 per request, at least every ``interval`` seconds or when 200
    are waiting). A failed request is retried with backoff (up to ``max_backoff`` seconds between tries)
    until it succeeds, so nothing is lost while the store is down and nothing is reordered; a request
    that cannot succeed (a bad request) is dropped after 3 tries. At most ``max_points`` metric points
    wait; beyond that new points are dropped and counted. One warning line per outage, one info line
    when the store is reachable again.
    """

    BATCH = 1000

    def __init__(self, tracker: Tracker, max_points: int = 200_000, interval: float = 1.0,
                 max_backoff: float = 5.0):
        self.t = tracker
        self.max_points, self.interval, self.max_backoff = max_points, interval, max_backoff
        self.cv = threading.Condition()
        self.ops: collections.deque = collections.deque()
        self.points = 0
        self.first_point_at: float | None = None
        self.flush_requested = False
        self.busy_since: float | None = None
        self.down_since: float | None = None
        self.warned = False
        self.retry_at = 0.0
        self.failures = 0
        self.dropped = 0
        self.stopped = False
        self.logged_upto: dict[str, int] = {}
        self.thread = threading.Thread(target=self._run, name="vqt-mlflow-sender", daemon=True)
        self.thread.start()

    # -- training thread ------------------------------------------------------
    def put(self, kind: str, payload: Any) -> None:
        busy = self.busy_since
        if busy is not None and not self.warned and time.monotonic() - busy > self.t.flush_timeout:
            self.warn_behind(f"{self.t.tracking_uri} has not answered for {time.monotonic() - busy:.0f} s")
        with self.cv:
            if self.stopped:
                return
            if kind == "metrics":
                if self.points + len(payload) > self.max_points:
                    if not self.dropped:
                        log.warning("MLflow: %d metric points are waiting for the store (logger.max_buffered); "
                                    "dropping new points until it catches up", self.points)
                    self.dropped += len(payload)
                    return
                self.points += len(payload)
                if self.first_point_at is None:
                    self.first_point_at = time.monotonic()
                last = self.ops[-1] if self.ops else None
                if last is not None and last[0] == "metrics" and len(last[1]) < self.BATCH:
                    last[1].extend(payload)
                else:
                    self.ops.append(["metrics", list(payload)])
            else:
                self.ops.append([kind, payload])
            self.cv.notify_all()

    def pending(self) -> tuple[int, int]:
        """(metric points, other operations) not sent yet."""
        with self.cv:
            return self.points, sum(1 for op in self.ops if op[0] != "metrics")

    def unsent_metrics(self) -> list[tuple[str, float, int, int]]:
        """The metric points not confirmed by the store yet (a batch in flight included), as
        (key, value, timestamp, step)."""
        with self.cv:
            return [(m.key, m.value, m.timestamp, m.step) for op in self.ops if op[0] == "metrics" for m in op[1]]

    def behind(self, patience: float) -> bool:
        return self.down_since is not None or (self.busy_since is not None
                                               and time.monotonic() - self.busy_since > patience)

    def drain(self, timeout: float, while_up: bool = False) -> bool:
        """Ask for everything queued to be sent; wait at most ``timeout`` s. True when all was sent.
        ``while_up``: stop waiting as soon as a request fails (the store is down: waiting out the
        timeout would only stall the caller, the backlog is sent when the store answers again)."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self.cv:
            self.flush_requested = True
            self.cv.notify_all()
            while self.ops or self.busy_since is not None:
                if while_up and self.down_since is not None:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cv.wait(min(left, 0.2))
            return True

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()

    def warn_behind(self, reason: str) -> None:
        with self.cv:
            if self.warned:
                return
            self.warned = True
            points = self.points
        log.warning("MLflow: tracking is behind (%s); training continues, %d metric points wait and are sent "
                    "in the background when %s answers", reason, points, self.t.tracking_uri)

    # -- sender thread ---------------------------------------------------------
    def _ready(self) -> bool:
        if not self.ops or self.stopped:
            return False
        now = time.monotonic()
        if now < self.retry_at:
            return False
        head = self.ops[0]
        if head[0] != "metrics" or self.flush_requested or len(self.ops) > 1 or self.points >= 200:
            return True
        return self.first_point_at is not None and now - self.first_point_at >= self.interval

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self._ready():
                    if self.stopped:
                        return
                    self.cv.wait(0.2)
                head = self.ops[0]
                kind = head[0]
                payload = head[1][:self.BATCH] if kind == "metrics" else head[1]
                self.busy_since = time.monotonic()
            error = None
            try:
                self._send(kind, payload)
            except Exception as e:  # noqa: BLE001 - tracking must never kill training
                error = e
            with self.cv:
                self.busy_started, self.busy_since = self.busy_since, None
                if error is None or (_permanent(error) and self.failures >= 2):
                    if error is not None:
                        log.warning("MLflow: dropped %s after 3 tries (%s)", kind, _one_line(error))
                    if kind == "metrics":
                        del head[1][:len(payload)]
                        self.points -= len(payload)
                        if not head[1]:
                            self.ops.popleft()
                        self.first_point_at = time.monotonic() if self.points else None
                    else:
                        self.ops.popleft()
                        if kind == "artifact" and payload[2]:
                            with contextlib.suppress(OSError):
                                os.unlink(payload[0])
                    if error is None and (self.down_since is not None or self.warned):
                        since = self.down_since or self.busy_started
                        log.info("MLflow: %s answers again after %.0f s; sending the %d waiting metric points",
                                 self.t.tracking_uri, time.monotonic() - since, self.points)
                        self.down_since = None
                        self.warned = False
                    self.failures, self.retry_at = 0, 0.0
                    if not self.ops:
                        self.flush_requested = False
                else:
                    self.failures += 1
                    if not _permanent(error) and self.down_since is None:
                        self.down_since = time.monotonic()
                    self.retry_at = time.monotonic() + min(self.max_backoff, 0.5 * 2 ** (self.failures - 1))
                self.cv.notify_all()
            if error is not None and not _permanent(error):
                self.warn_behind(f"{self.t.tracking_uri} unreachable: {_one_line(error)}")

    def _send(self, kind: str, payload: Any) -> None:
        client, run_id = self.t.client, self.t.run_id
        if kind == "metrics":
            todo = [m for m in payload if m.step > self.logged_upto.get(m.key, -(2**62))]
            if todo:
                client.log_batch(run_id, metrics=todo)
        elif kind == "params":
            client.log_batch(run_id, params=payload)
        elif kind == "tags":
            client.log_batch(run_id, tags=payload)
        elif kind == "artifact":
            path, artifact_path, _ = payload
            client.log_artifact(run_id, path, artifact_path)
        elif kind == "keyed_image":
            image, key, step = payload
            client.log_image(run_id, image, key=key, step=step)
        elif kind == "terminate":
            client.set_terminated(run_id, status=payload)
        elif kind == "logged_steps":  # resume: what the interrupted process already recorded
            run = client.get_run(run_id)
            upto = {}
            for key in run.data.metrics:
                steps = [m.step for m in client.get_metric_history(run_id, key)]
                if steps:
                    upto[key] = max(steps)
            self.logged_upto = upto


class Tracker:
    """One MLflow run. ``start`` creates it (or re-opens ``run_id`` on resume) with a few bounded tries;
    everything logged afterwards goes through a background sender (``_Sender``), so a slow, locked or
    unreachable store never blocks the training step."""

    enabled = True

    def __init__(self, tracking_uri: str | None, experiment_name: str, retries: int = 3,
                 flush_timeout: float = 5.0, finish_timeout: float = 60.0, max_buffered: int = 200_000):
        limit_mlflow_http_retries()
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment_name = experiment_name
        self.retries = max(1, int(retries))
        self.flush_timeout, self.finish_timeout = float(flush_timeout), float(finish_timeout)
        self.max_buffered = int(max_buffered)
        self.run_id: str | None = None
        self._sender: _Sender | None = None
        self._tmp: str | None = None
        self.client = self._retry(lambda: get_client(self.tracking_uri), "opening the store")
        if self.client is None:
            self.enabled = False

    def _retry(self, fn: Callable, what: str):
        return with_retries(fn, what, self.retries)

    def _experiment_id(self) -> str:
        with _StoreLock(self.tracking_uri):  # the first access creates a new SQLite store's schema
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is not None:
                return exp.experiment_id
            try:
                return self.client.create_experiment(self.experiment_name,
                                                     artifact_location=default_artifact_location(self.tracking_uri))
            except Exception:  # noqa: BLE001 - created concurrently by another job (server stores)
                return self.client.get_experiment_by_name(self.experiment_name).experiment_id

    def start(self, run_name: str | None = None, tags: dict[str, str] | None = None, run_id: str | None = None) -> str | None:
        tags = {str(k): str(v)[:MAX_PARAM_LEN] for k, v in (tags or {}).items()}  # the REST API takes strings only
        parent = os.environ.get(ENV_PARENT)
        if parent:
            tags.setdefault("mlflow.parentRunId", parent)
            tags.setdefault("vqt.parent_run_id", parent)
        if os.environ.get(ENV_SWEEP):
            tags.setdefault("vqt.sweep_id", os.environ[ENV_SWEEP])
        if not run_id and os.environ.get(ENV_RUN_NAME):  # a sweep job: named after its swept overrides
            run_name = run_name or os.environ[ENV_RUN_NAME]
            if os.environ.get(ENV_RUN_NOTE):
                tags.setdefault("mlflow.note.content", os.environ[ENV_RUN_NOTE])
        if self.client is None:
            return None
        if run_id:  # resume: same run, running again
            def reopen():
                with _StoreLock(self.tracking_uri):
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
            return None
        self._sender = _Sender(self, max_points=self.max_buffered)
        atexit.register(self._drain_at_exit)  # a tracker never finished (a sweep's parent): send what is queued
        if run_id:
            self._sender.put("logged_steps", None)  # one point per step: skip what was recorded before
            if tags:
                self.set_tags(tags)
        return self.run_id

    # -- logging (queued; sent by the background sender) -----------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._sender.put("params", items[i:i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)[:MAX_PARAM_LEN]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self._sender.put("tags", items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int, flush: bool = False) -> None:
        """Queued in order with their step; sent in batches in the background (``flush=True``: now)."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._sender.put("metrics", [Metric(str(k), float(v), ts, int(step)) for k, v in metrics.items()])
        if flush:
            self.flush()

    def flush(self, timeout: float | None = None) -> bool:
        """Send what is queued; wait at most ``timeout`` (``logger.flush_timeout``) seconds, and not at all
        while the store is known to be down or behind. True when everything was sent."""
        if not self.enabled:
            return True
        timeout = self.flush_timeout if timeout is None else timeout
        if self._sender.behind(self.flush_timeout):
            self._sender.drain(0)
            return False
        done = self._sender.drain(timeout, while_up=True)
        if not done and self._sender.behind(self.flush_timeout):  # not a backlog being sent: no answer
            self._sender.warn_behind(f"{self.tracking_uri} did not answer within logger.flush_timeout="
                                     f"{self.flush_timeout:g}s")
        return done

    def pending(self) -> tuple[int, int]:
        return self._sender.pending() if self._sender else (0, 0)

    def unsent_metrics(self) -> list[tuple[str, float, int, int]]:
        """Points logged but not yet in the store. A checkpoint carries them (``resend_metrics`` on
        resume), so a kill -9 after the checkpoint and before the sender caught up loses no step."""
        return self._sender.unsent_metrics() if self.enabled and self._sender else []

    def resend_metrics(self, points) -> None:
        """Queue a checkpoint's ``unsent_metrics`` again; those that did arrive before the interruption
        are skipped like every step already recorded (one point per step)."""
        if not self.enabled or not points:
            return
        from mlflow.entities import Metric

        self._sender.put("metrics", [Metric(str(k), float(v), int(ts), int(st)) for k, v, ts, st in points])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, _owned: bool = False) -> None:
        if self.enabled:
            self._sender.put("artifact", (str(path), artifact_path, _owned))

    def log_image(self, image, name: str, artifact_path: str = "images", key: str | None = None,
                  step: int | None = None) -> None:
        """``image``: float tensor [3,H,W] in [0,1] (or a PIL image), saved as PNG ``name``.

        With ``key`` (and ``step``) it is also logged as MLflow's time-stepped image
        (``mlflow.log_image(key=..., step=...)``: ``images/<key>+step+<step>+...png``), which the UI's image
        grid and compare view show across runs and steps."""
        if not self.enabled:
            return
        from PIL import Image

        if not isinstance(image, Image.Image):
            arr = (image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
            image = Image.fromarray(arr)
        if key is not None:
            self._sender.put("keyed_image", (image.copy(), key, int(step or 0)))
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="vqt-mlflow-")
        d = Path(tempfile.mkdtemp(dir=self._tmp))  # one folder per image: the artifact keeps its name
        p = d / name
        image.save(p)
        self.log_artifact(p, artifact_path, _owned=True)

    def _drain_at_exit(self) -> None:
        if self.enabled and self._sender is not None:
            self._sender.drain(self.flush_timeout if self._sender.behind(self.flush_timeout) else self.finish_timeout)

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """Close the run with ``status`` after sending what is queued; wait at most ``timeout``
        (``logger.finish_timeout``) seconds. True when everything arrived."""
        if not self.enabled:
            return True
        timeout = self.finish_timeout if timeout is None else timeout
        self._sender.put("terminate", status)
        done = self._sender.drain(timeout)
        if not done:
            points, others = self._sender.pending()
            log.warning("MLflow: %d metric points and %d other items could not be sent to %s within "
                        "logger.finish_timeout=%gs; run %s stays open there", points, others, self.tracking_uri,
                        timeout, self.run_id)
        self._sender.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self.enabled = False
        return done
