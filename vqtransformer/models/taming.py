"""The files of the original taming-transformers: project YAMLs and Lightning checkpoints.

A released model is a Lightning ``.ckpt`` (``state_dict`` plus Lightning's own entries, read by
:func:`vqtransformer.training.checkpoint.load`) with a ``*-project.yaml`` beside it. The YAML holds what no
tensor shows (a GPT's ``n_head``, the start token, the conditioning key, GroupNorm's 32 groups), so it is
the source of the architecture: ``first_stage.taming_config=PATH`` and ``transformer.taming_config=PATH``
(:func:`apply_taming_configs`) set our config keys from it and refuse command-line overrides that contradict it.
Loaded codes count as initialised (:func:`complete_vqgan_state`): fine-tuning does not re-initialise them.

Weights (taming name -> ours):

* VQGAN (``taming.models.vqgan.VQModel``, ``VQSegmentationModel``, ``VQNoDiscModel``): ``encoder.*``,
  ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, ``quantize.embedding.weight`` map one to one;
  ``loss.discriminator.*`` is the discriminator (stage=vqgan only). Dropped on purpose, and named in every
  error: ``loss.perceptual_loss.*`` (LPIPS, which we build from the ``lpips`` package), ``colorize``
  (the colour map a segmentation VQ uses for its image logs).
* GPT (``taming.modules.transformer.mingpt.GPT`` inside ``Net2NetTransformer``): ``transformer.*`` map one to
  one except the vocabulary (:func:`convert_transformer`); ``attn.mask`` is dropped (SDPA's causal mode).
  ``first_stage_model.*`` and ``cond_stage_model.*`` are the VQGANs of the image and of the condition.

Supported conditions: unconditional (``__is_unconditional__``, start token ``sos_token``), class
(``taming.modules.util.Labelator``) and segmentation / depth maps with their own VQ model. Taming feeds
label maps to a VQ model one-hot in {0, 1} (ours: {-1, 1}); its models keep that
(``VQModel.label_values``). Refused with a message: other permuters than the identity, ``n_unmasked``,
``downsample_cond_size``, coordinate and first-stage conditions, Gumbel quantizers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from vqtransformer.config import ConfigError

#: what the loaders drop on purpose from a taming file, and why (named in their errors)
DROPPED = {
    "loss.perceptual_loss.*": "taming's LPIPS; ours is built from the lpips package",
    "colorize": "the colour map a segmentation VQ uses for image logs",
    "transformer.blocks.*.attn.mask": "causal masks; SDPA's causal mode replaces them",
}
DISCRIMINATOR_DROPPED = {"loss.discriminator.*": "the discriminator; only stage=vqgan trains one"}

VQGAN_TARGETS = ("taming.models.vqgan.VQModel", "taming.models.vqgan.VQSegmentationModel",
                 "taming.models.vqgan.VQNoDiscModel")
NET2NET_TARGET = "taming.models.cond_transformer.Net2NetTransformer"
GPT_TARGET = "taming.modules.transformer.mingpt.GPT"
LABELATOR_TARGET = "taming.modules.util.Labelator"
IDENTITY_PERMUTER = "taming.modules.transformer.permuter.Identity"
#: Net2Net state-dict prefixes of the two VQ models, by the role they play here
PREFIX = {"first_stage": "first_stage_model.", "conditioning": "cond_stage_model."}

_BLOCK = re.compile(r"blocks\.(\d+)\.(ln1|ln2|attn\.key|attn\.query|attn\.value|attn\.proj|mlp\.0|mlp\.2)\.(weight|bias)$")


# -- project YAMLs ------------------------------------------------------------------------------------
def read_project(path: str | Path, key: str) -> dict[str, Any]:
    """The ``model`` section of a taming project YAML (``key`` names the config key that gave the path)."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}={path}: no such file (the *-project.yaml of the taming checkpoint)")
    try:
        project = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{key}={path}: not a readable YAML file ({' '.join(str(e).split())[:200]})") from None
    model = project.get("model") if isinstance(project, dict) else None
    if not isinstance(model, dict) or "target" not in model:
        raise ConfigError(f"{key}={path}: not a taming-transformers project YAML (no model.target)")
    model.setdefault("params", {})
    model["_path"], model["_key"] = str(p), key
    return model


def is_net2net(model: dict) -> bool:
    return model["target"] == NET2NET_TARGET


def vqgan_params(model: dict, role: str = "first_stage") -> dict[str, Any]:
    """The ``params`` of the VQGAN playing ``role`` (``first_stage`` | ``conditioning``) in a project: the model
    itself for a VQGAN YAML, ``first_stage_config`` / ``cond_stage_config`` for a Net2Net YAML."""
    where = f"{model['_key']}={model['_path']}"
    if is_net2net(model):
        node = model["params"].get("first_stage_config" if role == "first_stage" else "cond_stage_config")
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: this Net2NetTransformer has no VQ model as its "
                              f"{'first' if role == 'first_stage' else 'cond'} stage ({node!r})")
        target, params = node.get("target"), node.get("params", {})
    else:
        target, params = model["target"], model["params"]
    if target not in VQGAN_TARGETS:
        raise ConfigError(f"{where}: model target '{target}' is not supported (supported VQGANs: "
                          f"{', '.join(VQGAN_TARGETS)})")
    dd = params.get("ddconfig") or {}
    missing = [k for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution",
                           "in_channels", "out_ch") if k not in dd]
    if missing or "n_embed" not in params or "embed_dim" not in params:
        raise ConfigError(f"{where}: the VQGAN's params lack {missing + [k for k in ('n_embed', 'embed_dim') if k not in params]}")
    if dd.get("double_z", False):
        raise ConfigError(f"{where}: ddconfig.double_z=true is a KL autoencoder, not a VQGAN")
    if params.get("remap"):
        raise ConfigError(f"{where}: quantizer index remapping (remap={params['remap']}) is not supported")
    return {**params, "_target": target}


def ddconfig(params: dict) -> dict[str, Any]:
    """Our ``VQModel`` ddconfig from a taming VQGAN's params (GroupNorm with 32 groups, as taming)."""
    dd = params["ddconfig"]
    return {"ch": int(dd["ch"]), "ch_mult": [int(m) for m in dd["ch_mult"]], "num_res_blocks": int(dd["num_res_blocks"]),
            "attn_resolutions": [int(r) for r in dd["attn_resolutions"]], "dropout": float(dd.get("dropout", 0.0)),
            "in_channels": int(dd["in_channels"]), "out_ch": int(dd["out_ch"]), "resolution": int(dd["resolution"]),
            "z_channels": int(dd["z_channels"]), "double_z": False, "norm_min_group_channels": 1}


def discriminator_params(params: dict) -> dict[str, Any] | None:
    """(num_layers, ndf, norm) of the VQGAN's discriminator, or None (DummyLoss / no discriminator)."""
    loss = params.get("lossconfig") or {}
    if not str(loss.get("target", "")).endswith("VQLPIPSWithDiscriminator"):
        return None
    lp = loss.get("params") or {}
    if lp.get("use_actnorm", False):
        raise ConfigError(f"{params.get('_key', 'taming_config')}: discriminators with ActNorm (use_actnorm=true) "
                          "are not supported")
    return {"disc_num_layers": int(lp.get("disc_num_layers", 3)), "disc_ndf": int(lp.get("disc_ndf", 64)),
            "disc_norm": "batch", "disc_in_channels": int(lp.get("disc_in_channels", 3))}


def vqgan_config_keys(params: dict) -> dict[str, Any]:
    """Our config keys (first_stage.*, codebook.*) for training the VQGAN of ``params`` (stage=vqgan)."""
    dd = ddconfig(params)
    keys = {f"first_stage.{k}": dd[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels",
                                                 "resolution")}
    keys.update({"first_stage.norm_min_group_channels": 1, "codebook.kind": "vq",
                 "codebook.n_embed": int(params["n_embed"]), "codebook.embed_dim": int(params["embed_dim"]),
                 "codebook.l2_normalize": False})
    disc = discriminator_params(params)
    if disc:
        keys.update({f"first_stage.loss.{k}": disc[k] for k in ("disc_num_layers", "disc_ndf", "disc_norm")})
    return keys


# -- GPT ----------------------------------------------------------------------------------------------
def condition_of(model: dict) -> dict[str, Any]:
    """Our conditioning of a Net2Net project: ``{"type", "num_classes"?, "key"}``."""
    where = f"{model['_key']}={model['_path']}"
    p = model["params"]
    cond = p.get("cond_stage_config")
    key = p.get("cond_stage_key", "depth")
    if p.get("unconditional", False) or cond == "__is_unconditional__":
        return {"type": "none", "key": None}
    if cond == "__is_first_stage__":
        raise ConfigError(f"{where}: conditioning on the first stage's own codes (__is_first_stage__) is not supported")
    target = cond.get("target") if isinstance(cond, dict) else None
    if target == LABELATOR_TARGET:
        return {"type": "class", "num_classes": int(cond["params"]["n_classes"]), "key": key}
    if target in VQGAN_TARGETS and key in ("segmentation", "depth"):
        return {"type": key, "key": key}
    raise ConfigError(f"{where}: condition stage '{target or cond}' with cond_stage_key '{key}' is not supported "
                      "(supported: __is_unconditional__, Labelator classes, a VQGAN of segmentation or depth maps)")


def gpt_params(model: dict) -> dict[str, Any]:
    """The checked architecture of a Net2Net project's GPT (``transformer_config.params``) and its sos token."""
    where = f"{model['_key']}={model['_path']}"
    if not is_net2net(model):
        raise ConfigError(f"{where}: model target '{model['target']}' is not a {NET2NET_TARGET}")
    p = model["params"]
    tc = p.get("transformer_config") or {}
    if tc.get("target") != GPT_TARGET:
        raise ConfigError(f"{where}: transformer target '{tc.get('target')}' is not supported (only {GPT_TARGET})")
    permuter = (p.get("permuter_config") or {}).get("target", IDENTITY_PERMUTER)
    if permuter != IDENTITY_PERMUTER:
        raise ConfigError(f"{where}: permuter '{permuter}' is not supported (only raster order, {IDENTITY_PERMUTER})")
    if int(p.get("downsample_cond_size", -1)) > -1:
        raise ConfigError(f"{where}: downsample_cond_size={p['downsample_cond_size']} is not supported")
    g = tc.get("params") or {}
    if int(g.get("n_unmasked", 0)):
        raise ConfigError(f"{where}: n_unmasked={g['n_unmasked']} (a partly non-causal mask) is not supported")
    missing = [k for k in ("vocab_size", "block_size") if k not in g]
    if missing:
        raise ConfigError(f"{where}: transformer_config.params lacks {missing}")
    # taming's defaults (mingpt.GPT.__init__) for what the YAML does not say
    return {"vocab_size": int(g["vocab_size"]), "block_size": int(g["block_size"]), "n_layer": int(g.get("n_layer", 12)),
            "n_head": int(g.get("n_head", 8)), "n_embd": int(g.get("n_embd", 256)),
            "embd_pdrop": float(g.get("embd_pdrop", 0.0)), "resid_pdrop": float(g.get("resid_pdrop", 0.0)),
            "attn_pdrop": float(g.get("attn_pdrop", 0.0)), "sos_token": int(p.get("sos_token", 0)),
            "first_stage_key": p.get("first_stage_key", "image")}


def transformer_config_keys(model: dict) -> dict[str, Any]:
    """Our config keys (transformer.*, conditioning.*) for the GPT of a Net2Net project."""
    g, cond = gpt_params(model), condition_of(model)
    keys = {f"transformer.{k}": g[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "embd_pdrop",
                                              "resid_pdrop", "attn_pdrop", "sos_token")}
    keys["conditioning.type"] = cond["type"]
    if cond["type"] == "class":
        keys["conditioning.num_classes"] = cond["num_classes"]
    return keys


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def state_dict_of(ckpt: dict) -> dict[str, torch.Tensor]:
    """The Lightning checkpoint's ``state_dict`` (or the dict itself, for a bare state dict)."""
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError("not a taming-transformers checkpoint: no state_dict of tensors")
    return state


def convert_transformer(state: dict[str, torch.Tensor], n_embed: int, conditioning: str = "none",
                        cond_vocab_size: int | None = None, sos_token: int = 0) -> dict[str, torch.Tensor]:
    """Taming ``transformer.*`` weights -> :class:`~vqtransformer.models.gpt.GPT` state dict.

    Taming shares one embedding table between image codes and condition ids (class y is row y, a
    segmentation code k is row k, the start token is row ``sos_token``); ours keeps image codes in rows
    ``[0, n_embed)`` and condition tokens after them. So ``tok_emb`` = taming rows ``[0, n_embed)``, then the
    condition rows (``[sos_token]`` for ``none``, ``[0, cond_vocab_size)`` otherwise, plus a null-token row for
    ``class``: the mean class row, as taming models had no label dropout); ``head`` = taming rows
    ``[0, n_embed)`` (logits of ids that are no image code are dropped). Every other ``transformer.*`` weight
    but the attention masks is passed on unchanged, so that one this GPT does not have is an error when loaded.
    """
    tr = _prefixed(state, "transformer.")
    for k in ("tok_emb.weight", "pos_emb", "ln_f.weight", "ln_f.bias", "head.weight"):
        if k not in tr:
            raise ConfigError(f"not a taming Net2NetTransformer checkpoint: 'transformer.{k}' is missing")
    tok, head = tr["tok_emb.weight"], tr["head.weight"]
    vocab = tok.shape[0]
    if n_embed > vocab:
        raise ConfigError(f"the first stage has {n_embed} codes but the taming transformer's vocabulary only {vocab}: "
                          "another first stage than the one it was trained on?")
    if conditioning == "none":
        if not 0 <= sos_token < vocab:
            raise ConfigError(f"transformer.sos_token={sos_token} is outside the taming vocabulary [0, {vocab})")
        cond_rows = tok[[sos_token]]
    else:
        if not cond_vocab_size or cond_vocab_size > vocab:
            raise ConfigError(f"{cond_vocab_size} condition tokens do not fit the taming vocabulary of {vocab} "
                              f"(conditioning={conditioning})")
        cond_rows = tok[:cond_vocab_size]
        if conditioning == "class":
            cond_rows = torch.cat((cond_rows, cond_rows.mean(0, keepdim=True)))
    out = {"tok_emb.weight": torch.cat((tok[:n_embed], cond_rows)).clone(), "head.weight": head[:n_embed].clone()}
    for k, v in tr.items():
        if k not in ("tok_emb.weight", "head.weight") and not k.endswith("attn.mask"):
            out[k] = v
    return out


def gpt_config(gpt_state: dict[str, torch.Tensor], n_head: int, n_embed: int) -> dict[str, int]:
    """GPT constructor arguments implied by a converted state dict (``n_head`` is in no weight)."""
    n_layer = 1 + max((int(m.group(1)) for k in gpt_state if (m := _BLOCK.match(k))), default=-1)
    block_size, n_embd = gpt_state["pos_emb"].shape[1:]
    return {"vocab_size": n_embed, "cond_vocab_size": gpt_state["tok_emb.weight"].shape[0] - n_embed,
            "block_size": block_size, "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd}


# -- VQGAN weights ------------------------------------------------------------------------------------
def split_vqgan_state(state: dict[str, torch.Tensor], prefix: str = "") -> tuple[dict, dict, dict[str, str]]:
    """(VQModel weights, discriminator weights, dropped) of the VQGAN under ``prefix`` of a taming state dict.

    ``loss.discriminator.*`` becomes the discriminator; ``loss.perceptual_loss.*`` and ``colorize`` are dropped
    (``dropped`` says which, and why); every other key is passed on, so that a weight the model does not have
    is an error when it is loaded."""
    state = _prefixed(state, prefix) if prefix else state
    model, disc, dropped = {}, {}, {}
    for k, v in state.items():
        if k.startswith("loss.discriminator."):
            disc[k[len("loss.discriminator."):]] = v
        elif k.startswith("loss.perceptual_loss."):
            dropped["loss.perceptual_loss.*"] = DROPPED["loss.perceptual_loss.*"]
        elif k == "colorize":
            dropped["colorize"] = DROPPED["colorize"]
        else:
            model[k] = v
    if not any(k.startswith("encoder.") for k in model):
        raise ConfigError(f"not a taming VQGAN checkpoint: no '{prefix}encoder.*' weights in its state_dict")
    return model, disc, dropped


def complete_vqgan_state(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with what our quantizer derives from loaded codes (``VectorQuantizer.complete_state``: the
    initialised flag, fresh bookkeeping, EMA statistics), so that a strict load checks only real weights."""
    return model.quantize.complete_state(dict(state), "quantize.")


def build_vqmodel(params: dict, codebook: dict | None = None):
    """Our ``VQModel`` with the architecture of a taming VQGAN's params (weights not loaded).
    ``codebook``: our quantizer options (init, ema, restart_dead, ...) for fine-tuning; default the taming one."""
    from vqtransformer.models.vqgan import VQModel

    model = VQModel(ddconfig(params), int(params["n_embed"]), int(params["embed_dim"]),
                    quantizer={"init": "uniform", **(codebook or {})})
    return model


# -- the architecture comes from the YAML: set it, refuse contradicting overrides ---------------------------
def _override_keys(overrides: list[str] | None) -> dict[str, str]:
    """``{dotted key: raw value}`` of command-line overrides (group choices as ``group``)."""
    out = {}
    for o in overrides or []:
        if "=" not in o:
            continue
        key, value = o.split("=", 1)
        out[key.lstrip("+~")] = value
    return out


def _value(cfg: DictConfig, key: str):
    v = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def _set(cfg: DictConfig, key: str, value) -> None:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    with open_dict(node):
        node[leaf] = value


def apply_taming_configs(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read the architecture from taming project YAMLs into ``cfg`` (in place) and return what was set:

    * ``first_stage.taming_config`` with ``stage=vqgan`` (fine-tuning a taming VQGAN, ``first_stage.pretrained``):
      ``first_stage.{ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution,
      norm_min_group_channels}``, ``codebook.{kind, n_embed, embed_dim, l2_normalize}``, the discriminator's
      ``first_stage.loss.{disc_num_layers, disc_ndf, disc_norm}``;
    * ``transformer.taming_config`` with ``stage=transformer`` (``transformer.pretrained``): ``transformer.{n_layer,
      n_head, n_embd, block_size, *_pdrop, sos_token}``, ``conditioning.type`` (and ``num_classes``); a map
      condition's VQ model defaults to the Net2Net file's own (``conditioning.ckpt`` / ``taming_config``).

    A key that ``overrides`` (the command line, ``key=value``) sets to another value is refused with a
    :class:`ConfigError` naming both; preset values are simply replaced. Idempotent."""
    given = _override_keys(overrides)
    stage = _value(cfg, "stage.name")
    changes: dict[str, tuple[Any, str]] = {}
    fs_yaml = _value(cfg, "first_stage.taming_config")
    if fs_yaml and stage == "vqgan":
        params = vqgan_params(read_project(fs_yaml, "first_stage.taming_config"), "first_stage")
        for k, v in vqgan_config_keys(params).items():
            changes[k] = (v, f"first_stage.taming_config={fs_yaml}")
        if _value(cfg, "first_stage.embed_dim") is not None:
            changes["first_stage.embed_dim"] = (int(params["embed_dim"]), f"first_stage.taming_config={fs_yaml}")
        channels = ddconfig(params)["in_channels"]
        if _value(cfg, "data.target") not in (None, "image") or channels != 3:
            raise ConfigError(f"first_stage.taming_config={fs_yaml}: a VQGAN of {channels} input channels; "
                              f"stage=vqgan fine-tunes taming's image VQGANs (3 channels, data.target=image) only")
    tr_yaml = _value(cfg, "transformer.taming_config")
    if tr_yaml and stage == "transformer":
        model = read_project(tr_yaml, "transformer.taming_config")
        for k, v in transformer_config_keys(model).items():
            changes[k] = (v, f"transformer.taming_config={tr_yaml}")
        ctype = condition_of(model)["type"]
        if ctype in ("segmentation", "depth") and not (_value(cfg, "conditioning.ckpt") or _value(cfg, "conditioning.run_id")):
            pretrained = _value(cfg, "transformer.pretrained")
            if pretrained:  # the condition's VQ model is inside the Net2Net file
                changes["conditioning.ckpt"] = (pretrained, "transformer.pretrained")
                changes["conditioning.taming_config"] = (tr_yaml, "transformer.taming_config")
    for key, (value, source) in changes.items():
        current = _value(cfg, key)
        group = key.split(".", 1)[0]
        if key in given and current != value:
            raise ConfigError(f"{key}={given[key]} contradicts {source} (which has {value}): the architecture comes "
                              f"from the taming config; drop the override {key}=...")
        if key == "conditioning.type" and group in given and current != value:
            raise ConfigError(f"conditioning={given[group]} (conditioning.type={current}) contradicts {source} "
                              f"(a {value} model); drop the override or choose conditioning={value}")
        if current != value:
            _set(cfg, key, value)
    return {k: v for k, (v, _) in changes.items()}
