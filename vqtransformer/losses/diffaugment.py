"""DiffAugment (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training", 2020).

Random, differentiable transforms applied to both real and generated images before the
discriminator, so that D never sees un-augmented images and G's gradients pass through the
augmentation. Images are ``[B, C, H, W]`` in [-1, 1]; each image draws its own parameters.

``strength`` scales every magnitude: 1 is the original DiffAugment (brightness +-0.5,
saturation x[0, 2], contrast x[0.5, 1.5], translation up to 1/8 of the side, cutout of half the
side); 0 is the identity.
"""

from __future__ import annotations

import torch


def _rand(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)


def brightness(x: torch.Tensor, strength: float) -> torch.Tensor:
    return x + (_rand(x) - 0.5) * strength


def saturation(x: torch.Tensor, strength: float) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (1 + (2 * _rand(x) - 1) * strength) + mean


def contrast(x: torch.Tensor, strength: float) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (1 + (_rand(x) - 0.5) * strength) + mean


def translation(x: torch.Tensor, strength: float, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio * strength`` of its size, filling with zeros."""
    B, C, H, W = x.shape
    sh, sw = int(H * ratio * strength + 0.5), int(W * ratio * strength + 0.5)
    if sh == 0 and sw == 0:
        return x
    ty = torch.randint(-sh, sh + 1, (B, 1, 1), device=x.device)
    tx = torch.randint(-sw, sw + 1, (B, 1, 1), device=x.device)
    iy = torch.arange(H, device=x.device).view(1, H, 1) + ty  # [B, H, 1]
    ix = torch.arange(W, device=x.device).view(1, 1, W) + tx  # [B, 1, W]
    inside = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)  # [B, H, W]
    idx = (iy.clamp(0, H - 1) * W + ix.clamp(0, W - 1)).view(B, 1, H * W).expand(B, C, H * W)
    out = x.flatten(2).gather(2, idx).view(B, C, H, W)
    return out * inside.unsqueeze(1).to(x.dtype)


def cutout(x: torch.Tensor, strength: float, ratio: float = 0.5) -> torch.Tensor:
    """Zero one square of ``ratio * strength`` of the side per image, at a random centre."""
    B, C, H, W = x.shape
    ch, cw = int(H * ratio * strength + 0.5), int(W * ratio * strength + 0.5)
    if ch == 0 or cw == 0:
        return x
    cy = torch.randint(0, H + (1 - ch % 2), (B, 1, 1), device=x.device) - ch // 2
    cx = torch.randint(0, W + (1 - cw % 2), (B, 1, 1), device=x.device) - cw // 2
    iy = torch.arange(H, device=x.device).view(1, H, 1)
    ix = torch.arange(W, device=x.device).view(1, 1, W)
    hole = (iy >= cy) & (iy < cy + ch) & (ix >= cx) & (ix < cx + cw)  # [B, H, W]
    return x * (~hole).unsqueeze(1).to(x.dtype)


POLICIES = {
    "color": (brightness, saturation, contrast),
    "translation": (translation,),
    "cutout": (cutout,),
}


def DiffAugment(x: torch.Tensor, policy: str = "color,translation,cutout", strength: float = 1.0) -> torch.Tensor:
    """Apply the comma-separated ``policy`` (of ``color``, ``translation``, ``cutout``) in order."""
    if strength <= 0 or not policy:
        return x
    for name in policy.split(","):
        name = name.strip()
        if name not in POLICIES:
            raise ValueError(f"unknown DiffAugment policy '{name}' (vitgan.augment.policy; "
                             f"choose from {sorted(POLICIES)})")
        for f in POLICIES[name]:
            x = f(x, strength)
    return x
