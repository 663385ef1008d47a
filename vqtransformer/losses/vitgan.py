"""ViTGAN losses: non-saturating GAN loss, balanced consistency regularisation, R1."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss_nonsat(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``E[softplus(-D(x))] + E[softplus(D(G(z)))]`` = ``-log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))``."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss_nonsat(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``E[softplus(-D(G(z)))]`` = ``-log sigmoid(D(G(z)))``."""
    return F.softplus(-fake_logits).mean()


def consistency(logits: torch.Tensor, logits_aug: torch.Tensor) -> torch.Tensor:
    """bCR term (Zhao et al., 2021): ``E ||D(x) - D(T(x))||^2``, gradients through both views."""
    return (logits - logits_aug).square().mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al., 2018): ``E ||grad_x D(x)||^2`` on reals (times gamma/2 by the caller)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()
