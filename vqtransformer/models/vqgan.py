"""VQGAN first stage (Esser, Rombach, Ommer 2021) — taming's ``VQModel`` layout.

``encoder`` -> ``quant_conv`` (1x1, z_channels -> embed_dim) -> ``quantize`` ->
``post_quant_conv`` (1x1, embed_dim -> z_channels) -> ``decoder``. The parameter names are
taming's, so a Lightning checkpoint of the original project loads one to one
(:mod:`vqtransformer.models.taming`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig

from vqtransformer.modules.autoencoder import Decoder, Encoder
from vqtransformer.modules.quantize import VectorQuantizer


class VQModel(nn.Module):
    def __init__(self, ddconfig: dict[str, Any], n_embed: int, embed_dim: int, quantizer: dict[str, Any] | None = None,
                 quantize_module: nn.Module | None = None):
        """``quantize_module`` (FSQ / LFQ, :func:`vqtransformer.modules.scalar_quantize.build_quantizer`)
        replaces the taming ``VectorQuantizer`` built from ``n_embed`` / ``embed_dim`` / ``quantizer``."""
        super().__init__()
        self.ddconfig = dict(ddconfig)
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = quantize_module if quantize_module is not None else VectorQuantizer(
            n_embed, embed_dim, **(quantizer or {}))
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)
        #: one-hot values of label maps given to this model: {-1, 1} (stage=vqgan data.target=segmentation);
        #: taming's segmentation VQ models were trained on {0, 1}
        self.label_values = (-1.0, 1.0)
        self.target = "image"  # what it encodes (its data.target): image | segmentation | depth
        self.checkpoint_path: str | None = None

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
        from vqtransformer.modules.scalar_quantize import build_quantizer

        # codebook.kind: vq (our taming-compatible VectorQuantizer) | fsq | lfq (vector-quantize-pytorch)
        return cls(ddconfig, codebook.n_embed, codebook.embed_dim, quantize_module=build_quantizer(codebook))

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
