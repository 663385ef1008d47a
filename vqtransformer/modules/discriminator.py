"""PatchGAN discriminator (Isola et al. 2017) as used by VQGAN, in taming's layout (``main.N``).

``norm``: ``batch`` (taming; its checkpoints load) | ``group`` | ``none`` (conv biases on).
"""

from __future__ import annotations

import torch.nn as nn


def weights_init(m: nn.Module) -> None:
    name = m.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif "BatchNorm" in name or "GroupNorm" in name:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4), channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"first_stage.loss.disc_norm must be batch, group or none, got '{kind}'")


class NLayerDiscriminator(nn.Module):
    """``n_layers`` strided 4x4 convs (ndf, 2ndf, ... up to 8ndf), norm, LeakyReLU(0.2); 1-channel patch logits."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        bias = norm == "none"
        seq = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=bias), _norm(norm, ndf * mult),
                    nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=bias), _norm(norm, ndf * mult),
                nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*seq)
        self.apply(weights_init)

    def forward(self, x):
        return self.main(x)
