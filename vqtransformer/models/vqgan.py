"""VQGAN first stage (Esser, Rombach, Ommer 2021) — taming's ``VQModel`` layout.

``encoder`` -> ``quant_conv`` (1x1, z_channels -> embed_dim) -> ``quantize`` ->
``post_quant_conv`` (1x1, embed_dim -> z_channels) -> ``decoder``. A Lightning
checkpoint of the original project (``state_dict`` with ``encoder.*``, ``decoder.*``,
``quant_conv.*``, ``post_quant_conv.*``, ``quantize.embedding.weight``, ``loss.*``) loads
with :func:`split_taming_state_dict`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig

from vqtransformer.modules.autoencoder import Decoder, Encoder
from vqtransformer.modules.quantize import VectorQuantizer


class VQModel(nn.Module):
    def __init__(self, ddconfig: dict[str, Any], n_embed: int, embed_dim: int, quantizer: dict[str, Any] | None = None):
        super().__init__()
        self.ddconfig = dict(ddconfig)
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, **(quantizer or {}))
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)

    @classmethod
    def from_config(cls, first_stage: DictConfig, codebook: DictConfig, in_channels: int = 3,
                    out_channels: int | None = None) -> VQModel:
        ddconfig = {
            "ch": first_stage.ch, "ch_mult": list(first_stage.ch_mult), "num_res_blocks": first_stage.num_res_blocks,
            "attn_resolutions": list(first_stage.attn_resolutions), "dropout": first_stage.get("dropout", 0.0),
            "in_channels": in_channels, "out_ch": out_channels or in_channels,
            "resolution": first_stage.resolution, "z_channels": first_stage.z_channels, "double_z": False,
            # 1 = taming's 32 groups everywhere (also what checkpoints without the key were trained with)
            "norm_min_group_channels": int(first_stage.get("norm_min_group_channels", 1) or 1),
        }
        quantizer = {k: codebook[k] for k in ("beta", "ema", "decay", "l2_normalize", "restart_dead", "dead_after",
                                             "usage_window", "init") if k in codebook}
        return cls(ddconfig, codebook.n_embed, codebook.embed_dim, quantizer)

    def encode(self, x: torch.Tensor):
        h = self.quant_conv(self.encoder(x))
        return self.quantize(h)  # (quant, emb_loss, info)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x: torch.Tensor):
        quant, emb_loss, info = self.encode(x)
        return self.decode(quant), emb_loss, info

    @torch.no_grad()
    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> code indices [B, H/f, W/f]."""
        return self.encode(x)[2]["indices"]

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices [B, h, w] -> images [B, C, h*f, w*f]."""
        return self.decode(self.quantize.get_codebook_entry(indices))

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight


def split_taming_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split a taming ``VQModel`` state dict into (VQModel weights, discriminator weights).

    ``loss.discriminator.*`` becomes the discriminator; ``loss.perceptual_loss.*`` (LPIPS,
    which we build from the lpips package) is dropped; EMA buffers named
    ``quantize.embedding.{cluster_size,embed_avg}`` map to ours.
    """
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model, disc = {}, {}
    for k, v in state.items():
        if k.startswith("loss.discriminator."):
            disc[k[len("loss.discriminator."):]] = v
        elif k.startswith("loss."):
            continue
        elif k in ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg"):
            model["quantize." + k.rsplit(".", 1)[1]] = v
        else:
            model[k] = v
    if not any(k.startswith("encoder.") for k in model):
        raise ValueError("not a taming VQModel checkpoint: no 'encoder.*' weights in its state_dict")
    return model, disc
