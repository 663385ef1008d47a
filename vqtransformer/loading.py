"""From a checkpoint to a ready stage, the top floor: the one place that turns a path, a run directory, an
MLflow run id or a taming-transformers file (+ its project YAML) into a stage, with the frozen models it
needs (first stage, a condition's VQ model) loaded and given to it.

    build_stage(cfg)                                   # train.py: a stage from a config (frozen models loaded)
    load_stage(ckpt=PATH | RUN_DIR)                    # evaluate.py, sample.py: one of our checkpoints
    load_stage(run_id=ID)                              # ... the checkpoint of an MLflow run
    load_stage(ckpt=TAMING.ckpt, taming_config=YAML)   # a taming Net2NetTransformer (or VQGAN) file
    load_frozen_vq(cfg.first_stage, "first_stage")     # a frozen VQ model: ours, or taming's with its YAML

Everything below it (stages, models, :mod:`vqtransformer.training.checkpoint`) imports nothing from here;
MLflow is reached only from here (run ids) and from the tracking package.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf, open_dict

from vqtransformer.config import ConfigError
from vqtransformer.models import taming
from vqtransformer.stages import Stage, stage_class
from vqtransformer.training.checkpoint import (
    LAST,
    CheckpointError,
    find_last,
    load,
    load_module_state,
    read_once,
)

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class Loaded:
    """A stage rebuilt from a checkpoint (on the CPU, eval mode) and where it came from."""

    stage: Stage
    config: DictConfig
    path: Path
    step: int
    mlflow_run_id: str | None


# -- where the checkpoint is ----------------------------------------------------------------------------
def resolve_run_checkpoint(run_id: str, tracking_uri: str | None = None) -> Path:
    """Local path of the checkpoint of MLflow run ``run_id`` (tag ``vqt.checkpoint`` or artifact)."""
    from vqtransformer.tracking import get_client

    client = get_client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"MLflow run '{run_id}' does not exist in {client.tracking_uri}") from e
    path = run.data.tags.get("vqt.checkpoint")
    if path and Path(path).is_file():
        return Path(path)
    try:
        return Path(client.download_artifacts(run_id, f"checkpoints/{LAST}"))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"MLflow run '{run_id}' has no checkpoint (no 'vqt.checkpoint' tag pointing at an "
                              f"existing file, no 'checkpoints/{LAST}' artifact)") from e


def checkpoint_path(ckpt: str | Path | None = None, run_id: str | None = None, tracking_uri: str | None = None,
                    key: str = "ckpt") -> Path:
    """The checkpoint file of ``ckpt`` (a file, or a run directory: its ``checkpoints/last.ckpt``) or of MLflow
    run ``run_id``; ``key`` names the config key in errors (``first_stage.ckpt``)."""
    if ckpt:
        p = Path(str(ckpt)).expanduser()
        if p.is_dir():
            found = find_last(p)
            if found is None:
                raise CheckpointError(f"{key}={ckpt}: a directory without a checkpoint (no {LAST} or checkpoints/{LAST})")
            return found
        if not p.is_file():
            raise CheckpointError(f"{key}={ckpt}: checkpoint '{p}' does not exist")
        return p
    if run_id:
        return resolve_run_checkpoint(str(run_id), tracking_uri)
    run_key = key.rsplit(".", 1)[0] + ".run_id" if "." in key else "run_id"
    raise CheckpointError(f"set {key}=PATH (a checkpoint or run directory) or {run_key}=ID (an MLflow run)")


def is_ours(ckpt: dict) -> bool:
    return isinstance(ckpt, dict) and "config" in ckpt and isinstance(ckpt.get("model"), dict)


def config_of(ckpt: dict[str, Any], path: Path | str = "checkpoint") -> DictConfig:
    if not is_ours(ckpt):
        raise CheckpointError(f"{path} carries no config: not written by vqtransformer")
    return OmegaConf.create(ckpt["config"])


# -- frozen VQ models --------------------------------------------------------------------------------
def load_frozen_vq(node: DictConfig, key: str, tracking_uri: str | None = None) -> nn.Module:
    """The frozen VQModel of config node ``key`` (``first_stage`` or ``conditioning``: ``ckpt`` | ``run_id``,
    ``taming_config``), eval mode, no grad. Ours: rebuilt from the config it carries. Taming's: built from its
    project YAML (a VQGAN's, or a Net2Net's whose first / cond stage it is), weights strictly checked."""
    path = checkpoint_path(node.get("ckpt"), node.get("run_id"), tracking_uri, key=f"{key}.ckpt")
    ckpt = load(path)
    yaml = node.get("taming_config")
    if is_ours(ckpt):
        if yaml:
            raise ConfigError(f"{key}.taming_config={yaml} is for taming-transformers checkpoints, but {key}.ckpt={path} "
                              f"is a vqtransformer one; drop {key}.taming_config")
        cfg = config_of(ckpt, path)
        if cfg.stage.name != "vqgan":
            raise CheckpointError(f"{key} checkpoint '{path}' is a '{cfg.stage.name}' checkpoint, not a vqgan one")
        stage = build_stage(cfg, for_inference=True, tracking_uri=tracking_uri)
        stage.load_state_dict(ckpt["model"])
        model = stage.reconstruction_model()
        model.target = stage.target  # what it encodes (its data.target): image | segmentation | depth
    else:
        if not yaml:
            raise CheckpointError(f"{key}.ckpt={path} carries no config: not written by vqtransformer. For a "
                                  f"taming-transformers checkpoint give its project YAML: {key}.taming_config="
                                  "PATH/to/*-project.yaml")
        project = taming.read_project(yaml, f"{key}.taming_config")
        role = "first_stage" if key == "first_stage" else "conditioning"
        params = taming.vqgan_params(project, role)
        model = taming.build_vqmodel(params)
        prefix = taming.PREFIX[role] if taming.is_net2net(project) else ""
        sd, disc, dropped = taming.split_vqgan_state(taming.state_dict_of(ckpt), prefix)
        if disc:
            dropped.update(taming.DISCRIMINATOR_DROPPED)
        load_module_state(model, taming.complete_vqgan_state(model, sd), what=f"{key}.ckpt={path}", dropped=dropped)
        model.label_values = (0.0, 1.0)  # taming's label maps are one-hot in {0, 1}
        channels = int(params["ddconfig"]["in_channels"])
        model.target = (node.get("type") if role == "conditioning" else None) or ("image" if channels == 3 else
                                                                                ("depth" if channels == 1 else
                                                                                 "segmentation"))
    model.eval().requires_grad_(False)
    model.checkpoint_path = str(path)
    return model


# -- stages --------------------------------------------------------------------------------------------
def build_stage(cfg: DictConfig, for_inference: bool = False, tracking_uri: str | None = None,
                overrides: list[str] | None = None) -> Stage:
    """The stage of ``cfg.stage.name``, built on the CPU: the architecture of taming files read from their
    YAMLs (``overrides``, the command line, may not contradict them), the frozen models the stage declares
    (:meth:`Stage.frozen_models`) loaded and given to it. ``for_inference`` skips what only training needs."""
    taming.apply_taming_configs(cfg, overrides)
    cls = stage_class(cfg.stage.name)
    with read_once():
        models = {kw: load_frozen_vq(node, key, tracking_uri) for kw, (key, node) in cls.frozen_models(cfg).items()}
        return cls(cfg, for_inference=for_inference, **models)


def compose_config(overrides: list[str]) -> DictConfig:
    """Our composed config (``conf/config.yaml``) with ``overrides``, inside or outside a Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import vqtransformer.config  # noqa: F401  (resolvers)

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def taming_config(path: Path, yaml: str, overrides: dict[str, Any] | None = None) -> DictConfig:
    """Our config for a taming-transformers file and its project YAML: a Net2NetTransformer becomes a
    ``stage=transformer`` (first stage and condition VQ from the same file), a VQGAN a ``stage=vqgan``;
    ``data.resolution`` is the first stage's training resolution (the trained window; ``overrides`` may give the
    other ``data`` keys: where condition maps come from)."""
    model = taming.read_project(yaml, "taming_config")
    if taming.is_net2net(model):
        args = ["stage=transformer", f"first_stage.ckpt={path}", f"first_stage.taming_config={yaml}",
                f"transformer.pretrained={path}", f"transformer.taming_config={yaml}"]
    else:
        args = ["stage=vqgan", f"first_stage.pretrained={path}", f"first_stage.taming_config={yaml}",
                "first_stage.loss.perceptual=none"]
    resolution = int(taming.vqgan_params(model, "first_stage")["ddconfig"]["resolution"])
    cfg = compose_config(args + ["logger=none", f"data.resolution={resolution}"])
    with open_dict(cfg):
        if overrides and overrides.get("data") is not None:  # where condition maps come from; the resolution
            cfg.data = overrides["data"]                       # stays the one the model was trained at (its window)
            cfg.data.resolution = resolution
        for k, v in (overrides or {}).items():
            if k != "data":
                cfg[k] = OmegaConf.merge(cfg[k], v) if OmegaConf.is_config(cfg.get(k)) else v
        if taming.is_net2net(model) and taming.condition_of(model)["type"] == "class":
            cfg.conditioning.p_uncond = 0.0  # taming trained no null class: guidance stays off
    return cfg


def load_stage(ckpt: str | Path | None = None, run_id: str | None = None, taming_yaml: str | None = None,
               overrides: dict[str, Any] | None = None, tracking_uri: str | None = None) -> Loaded:
    """A stage from a checkpoint file, a run directory or an MLflow run id (ours: rebuilt from the config it
    carries, ``overrides`` merged into it), or from a taming-transformers file with its project YAML
    (``taming_yaml``). Weights loaded, on the CPU, eval mode."""
    path = checkpoint_path(ckpt, run_id, tracking_uri)
    with read_once():
        return _load_stage(path, load(path), taming_yaml, overrides, tracking_uri)


def _load_stage(path: Path, state: dict, taming_yaml: str | None, overrides: dict[str, Any] | None,
                tracking_uri: str | None) -> Loaded:
    if is_ours(state):
        if taming_yaml:
            raise ConfigError(f"taming_config={taming_yaml} is for taming-transformers checkpoints, but {path} is a "
                              "vqtransformer one; drop taming_config")
        cfg = config_of(state, path)
        if overrides:
            with open_dict(cfg):
                for k, v in overrides.items():
                    if "." not in k:
                        cfg[k] = v  # a whole group (data)
                        continue
                    if OmegaConf.select(cfg, k.rsplit(".", 1)[0]) is None:
                        raise ConfigError(f"{k.replace('.', '_')}={v}: {path} was trained without "
                                          f"{k.rsplit('.', 1)[0]} (it applies to text_encoder=clip models)")
                    OmegaConf.update(cfg, k, v, merge=True)  # one key (text_encoder.path)
        stage = build_stage(cfg, for_inference=True, tracking_uri=tracking_uri)
        stage.load_state_dict(state["model"])
        return Loaded(stage.eval(), cfg, path, int(state.get("step", 0) or 0), state.get("mlflow_run_id"))
    if not taming_yaml:
        raise CheckpointError(f"{path} carries no config: not written by vqtransformer. For a taming-transformers "
                              "checkpoint give its project YAML: taming_config=PATH/to/*-project.yaml")
    cfg = taming_config(path, taming_yaml, overrides)
    stage = build_stage(cfg, for_inference=True, tracking_uri=tracking_uri)
    stage.load_pretrained()  # the taming weights (for_inference skipped them)
    log.info("loaded taming-transformers %s (%s) as stage=%s", path, taming_yaml, stage.name)
    return Loaded(stage.eval(), cfg, path, int(state.get("global_step", 0) or 0), None)
