"""Config validation: one pass over the composed Hydra config before anything is built.

Hydra's struct mode already rejects unknown keys on the command line (it names the
key). Here we reject missing required values (``???``) and impossible combinations,
each with a message that names the key to change.
"""

from __future__ import annotations

import uuid

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue


class ConfigError(ValueError):
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


def validate_config(cfg: DictConfig) -> None:
    missing = _missing_keys(cfg)
    if missing:
        raise ConfigError(f"missing required value for {', '.join(missing)}: set it on the command line, "
                          f"e.g. {missing[0]}=...")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationResolutionError) as e:
        raise ConfigError(f"config key {getattr(e, 'full_key', '')}: {e.msg if hasattr(e, 'msg') else e}") from e

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
    _require(fs.resolution == dc.resolution,
             f"first_stage.resolution={fs.resolution} differs from data.resolution={dc.resolution}")
    sizes = [dc.resolution // 2**i for i in range(len(fs.ch_mult))]
    bad = [r for r in fs.attn_resolutions if r not in sizes]
    _require(not bad, f"first_stage.attn_resolutions={list(fs.attn_resolutions)}: {bad} never occur at "
                      f"data.resolution={dc.resolution} (feature maps: {sizes})")
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
    lc = fs.loss
    _require(lc.disc_loss in ("hinge", "vanilla"), f"first_stage.loss.disc_loss='{lc.disc_loss}' must be hinge or vanilla")
    _require(lc.perceptual in ("lpips", "none"), f"first_stage.loss.perceptual='{lc.perceptual}' must be lpips or none")
