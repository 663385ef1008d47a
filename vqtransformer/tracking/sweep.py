"""Hydra multiruns as MLflow parent/child runs (``python train.py -m ...``; docs/sweeps.md).

``MLflowSweepCallback`` is registered in ``conf/config.yaml`` under ``hydra.callbacks``:

- ``on_multirun_start`` runs once, on the submitting machine, before any job starts. It creates the
  sweep's parent run (tags ``vqt.role=parent``, ``vqt.sweep_id``, ``vqt.sweep_dir``, the sweep's
  overrides and ``hydra.sweeper.params``; params ``sweep.<key>`` = the swept values), writes
  ``<sweep_dir>/sweep.json`` and exports ``VQT_PARENT_RUN_ID`` / ``VQT_SWEEP_ID``. Every job's
  ``Tracker`` reads them and becomes a child run (``mlflow.parentRunId``) tagged with the sweep id.
  The basic launcher runs jobs in this process; submitit's local jobs are its child processes and
  ``sbatch`` exports the submitting environment (``--export=ALL``, Slurm's default).
- The callback object itself travels with the pickled launcher into every submitit job, and
  ``on_job_start`` exports the ids again there, so a cluster that starts jobs with a clean
  environment (``--export=NONE``) still gets them.
- ``on_multirun_end`` closes the parent FINISHED after the launcher has collected every job (the
  submitit launchers wait for all of them); a sweep that raises (a failed job) closes it FAILED.

Multi-process jobs (``hydra.launcher.tasks_per_node > 1``): Hydra's job wrapper runs in every task.
``hydra.output_subdir: ${vqt.on_rank_zero:.hydra}`` keeps non-zero ranks from writing ``.hydra/``
and ``on_job_start`` detaches their log file handlers, so a job leaves one set of outputs.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vqtransformer.tracking.mlflow_tracker import (
    ENV_PARENT,
    ENV_SWEEP,
    MAX_PARAM_LEN,
    get_client,
    resolve_tracking_uri,
)
from vqtransformer.training.distributed import global_rank

log = logging.getLogger(__name__)


def _on_rank_zero(value: Any = None) -> Any:
    """``${vqt.on_rank_zero:X}``: X on global rank 0 (or a single process), null on the other ranks."""
    return value if global_rank() == 0 else None


if not OmegaConf.has_resolver("vqt.on_rank_zero"):
    # not cached: Hydra copies the submitter's resolver cache into every job's config
    OmegaConf.register_new_resolver("vqt.on_rank_zero", _on_rank_zero, use_cache=False)


def new_sweep_id(config: DictConfig) -> str:
    """``DATE_TIME-xxxxxx``, the default sweep dir ``multirun/DATE/TIME-xxxxxx`` in one word.

    Resolved against ``config``'s resolver cache, so the date, time and ``${vqt.unique:}`` are the
    values in the sweep dir: unique for sweeps started in the same second.
    """
    try:
        ids = OmegaConf.create({"date": "${now:%Y-%m-%d}", "time": "${now:%H-%M-%S}", "unique": "${vqt.unique:}"},
                               parent=config)
        return f"{ids.date}_{ids.time}-{ids.unique}"
    except Exception:  # noqa: BLE001 - resolvers not registered (not started through train.py)
        return f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{uuid.uuid4().hex[:6]}"


def sweep_axes(config: DictConfig) -> dict[str, str]:
    """The swept keys and their values: sweep overrides on the command line and ``hydra.sweeper.params``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes: dict[str, str] = {}
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    for key, value in params.items():
        axes[str(key)] = str(value)
    try:
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    except Exception:  # noqa: BLE001 - tags are best effort; Hydra has validated the overrides already
        parsed = []
    for o in parsed:
        if o.is_sweep_override() and o.input_line:
            axes[o.key_or_group] = o.input_line.split("=", 1)[1]
    return axes


class MLflowSweepCallback(Callback):
    """One MLflow parent run per Hydra multirun; the jobs' runs are its children."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.sweep_id: str | None = None
        self.parent_run_id: str | None = None
        self.tracking_uri: str | None = None
        self.sweep_dir: str | None = None
        self._closed = False
        self._saved_env: dict[str, str | None] = {}

    # -- submitting process -------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        # resolving the sweep dir here caches ${now:} and ${vqt.unique:} in the config that the launcher
        # pickles into the jobs (Hydra copies that cache into each job's config): one directory per sweep
        self.sweep_dir = str(Path(str(config.hydra.sweep.dir)).absolute())
        self.sweep_id = new_sweep_id(config)
        self._export({ENV_SWEEP: self.sweep_id})
        logger = config.get("logger")
        if logger is None or logger.get("name") == "none":
            log.info("sweep %s: logger=none, no MLflow parent run", self.sweep_id)
            self._write_info(None)
            return
        self.tracking_uri = resolve_tracking_uri(logger.get("tracking_uri"))
        self.parent_run_id = self._create_parent(config, logger)
        if self.parent_run_id:
            self._export({ENV_PARENT: self.parent_run_id})
            atexit.register(self._close, "FAILED")  # the sweep raised (a job failed) or was interrupted
        self._write_info(str(logger.experiment_name))
        print(f"[vqtransformer] sweep {self.sweep_id}: {self.sweep_dir}\n  MLflow parent run: {self.parent_run_id} "
              f"({self.tracking_uri}); afterwards: python evaluate.py sweep_id={self.sweep_id}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        self._close("FINISHED")
        for key, value in self._saved_env.items():  # the basic launcher ran the jobs in this process
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    # -- every job (every task of a multi-task job) ---------------------------
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_id:
            os.environ[ENV_SWEEP] = self.sweep_id
        if self.parent_run_id:
            os.environ[ENV_PARENT] = self.parent_run_id
        if global_rank() > 0:  # Hydra configured this task's file logging too: only rank 0 writes the log
            root = logging.getLogger()
            for handler in list(root.handlers):
                if isinstance(handler, logging.FileHandler):
                    root.removeHandler(handler)
                    handler.close()

    # -- helpers ----------------------------------------------------------------
    def _export(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def _create_parent(self, config: DictConfig, logger: DictConfig) -> str | None:
        from vqtransformer.tracking.mlflow_tracker import Tracker

        axes = sweep_axes(config)
        choices = OmegaConf.select(config, "hydra.runtime.choices", default={}) or {}
        overrides = " ".join(config.hydra.overrides.task) or "(none)"
        tags = {
            "vqt.role": "parent", "vqt.sweep_id": self.sweep_id, "vqt.sweep_dir": self.sweep_dir,
            "vqt.overrides": overrides,
            "vqt.sweep_params": " ".join(f"{k}={v}" for k, v in axes.items()) or "(none)",
            "vqt.launcher": choices.get("hydra/launcher", "basic"), "vqt.stage": config.stage.name,
            "vqt.command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:MAX_PARAM_LEN],
            "mlflow.note.content": (f"Hydra multirun `{self.sweep_id}` in `{self.sweep_dir}`; one child run per job.\n\n"
                                    f"Swept: `{' '.join(f'{k}={v}' for k, v in axes.items())}`.\n\n"
                                    f"Compare: `python evaluate.py sweep_id={self.sweep_id}`"),
        }
        # the parent must not become a child of an outer sweep this process happens to run in
        outer = os.environ.pop(ENV_PARENT, None), os.environ.pop(ENV_SWEEP, None)
        try:
            tracker = Tracker(self.tracking_uri, str(logger.experiment_name), int(logger.get("retries", 3)) or 1)
            run_id = tracker.start(f"sweep-{self.sweep_id}", tags)
        finally:
            for key, value in zip((ENV_PARENT, ENV_SWEEP), outer):
                if value is not None:
                    os.environ[key] = value
            os.environ[ENV_SWEEP] = self.sweep_id
        if run_id is None:
            log.warning("sweep %s: no MLflow parent run (store %s unreachable); jobs log unparented runs",
                        self.sweep_id, self.tracking_uri)
            return None
        tracker.log_params({f"sweep.{k}": v for k, v in axes.items()})
        return run_id

    def _write_info(self, experiment: str | None) -> None:
        info = {"sweep_id": self.sweep_id, "parent_run_id": self.parent_run_id, "tracking_uri": self.tracking_uri,
                "experiment_name": experiment, "sweep_dir": self.sweep_dir}
        try:
            Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.sweep_dir) / "sweep.json").write_text(json.dumps(info, indent=2) + "\n")
        except OSError as e:
            log.warning("could not write %s/sweep.json: %s", self.sweep_dir, e)

    def _close(self, status: str) -> None:
        if self._closed or not self.parent_run_id:
            return
        self._closed = True
        from vqtransformer.tracking.mlflow_tracker import with_retries

        client = get_client(self.tracking_uri)
        with_retries(lambda: client.set_terminated(self.parent_run_id, status=status), "closing the sweep's parent run")
        log.info("sweep %s: parent run %s %s", self.sweep_id, self.parent_run_id, status)

    def __getstate__(self) -> dict[str, Any]:
        # pickled into every submitit job: the ids only (the job must not close the parent)
        state = dict(self.__dict__)
        state["_closed"] = True
        state["_saved_env"] = {}
        return state
