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
- It also composes every job's config (as the basic sweeper expands the sweep) and records which
  config keys vary across the jobs, per swept axis: tag ``vqt.sweep_varying`` (JSON
  ``{axis: [keys]}``), tag ``vqt.sweep_varying_keys`` and ``sweep.json``'s ``varying``. A preset sweep
  such as ``codebook=k256,k1024`` thus says that it changes ``codebook.n_embed`` (and nothing else);
  ``evaluate.py sweep_id=`` warns when the children differ in more than these keys.
- ``on_job_start`` names the job's run after its swept overrides (``codebook=k1024`` -> ``k1024``,
  ``transformer.n_layer=4`` -> ``n_layer=4``, several joined with ``, ``) and gives it a description
  (``VQT_RUN_NAME`` / ``VQT_RUN_NOTE``, read by ``Tracker.start``).
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
    ENV_RUN_NAME,
    ENV_RUN_NOTE,
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


def _axis_keys(config: DictConfig) -> list[str]:
    """The key elements of the swept overrides (``codebook``, ``codebook.n_embed``), in sweep order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.get_key_element() for o in OverridesParser.create().parse_overrides(_sweep_lines(config))
            if o.is_sweep_override()]


def _sweep_lines(config: DictConfig) -> list[str]:
    """``hydra.sweeper.params`` then the command line's overrides, as the basic sweeper combines them."""
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    task = list(OmegaConf.select(config, "hydra.overrides.task", default=None) or [])
    return [f"{k}={v}" for k, v in params.items()] + task


def job_overrides(config: DictConfig) -> list[list[str]]:
    """Every job's override list, expanded as Hydra's basic sweeper does (the cartesian product)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(_sweep_lines(config))
    return BasicSweeper.split_arguments(parsed, None)[0]


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside train.py's Hydra app
        return compose(config_name=config_name, overrides=overrides)
    from vqtransformer.tracking.mlflow_tracker import project_root

    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _flat(cfg: DictConfig) -> dict[str, str]:
    from vqtransformer.tracking.mlflow_tracker import flatten

    try:
        d = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that only resolves inside a job
        d = OmegaConf.to_container(cfg, resolve=False)
    return {k: str(v) for k, v in flatten(d).items() if not k.startswith("hydra.")}


def varying_keys(config: DictConfig, config_name: str = "config", max_jobs: int = 256) -> dict[str, list[str]]:
    """``{axis: [config keys it changes]}`` from the composed config of every job of the sweep.

    A key belongs to an axis when two jobs that differ only in that axis differ in the key. Empty
    when the sweep has no axis or more than ``max_jobs`` jobs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = _axis_keys(config)
    jobs = job_overrides(config)
    if not axes or len(jobs) > max_jobs:
        return {}
    parser = OverridesParser.create()
    flats, choices = [], []
    for overrides in jobs:
        flats.append(_flat(_compose(config_name, overrides)))
        by_key = {o.get_key_element(): o.get_value_element_as_str() for o in parser.parse_overrides(overrides)}
        choices.append({a: by_key.get(a) for a in axes})
    keys = sorted({k for f in flats for k in f})
    out: dict[str, list[str]] = {}
    for axis in axes:
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(choices):
            groups.setdefault(tuple((a, c[a]) for a in axes if a != axis), []).append(i)
        changed = {k for idx in groups.values() for k in keys if len({flats[i].get(k) for i in idx}) > 1}
        out[axis] = sorted(changed)
    return out


def run_name_for(overrides: list[str], axes: list[str], groups: set[str]) -> str:
    """``codebook=k1024`` -> ``k1024`` (a config group: its option), ``transformer.n_layer=4`` -> ``n_layer=4``;
    several swept overrides joined with ``, ``. Only the swept overrides name a run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parts = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.get_key_element()
        if key not in axes:
            continue
        value = o.get_value_element_as_str()
        bare = key.lstrip("+~")
        parts.append(value if bare in groups or "/" in bare else f"{bare.rsplit('.', 1)[-1]}={value}")
    return ", ".join(parts)


class MLflowSweepCallback(Callback):
    """One MLflow parent run per Hydra multirun; the jobs' runs are its children."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.sweep_id: str | None = None
        self.parent_run_id: str | None = None
        self.tracking_uri: str | None = None
        self.sweep_dir: str | None = None
        self.axes: list[str] = []
        self.varying: dict[str, list[str]] = {}
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
        try:
            self.axes = _axis_keys(config)
            self.varying = varying_keys(config, str(kwargs.get("config_name") or "config"))
        except Exception as e:  # noqa: BLE001 - the record is informative; the sweep must still run
            log.warning("sweep %s: could not compose the jobs' configs to record the varying keys: %s",
                        self.sweep_id, e)
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
        try:
            name, note = self.job_name_and_note(config)
        except Exception as e:  # noqa: BLE001 - a name is cosmetic
            log.warning("sweep %s: no run name for this job: %s", self.sweep_id, e)
            name = note = None
        for key, value in ((ENV_RUN_NAME, name), (ENV_RUN_NOTE, note)):
            if value:
                self._export({key: value})
            else:
                self._saved_env.setdefault(key, os.environ.get(key))
                os.environ.pop(key, None)
        if global_rank() > 0:  # Hydra configured this task's file logging too: only rank 0 writes the log
            root = logging.getLogger()
            for handler in list(root.handlers):
                if isinstance(handler, logging.FileHandler):
                    root.removeHandler(handler)
                    handler.close()

    def job_name_and_note(self, config: DictConfig) -> tuple[str | None, str | None]:
        """The job's run name (its swept overrides) and description (what it sets, the rest of the sweep)."""
        overrides = list(OmegaConf.select(config, "hydra.overrides.task", default=None) or [])
        axes = self.axes or _axis_keys(config)
        groups = set((OmegaConf.select(config, "hydra.runtime.choices", default=None) or {}).keys())
        swept = [o for o in overrides if o.split("=", 1)[0] in axes]
        name = run_name_for(overrides, axes, groups) or None
        num = OmegaConf.select(config, "hydra.job.num", default=None)
        sets = []
        for axis in axes:
            for key in self.varying.get(axis, []):
                sets.append(f"`{key}={OmegaConf.select(config, key, default=None)}`")
        lines = [f"Job {num} of sweep `{self.sweep_id}`" + (f" (parent run `{self.parent_run_id}`)" if self.parent_run_id
                                                            else "") + ".",
                 "", f"Swept: `{' '.join(swept) or '(nothing)'}`" + (f", which sets {', '.join(sets)}" if sets else "")
                 + ".",
                 "", f"Same in every job: `{' '.join(o for o in overrides if o not in swept) or '(no other overrides)'}`.",
                 "", f"Compare the jobs: `python evaluate.py sweep_id={self.sweep_id}` (results on the parent run)."]
        return name, "\n".join(lines)

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
                                    + "".join(f"- `{a}` changes {', '.join(f'`{k}`' for k in keys) or 'no key'}\n"
                                              for a, keys in self.varying.items())
                                    + f"\nCompare: `python evaluate.py sweep_id={self.sweep_id}`"),
            "vqt.sweep_varying": json.dumps(self.varying, sort_keys=True),
            "vqt.sweep_varying_keys": ",".join(sorted({k for keys in self.varying.values() for k in keys})) or "(none)",
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
        tracker.flush()  # logging may be queued (background sender): the parent's params must be there now
        return run_id

    def _write_info(self, experiment: str | None) -> None:
        info = {"sweep_id": self.sweep_id, "parent_run_id": self.parent_run_id, "tracking_uri": self.tracking_uri,
                "experiment_name": experiment, "sweep_dir": self.sweep_dir, "varying": self.varying}
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
