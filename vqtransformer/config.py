"""Config validation: one pass over the composed Hydra config before anything is built.

Hydra's struct mode already rejects unknown keys on the command line (it names the
key). Here we reject missing required values (``???``) and impossible combinations,
each with a message that names the key to change.
"""

from __future__ import annotations

import uuid

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from vqtransformer.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key."""


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("vqt.unique"):
        # one short id per process: sweep directories of two sweeps started in the same second differ
        OmegaConf.register_new_resolver("vqt.unique", lambda: uuid.uuid4().hex[:6], use_cache=True)


_register_resolvers()


def _missing_keys(cfg: DictConfig) -> list[str]:
    out = []

    def walk(node, prefix):
        for key in node.keys() if isinstance(node, DictConfig) else []:
            full = f"{prefix}.{key}" if prefix else str(key)
            if OmegaConf.is_missing(node, key):
                out.append(full)
            else:
                child = node._get_node(key)
                if isinstance(child, DictConfig):
                    walk(child, full)

    walk(cfg, "")
    return out


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# -- the schema of the public keys: type and range, checked before anything is built ---------------------
# (kind, low, high): kind int | float | bool | str | list[int] | list[float] | choice; a trailing "?" allows null.
# low / high are inclusive bounds (None: open); for "choice" low is the tuple of allowed values.
_GT0 = 1e-300  # "> 0" for floats
SCHEMA: dict[str, tuple] = {
    "trainer.max_steps": ("int", 1, None), "trainer.val_every": ("int", 1, None),
    "trainer.ckpt_every": ("int", 1, None), "trainer.log_every": ("int", 1, None),
    "trainer.val_batches": ("int", 1, None), "trainer.grad_accum": ("int", 1, None),
    "trainer.seed": ("int", 0, None), "trainer.grad_clip": ("float?", _GT0, None),
    "trainer.mixed_precision": ("choice", ("no", "fp16", "bf16"), None),
    "trainer.accelerator": ("choice", ("cpu", "gpu", "auto"), None), "trainer.channels_last": ("bool", None, None),
    "data.resolution": ("int", 8, None), "data.batch_size": ("int", 1, None), "data.num_workers": ("int", 0, None),
    "data.random_crop": ("bool", None, None), "data.flip": ("bool", None, None),
    "data.max_bad_fraction": ("float", 0.0, 1.0), "data.max_image_pixels": ("int", 1, None),
    "data.val_fraction": ("float", 0.0, 1.0), "data.seed": ("int", 0, None),
    "data.train_size": ("int", 1, None), "data.val_size": ("int", 1, None), "data.max_objects": ("int", 1, None),
    "data.background": ("choice", ("textured", "plain"), None), "data.object_scale": ("list[float]", _GT0, 1.0),
    "data.target": ("choice", ("image", "segmentation", "depth"), None), "data.num_classes": ("int", 0, None),
    "data.root": ("str?", None, None),
    "first_stage.ch": ("int", 1, None), "first_stage.z_channels": ("int", 1, None),
    "first_stage.ch_mult": ("list[int]", 1, None), "first_stage.num_res_blocks": ("int", 1, None),
    "first_stage.attn_resolutions": ("list[int]", 1, None), "first_stage.dropout": ("float", 0.0, 0.999),
    "first_stage.pretrained": ("str?", None, None), "first_stage.learning_rate": ("float?", _GT0, None),
    "first_stage.lr_schedule": ("choice", ("constant", "cosine"), None), "first_stage.warmup_steps": ("int", 0, None),
    "first_stage.min_lr_ratio": ("float", 0.0, 1.0), "first_stage.betas": ("list[float]?", 0.0, 0.9999),
    "first_stage.loss.pixel_loss": ("choice", ("l1", "mse"), None),
    "first_stage.ckpt": ("str?", None, None), "first_stage.run_id": ("str?", None, None),
    "first_stage.taming_config": ("str?", None, None), "transformer.taming_config": ("str?", None, None),
    "transformer.pretrained": ("str?", None, None), "transformer.sos_token": ("int", 0, None),
    "conditioning.taming_config": ("str?", None, None),
    "first_stage.loss.disc_lr_mult": ("float", _GT0, None), "first_stage.loss.disc_fm_weight": ("float", 0.0, None),
    "first_stage.loss.disc_start": ("int", 0, None), "first_stage.loss.disc_weight": ("float", 0.0, None),
    "first_stage.loss.disc_pretrain_steps": ("int", 0, None), "first_stage.loss.disc_ramp_steps": ("int", 0, None),
    "first_stage.loss.disc_factor": ("float", 0.0, None), "first_stage.loss.disc_num_layers": ("int", 1, None),
    "first_stage.loss.disc_ndf": ("int", 1, None), "first_stage.loss.disc_loss": ("choice", ("hinge", "vanilla"), None),
    "first_stage.loss.codebook_weight": ("float", 0.0, None), "first_stage.loss.pixelloss_weight": ("float", 0.0, None),
    "first_stage.loss.perceptual": ("choice", ("lpips", "none"), None),
    "first_stage.loss.perceptual_weight": ("float", 0.0, None),
    "first_stage.loss.lpips_net": ("choice", ("vgg", "alex", "squeeze"), None),
    "first_stage.loss.lpips_weights": ("str?", None, None),
    "codebook.n_embed": ("int", 2, None), "codebook.embed_dim": ("int", 1, None), "codebook.beta": ("float", 0.0, None),
    "codebook.ema": ("bool", None, None), "codebook.decay": ("float", 0.0, 1.0),
    "codebook.l2_normalize": ("bool", None, None), "codebook.restart_dead": ("bool", None, None),
    "codebook.dead_after": ("int", 1, None), "codebook.usage_window": ("int", 1, None), "codebook.init": ("str", None, None),
    "codebook.kind": ("choice", ("vq", "fsq", "lfq"), None), "codebook.levels": ("list[int]?", 2, None),
    "codebook.entropy_weight": ("float", 0.0, None), "codebook.diversity_gamma": ("float", 0.0, None),
    "codebook.decorrelation_weight": ("float", 0.0, None), "codebook.marginal_entropy_weight": ("float", 0.0, None),
    "transformer.n_layer": ("int", 1, None), "transformer.n_head": ("int", 1, None), "transformer.n_embd": ("int", 1, None),
    "transformer.block_size": ("int", 1, None), "transformer.embd_pdrop": ("float", 0.0, 0.999),
    "transformer.resid_pdrop": ("float", 0.0, 0.999), "transformer.attn_pdrop": ("float", 0.0, 0.999),
    "transformer.lr": ("float", _GT0, None), "transformer.weight_decay": ("float", 0.0, None),
    "transformer.warmup_steps": ("int", 0, None),
    "stage.learning_rate": ("float?", _GT0, None), "stage.base_learning_rate": ("float", _GT0, None),
    "stage.scale_lr": ("bool", None, None),
    "logger.experiment_name": ("str", None, None), "logger.tracking_uri": ("str?", None, None),
    "logger.run_name": ("str?", None, None), "logger.log_checkpoint": ("bool", None, None),
    "logger.retries": ("int", 0, None), "logger.flush_timeout": ("float", 0.0, None),
    "logger.finish_timeout": ("float", 0.0, None), "logger.max_buffered": ("int", 1, None),
}

_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "list[int]": "a list of integers, e.g. [1,2,2]", "list[float]": "a list of numbers, e.g. [0.1,0.3]"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _range_text(lo, hi) -> str:
    if lo == _GT0:
        return "> 0" if hi is None else f"in (0, {hi}]"
    if hi is None:
        return f">= {lo}"
    return f"between {lo} and {hi}"


def check_value(key: str, value, spec: tuple) -> None:
    """``ConfigError`` naming ``key`` when ``value`` does not fit ``spec`` (see ``SCHEMA``)."""
    kind, lo, hi = spec
    if kind.endswith("?"):
        if value is None:
            return
        kind = kind[:-1]
    shown = f"'{value}'" if isinstance(value, str) else value
    if kind == "choice":
        if value not in lo:
            raise ConfigError(f"{key}={shown} must be one of {', '.join(map(str, lo))}")
        return
    if kind.startswith("list"):
        from omegaconf import ListConfig

        elem_ok = _is_int if kind == "list[int]" else _is_num
        if not isinstance(value, (list, tuple, ListConfig)) or not all(elem_ok(x) for x in value):
            raise ConfigError(f"{key}={shown} must be {_KIND_WORDS[kind]}")
        bad = [x for x in value if (lo is not None and x < lo) or (hi is not None and x > hi)]
        if bad:
            raise ConfigError(f"{key}={list(value)}: every value must be {_range_text(lo, hi)}")
        return
    ok = {"int": _is_int, "float": _is_num, "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}[kind](value)
    if not ok:
        raise ConfigError(f"{key}={shown} must be {_KIND_WORDS[kind]}" + (f" {_range_text(lo, hi)}"
                                                                         if kind in ("int", "float") and lo is not None else ""))
    if kind == "str" and key == "logger.experiment_name" and not value.strip():
        raise ConfigError(f"{key} must not be empty")
    if kind in ("int", "float") and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        raise ConfigError(f"{key}={value} must be {_range_text(lo, hi)}")


def validate_schema(cfg: DictConfig) -> None:
    """Types and ranges of the public keys (``SCHEMA``) that this config has."""
    for key, spec in SCHEMA.items():
        node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if node is _ABSENT:
            continue
        check_value(key, node, spec)


_ABSENT = object()


def validate_paths(cfg: DictConfig) -> None:
    """Files and directories the config names must exist (checked before a run directory is made)."""
    from pathlib import Path

    dc = cfg.get("data") or {}
    if dc.get("name") in ("folder", "cifar10", "captions") and dc.get("root"):
        root = Path(str(dc.root)).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.root: directory '{root}' does not exist; set data.root=/path/to/images")
        captions = dc.get("captions_file") if dc.get("name") == "captions" else None
        if captions:  # relative: to the working directory, else to data.root (data/captioned.py)
            p = Path(str(captions)).expanduser()
            if not (p.is_file() or (not p.is_absolute() and (root / p).is_file())):
                raise ConfigError(f"data.captions_file: file '{captions}' does not exist (relative paths: to the "
                                  f"working directory or to data.root '{root}')")
    for key in ("train_list", "val_list"):
        if dc.get("name") == "filelist" and dc.get(key) and not Path(str(dc[key])).expanduser().is_file():
            raise ConfigError(f"data.{key}: file list '{dc[key]}' does not exist")
    fs = cfg.get("first_stage") or {}
    for key in ("ckpt", "pretrained"):
        if fs.get(key) and not Path(str(fs[key])).expanduser().exists():
            raise ConfigError(f"first_stage.{key}: checkpoint '{fs[key]}' does not exist")
    for group, key in (("first_stage", "taming_config"), ("transformer", "pretrained"), ("transformer", "taming_config"),
                       ("conditioning", "ckpt"), ("conditioning", "taming_config")):
        value = (cfg.get(group) or {}).get(key)
        if value and not Path(str(value)).expanduser().exists():
            raise ConfigError(f"{group}.{key}: file '{value}' does not exist")
    resume = (cfg.get("trainer") or {}).get("resume", False)
    if isinstance(resume, str) and resume not in ("true", "True", "false", "False", "auto"):
        p = Path(resume).expanduser()
        if not (p.is_file() or (p / "last.ckpt").is_file() or (p / "checkpoints" / "last.ckpt").is_file()):
            raise ConfigError(f"trainer.resume={resume}: no checkpoint there (a .ckpt file, or a run directory "
                              "with checkpoints/last.ckpt)")
    elif not isinstance(resume, (bool, str)) and resume is not None:
        raise ConfigError(f"trainer.resume={resume} must be true, false or a path")


class ValidateConfigCallback(Callback):
    """Hydra callback (``conf/config.yaml``: ``hydra.callbacks.validate``): ``python train.py ...`` checks the
    composed config before Hydra creates the run directory, so a bad value leaves nothing behind; it prints
    one line naming the key and exits 2. (Multiruns check each job in ``run_training``.)"""

    def __init__(self, **kwargs) -> None:
        pass

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        import copy
        import sys

        from omegaconf import open_dict

        task = copy.deepcopy(config)
        overrides = list(OmegaConf.select(config, "hydra.overrides.task", default=None) or [])
        with open_dict(task):
            task.pop("hydra", None)
        try:
            validate_config(task, overrides)
            validate_paths(task)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)


def validate_config(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """Check ``cfg`` (in place: the architecture of taming files is read from their YAMLs into it first,
    refusing ``overrides``, the command line's ``key=value``, that contradict them)."""
    missing = _missing_keys(cfg)
    if missing:
        raise ConfigError(f"missing required value for {', '.join(missing)}: set it on the command line, "
                          f"e.g. {missing[0]}=...")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationResolutionError) as e:
        raise ConfigError(f"config key {getattr(e, 'full_key', '')}: {e.msg if hasattr(e, 'msg') else e}") from e
    validate_schema(cfg)
    from vqtransformer.models.taming import apply_taming_configs

    apply_taming_configs(cfg, overrides)

    tc, dc = cfg.trainer, cfg.data
    _require(tc.max_steps >= 1, f"trainer.max_steps={tc.max_steps} must be >= 1")
    _require(tc.val_every >= 1, f"trainer.val_every={tc.val_every} must be >= 1")
    _require(tc.ckpt_every >= 1, f"trainer.ckpt_every={tc.ckpt_every} must be >= 1")
    _require(tc.grad_accum >= 1, f"trainer.grad_accum={tc.grad_accum} must be >= 1")
    _require(tc.mixed_precision in ("no", "fp16", "bf16"),
             f"trainer.mixed_precision='{tc.mixed_precision}' must be one of no, fp16, bf16")
    _require(dc.batch_size >= 1, f"data.batch_size={dc.batch_size} must be >= 1")
    _require(dc.resolution >= 8, f"data.resolution={dc.resolution} must be >= 8")
    _require(dc.num_workers >= 0, f"data.num_workers={dc.num_workers} must be >= 0")
    if cfg.logger.name not in ("mlflow", "none"):
        raise ConfigError(f"logger={cfg.logger.name} is unknown; use logger=mlflow or logger=none")

    if cfg.stage.name == "vqgan":
        _validate_vqgan(cfg)
    elif "first_stage" in cfg and cfg.stage.name in ("transformer", "vqdiffusion"):
        fs = cfg.first_stage
        _require(bool(fs.get("ckpt") or fs.get("run_id")),
                 f"stage={cfg.stage.name} needs a trained VQGAN: set first_stage.ckpt=PATH or first_stage.run_id=ID")


def _validate_vqgan(cfg: DictConfig) -> None:
    fs, cb, dc = cfg.first_stage, cfg.codebook, cfg.data
    factor = 2 ** (len(fs.ch_mult) - 1)
    _require(dc.resolution % factor == 0,
             f"data.resolution={dc.resolution} is not divisible by the downsampling factor f={factor} of "
             f"first_stage={fs.name} (ch_mult={list(fs.ch_mult)}); choose a resolution that is a multiple of {factor}")
    # a taming VQGAN keeps the resolution it was trained at (it places its attention layers); data may differ
    _require(fs.resolution == dc.resolution or bool(fs.get("taming_config")),
             f"first_stage.resolution={fs.resolution} differs from data.resolution={dc.resolution}")
    sizes = [fs.resolution // 2**i for i in range(len(fs.ch_mult))]
    bad = [r for r in fs.attn_resolutions if r not in sizes]
    _require(not bad, f"first_stage.attn_resolutions={list(fs.attn_resolutions)}: {bad} never occur at "
                      f"data.resolution={fs.resolution} (feature maps: {sizes})")
    for key in ("ch", "z_channels"):
        _require(fs[key] % 32 == 0, f"first_stage.{key}={fs[key]} must be a multiple of 32 (GroupNorm with 32 groups)")
    gmin = fs.get("norm_min_group_channels", 1)
    _require(gmin in (1, 2, 4, 8), f"first_stage.norm_min_group_channels={gmin} must be 1 (taming), 2, 4 or 8")
    for m in fs.ch_mult:
        _require((fs.ch * m) % 32 == 0, f"first_stage.ch*ch_mult must be multiples of 32 (GroupNorm); got ch={fs.ch}, "
                                        f"ch_mult={list(fs.ch_mult)}")
    _require(cb.n_embed >= 2, f"codebook.n_embed={cb.n_embed} must be >= 2")
    _require(cb.embed_dim >= 1, f"codebook.embed_dim={cb.embed_dim} must be >= 1")
    _require(0 <= cb.beta, f"codebook.beta={cb.beta} must be >= 0")
    target = dc.get("target", "image")
    _require(target in ("image", "segmentation", "depth"),
             f"data.target='{target}' must be image, segmentation or depth")
    if target != "image":
        _require(dc.name in ("shapes", "paired_folder"),
                 f"data.target={target} needs a dataset with {target} maps (data=shapes or data=paired_folder)")
    betas = fs.get("betas")
    _require(betas is None or len(betas) == 2, f"first_stage.betas={betas} must be two numbers [beta1, beta2] or null")
    lc = fs.loss
    _require(lc.disc_loss in ("hinge", "vanilla"), f"first_stage.loss.disc_loss='{lc.disc_loss}' must be hinge or vanilla")
    _require(lc.perceptual in ("lpips", "none"), f"first_stage.loss.perceptual='{lc.perceptual}' must be lpips or none")
