"""The ORIGINAL taming-transformers code (PyPI ``taming-transformers-rom1504`` 0.0.6, a test-only dependency
installed with ``pip install --no-deps``: see the README, "Checkpoints of the original taming-transformers"),
its models built at random init and saved in the released layouts: a Lightning 1.x ``.ckpt`` (``state_dict``
plus ``callbacks`` keyed by ``ModelCheckpoint``, ``optimizer_states``, OmegaConf ``hyper_parameters``) and a
``*-project.yaml`` beside it.

Its ``models`` modules import ``pytorch_lightning`` and ``taming.main`` (Lightning's Trainer and callbacks),
and ``mingpt`` imports ``transformers.top_k_top_p_filtering``; none of that is used by the model code we
compare against (``__init__``, ``encode``, ``decode``, ``forward``, ``sample``). When those packages are absent
they are replaced, only while taming's modules are imported, by empty stand-ins (``LightningModule`` is
``nn.Module``); nothing of taming's own code is changed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

INSTALL = "pip install --no-deps taming-transformers-rom1504==0.0.6"


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__dict__.update(attrs)
    return m


@contextlib.contextmanager
def _stand_ins():
    """Empty ``pytorch_lightning`` / ``transformers`` modules in ``sys.modules`` while taming is imported (or,
    with a real ``transformers`` that no longer has it, a stand-in ``top_k_top_p_filtering`` on it)."""
    added = []

    def add(name, **attrs):
        if name not in sys.modules:
            sys.modules[name] = _module(name, **attrs)
            added.append(name)

    try:
        importlib.import_module("pytorch_lightning")
    except ImportError:
        class _Base:
            def __init__(self, *a, **k):
                pass

        class LightningModule(nn.Module):
            def print(self, *args, **kwargs):
                print(*args, **kwargs)

        add("pytorch_lightning", LightningModule=LightningModule, LightningDataModule=_Base,
            seed_everything=lambda seed: None)
        add("pytorch_lightning.trainer", Trainer=_Base)
        add("pytorch_lightning.callbacks", ModelCheckpoint=_Base, Callback=_Base, LearningRateMonitor=_Base)
        add("pytorch_lightning.utilities")
        add("pytorch_lightning.utilities.distributed", rank_zero_only=lambda f: f)
    def top_k_top_p_filtering(*a, **k):
        raise NotImplementedError("stand-in: not used by the compared code")

    patched = None
    try:
        real = importlib.import_module("transformers")
        if not hasattr(real, "top_k_top_p_filtering"):  # removed from transformers (4.40+); mingpt imports it
            patched = real
            real.top_k_top_p_filtering = top_k_top_p_filtering
    except ImportError:
        add("transformers", top_k_top_p_filtering=top_k_top_p_filtering)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)
        if patched is not None:
            del patched.top_k_top_p_filtering


def taming():
    """taming's modules: ``vqgan`` (VQModel), ``cond`` (Net2NetTransformer), ``disc`` (NLayerDiscriminator),
    ``mingpt``, ``main`` (instantiate_from_config)."""
    try:
        importlib.import_module("taming.modules.diffusionmodules.model")
    except ImportError:
        pytest.fail(f"the original taming-transformers code is not installed: {INSTALL} (make install does it)")
    with _stand_ins():
        mods = {name: importlib.import_module(f"taming.{path}") for name, path in
                (("vqgan", "models.vqgan"), ("cond", "models.cond_transformer"), ("mingpt", "modules.transformer.mingpt"),
                 ("disc", "modules.discriminator.model"), ("main", "main"))}
    return types.SimpleNamespace(**mods)


# -- configs in taming's layout -----------------------------------------------------------------------
def vqgan_params(n_embed=32, embed_dim=8, in_channels=3, attn=(8,), num_res_blocks=1, resolution=16,
                 disc=True) -> dict:
    """taming.models.vqgan.VQModel params (ddconfig as in its configs; small)."""
    loss = ({"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
             "params": {"disc_conditional": False, "disc_in_channels": in_channels, "disc_start": 10,
                        "disc_weight": 0.8, "codebook_weight": 1.0, "disc_num_layers": 2, "disc_ndf": 16}}
            if disc else {"target": "taming.modules.losses.DummyLoss"})
    return {"embed_dim": embed_dim, "n_embed": n_embed,
            "ddconfig": {"double_z": False, "z_channels": 32, "resolution": resolution, "in_channels": in_channels,
                         "out_ch": in_channels, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": num_res_blocks,
                         "attn_resolutions": list(attn), "dropout": 0.0},
            "lossconfig": loss}


def build_vqgan(T, params: dict, seed: int = 0):
    """taming's VQModel at random init (codes spread: N(0, 1)), with taming's NLayerDiscriminator under
    ``loss.discriminator`` when the loss config has one (built without LPIPS, whose weights need a download)."""
    torch.manual_seed(seed)
    p = {k: v for k, v in params.items() if k != "lossconfig"}
    model = T.vqgan.VQModel(lossconfig={"target": "taming.modules.losses.DummyLoss"}, **p)
    lp = params["lossconfig"].get("params")
    if lp:
        model.loss.discriminator = T.disc.NLayerDiscriminator(
            input_nc=lp["disc_in_channels"], n_layers=lp["disc_num_layers"], ndf=lp["disc_ndf"]).apply(T.disc.weights_init)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    return model.eval()


def net2net_params(vq: dict, kind: str, vocab: int, block_size: int, n_head: int = 4, sos_token: int = 0,
                   cond_vq: dict | None = None, n_classes: int = 5) -> dict:
    """taming.models.cond_transformer.Net2NetTransformer params (the layout of its configs)."""
    first = {"target": "taming.models.vqgan.VQModel",
             "params": {**{k: v for k, v in vq.items() if k != "lossconfig"},
                        "lossconfig": {"target": "taming.modules.losses.DummyLoss"}}}
    p = {"transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                                "params": {"vocab_size": vocab, "block_size": block_size, "n_layer": 2,
                                           "n_head": n_head, "n_embd": 32}},
         "first_stage_config": first, "first_stage_key": "image", "sos_token": sos_token}
    if kind == "none":
        p["cond_stage_config"] = "__is_unconditional__"
    elif kind == "class":
        p.update(cond_stage_key="class_label",
                 cond_stage_config={"target": "taming.modules.util.Labelator", "params": {"n_classes": n_classes}})
    else:
        p.update(cond_stage_key=kind, cond_stage_config={
            "target": "taming.models.vqgan.VQModel",
            "params": {**{k: v for k, v in cond_vq.items() if k != "lossconfig"},
                       "lossconfig": {"target": "taming.modules.losses.DummyLoss"}}})
    return p


def build_net2net(T, params: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = T.cond.Net2NetTransformer(**params)
    with torch.no_grad():  # spread the VQ codes, so that encodings use many of them
        model.first_stage_model.quantize.embedding.weight.normal_()
        if hasattr(model.cond_stage_model, "quantize"):
            model.cond_stage_model.quantize.embedding.weight.normal_()
    return model.eval()


# -- the released layouts --------------------------------------------------------------------------------
@contextlib.contextmanager
def _lightning_classes():
    """``ModelCheckpoint`` and ``AttributeDict`` under their real module paths, for pickling only."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint",
             "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"]
    saved = {n: sys.modules.get(n) for n in names}

    class ModelCheckpoint:
        pass

    class AttributeDict(dict):
        pass

    ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
    AttributeDict.__module__ = "pytorch_lightning.utilities.parsing"
    ModelCheckpoint.__qualname__, AttributeDict.__qualname__ = "ModelCheckpoint", "AttributeDict"
    for n in names:
        sys.modules[n] = _module(n)
    sys.modules[names[2]].ModelCheckpoint = ModelCheckpoint
    sys.modules[names[4]].AttributeDict = AttributeDict
    try:
        yield ModelCheckpoint, AttributeDict
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def save_released(model: nn.Module, model_target: str, params: dict, directory: Path, name: str,
                  extra_state: dict | None = None) -> tuple[Path, Path]:
    """``directory/name.ckpt`` as PyTorch Lightning 1.x wrote taming's checkpoints and
    ``directory/name-project.yaml`` as taming's ``configs`` folder holds it. Returns (ckpt, yaml)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update(extra_state or {})
    project = {"model": {"base_learning_rate": 4.5e-6, "target": model_target, "params": params}}
    with _lightning_classes() as (ModelCheckpoint, AttributeDict):
        ckpt = {"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8", "state_dict": state,
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25), "best_model_path": "x.ckpt"}},
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}},
                                      "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "params": [0]}]}],
                "lr_schedulers": [], "hparams_name": "kwargs",
                "hyper_parameters": AttributeDict(cfg=OmegaConf.create(project))}
        path = directory / f"{name}.ckpt"
        torch.save(ckpt, path)
    yaml = directory / f"{name}-project.yaml"
    OmegaConf.save(OmegaConf.create(project), yaml)
    return path, yaml


LPIPS_KEYS = {"loss.perceptual_loss.net.slice1.0.weight": torch.zeros(64, 3, 3, 3),
              "loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}


# -- shared by the parity tests (tests/models/test_vqgan_taming.py, test_convert_taming.py) -----------------
DTYPES = [pytest.param(torch.float64, 1e-10, id="float64"), pytest.param(torch.float32, 1e-5, id="float32")]
RES = 16  # 16 px -> 4x4 codes
SMALL = ["data.resolution=16", "data.batch_size=4", "data.val_size=8", "data.num_workers=0", "trainer.val_batches=1",
         "trainer.log_every=1", "logger=none"]


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def images(n: int = 2, res: int = RES, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(dtype)


def run_sample(args: list[str]):
    """``python sample.py ARGS``, in this process (sample.run on the composed config)."""
    from tests.conftest import compose

    return importlib.import_module("sample").run(compose(args, config_name="sample"))
