"""GAN objectives shared by the VQGAN and ViTGAN stages."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating (logistic) discriminator loss."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """hinge: -E[D(G(z))] (taming); vanilla: non-saturating -log sigmoid(D(G(z)))."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "vanilla":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got '{kind}'")


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
