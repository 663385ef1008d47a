"""VQGAN encoder and decoder (Esser et al. 2021), in taming-transformers' module layout.

``Encoder``: conv_in -> per level: num_res_blocks ResnetBlocks (+ AttnBlock at the
configured resolutions) and a strided-conv ``Downsample`` (all levels but the last)
-> mid (block, attention, block) -> GroupNorm, swish, conv_out to ``z_channels``.
``Decoder`` mirrors it with nearest-neighbour + conv ``Upsample``. Parameter names
(``down.0.block.1.norm1.weight``, ``mid.attn_1.q.weight``, ...) match taming's, so its
released checkpoints load without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def Normalize(channels: int, min_group_channels: int = 1) -> nn.GroupNorm:
    """taming's GroupNorm with 32 groups, or fewer so that every group has ``min_group_channels`` channels.

    Deviation (opt-in, ``first_stage.norm_min_group_channels``): with 32 groups, a 32-channel layer
    is an InstanceNorm that normalises every image's per-channel mean and scale (its colours) away
    at every layer, which slows small models down. At >= 128 channels (all of taming's models) the
    number of groups stays 32 for any value up to 4, so taming's checkpoints give identical outputs.
    """
    return nn.GroupNorm(num_groups=max(1, min(32, channels // max(1, min_group_channels))), num_channels=channels,
                        eps=1e-6, affine=True)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)  # swish


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)  # asymmetric padding below, as taming

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0, gmin: int = 1):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, gmin)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels, gmin)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (taming's q/k/v/proj_out)."""

    def __init__(self, channels: int, gmin: int = 1):
        super().__init__()
        self.norm = Normalize(channels, gmin)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        B, C, H, W = h.shape
        q, k, v = (t(h).reshape(B, 1, C, H * W).transpose(-1, -2) for t in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


def _check_geometry(resolution: int, ch_mult: Sequence[int], attn_resolutions: Sequence[int]) -> None:
    factor = 2 ** (len(ch_mult) - 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not divisible by the downsampling factor {factor} "
                         f"(2^(len(ch_mult)-1) with ch_mult={list(ch_mult)})")
    reachable = {resolution // 2**i for i in range(len(ch_mult))}
    bad = [r for r in attn_resolutions if r not in reachable]
    if bad:
        raise ValueError(f"attn_resolutions {bad} never occur at resolution {resolution} with ch_mult={list(ch_mult)} "
                         f"(feature-map sizes: {sorted(reachable, reverse=True)})")


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 in_channels: int, resolution: int, z_channels: int, dropout: float = 0.0, double_z: bool = False,
                 norm_min_group_channels: int = 1, **ignore):
        super().__init__()
        gmin = norm_min_group_channels
        _check_geometry(resolution, ch_mult, attn_resolutions)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout, gmin))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in, gmin))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, gmin)
        self.mid.attn_1 = AttnBlock(block_in, gmin)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, gmin)
        self.norm_out = Normalize(block_in, gmin)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int, dropout: float = 0.0,
                 norm_min_group_channels: int = 1, **ignore):
        super().__init__()
        gmin = norm_min_group_channels
        _check_geometry(resolution, ch_mult, attn_resolutions)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, gmin)
        self.mid.attn_1 = AttnBlock(block_in, gmin)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, gmin)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout, gmin))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in, gmin))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)  # up[i] is level i, as in taming
        self.norm_out = Normalize(block_in, gmin)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))
