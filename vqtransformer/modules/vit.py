"""ViTGAN building blocks (Lee et al., "ViTGAN: Training GANs with Vision Transformers", ICLR 2022).

Generator side: self-modulated LayerNorm (:class:`SLN`), Fourier position embedding
(:class:`FourierEmbedding`), the implicit neural representation that turns each output
patch embedding into pixels (:class:`SirenPatchDecoder`, built from StyleGAN2
:class:`ModulatedLinear` layers with sine activations) and its linear ablation
(:class:`LinearPatchDecoder`).

Discriminator side: L2-distance self-attention with tied query/key projections
(:class:`L2SelfAttention`) and Improved Spectral Normalization (:class:`ImprovedSpectralNorm`,
:func:`apply_isn`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize


def grid_coords(n: int) -> torch.Tensor:
    """Coordinates of an ``n x n`` grid scaled to [-1, 1], row-major (y, x): ``[n*n, 2]``."""
    t = torch.linspace(-1.0, 1.0, n) if n > 1 else torch.zeros(1)
    y, x = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([y, x], dim=-1).reshape(n * n, 2)


def patches_to_image(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """Stitch ``[B, grid*grid, P*P, C]`` patches (row-major, pixels row-major) into ``[B, C, H, W]``."""
    B, L, PP, C = patches.shape
    P = math.isqrt(PP)
    x = patches.view(B, grid, grid, P, P, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, grid * P, grid * P)


# --------------------------------------------------------------------------- generator
class SLN(nn.Module):
    """Self-modulated LayerNorm: ``SLN(h, w) = gamma(w) * (h - mu) / sigma + beta(w)``.

    ``gamma`` and ``beta`` are affine maps of the latent ``w`` (``gamma = 1 + A_gamma w`` so
    that it starts around 1, as in the public code); the normalisation itself has no
    parameters.
    """

    def __init__(self, n_embd: int, w_dim: int):
        super().__init__()
        self.ln = nn.LayerNorm(n_embd, elementwise_affine=False)
        self.gamma = nn.Linear(w_dim, n_embd)
        self.beta = nn.Linear(w_dim, n_embd)
        nn.init.zeros_(self.gamma.bias)
        nn.init.zeros_(self.beta.bias)

    def forward(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``h``: ``[B, L, n_embd]``; ``w``: ``[B, w_dim]``."""
        return (1 + self.gamma(w)).unsqueeze(1) * self.ln(h) + self.beta(w).unsqueeze(1)


class FourierEmbedding(nn.Module):
    """Learned Fourier features of coordinates ``p`` in [-1, 1]: ``E_fou(p) = sin(W p + b)``.

    ``W ~ N(0, (pi * scale)^2)`` so that at init the features span about one period over the
    grid; ``W`` and the phase ``b`` (which keeps ``E_fou`` from being odd in ``p``) are trained.
    """

    def __init__(self, in_dim: int, dim: int, scale: float = 1.0):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        nn.init.normal_(self.proj.weight, std=math.pi * scale)
        nn.init.uniform_(self.proj.bias, -math.pi, math.pi)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.proj(p))


class ModulatedLinear(nn.Module):
    """StyleGAN2 weight modulation / demodulation for a per-pixel linear layer.

    ``w'_oi = w_oi * s_i`` with the style ``s = A(y)`` (bias init 1), then, if ``demodulate``,
    ``w''_oi = w'_oi / sqrt(sum_i w'_oi^2 + eps)``. Computed without materialising per-sample
    weights: ``out = ((x * s) @ W^T) * d``, the StyleGAN2 "non-fused" form.
    """

    def __init__(self, in_features: int, out_features: int, style_dim: int, demodulate: bool = True,
                 eps: float = 1e-8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.modulation = nn.Linear(style_dim, in_features)
        nn.init.ones_(self.modulation.bias)
        self.demodulate = demodulate
        self.eps = eps

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, T, in]`` (``T`` pixels of sample ``n``); ``style``: ``[N, style_dim]``."""
        s = self.modulation(style)  # [N, in]
        y = (x * s.unsqueeze(1)) @ self.weight.t()
        if self.demodulate:
            d = torch.rsqrt(s.square() @ self.weight.square().t() + self.eps)  # [N, out]
            y = y * d.unsqueeze(1)
        return y + self.bias


class SirenPatchDecoder(nn.Module):
    """Implicit neural representation of a patch: ``x_i = f_theta(E_fou, y_i)``.

    ``E_fou`` are Fourier features of the ``P x P`` pixel coordinates inside a patch (in
    [-1, 1], shared by all patches; the first SIREN layer). They pass through ``depth``
    modulated, demodulated linear layers with sine activations ``sin(w0 * .)``, then a
    modulated (not demodulated) linear layer to RGB. Every layer's weights are modulated by
    the patch embedding ``y_i``. Demodulation gives each hidden pre-activation roughly the
    variance of its input (about 1/2 for sines), so ``w0 = sqrt(2)`` keeps the pre-activations
    at unit variance, SIREN's hidden-layer regime.
    """

    def __init__(self, n_embd: int, patch_size: int, hidden: int = 64, depth: int = 2,
                 out_channels: int = 3, w0: float = math.sqrt(2.0)):
        super().__init__()
        self.patch_size = patch_size
        self.w0 = w0
        self.register_buffer("coords", grid_coords(patch_size), persistent=False)
        self.fourier = FourierEmbedding(2, hidden)
        self.layers = nn.ModuleList(ModulatedLinear(hidden, hidden, n_embd) for _ in range(depth))
        self.to_rgb = ModulatedLinear(hidden, out_channels, n_embd, demodulate=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``y``: ``[B, L, n_embd]`` patch embeddings -> ``[B, L, P*P, C]`` pixel values."""
        B, L, D = y.shape
        style = y.reshape(B * L, D)
        h = self.fourier(self.coords).unsqueeze(0)  # [1, P*P, hidden], broadcast over patches
        for layer in self.layers:
            h = torch.sin(self.w0 * layer(h, style))
        return self.to_rgb(h, style).view(B, L, self.patch_size ** 2, -1)


class LinearPatchDecoder(nn.Module):
    """Ablation (``decoder: linear``): one linear map from a patch embedding to its pixels."""

    def __init__(self, n_embd: int, patch_size: int, out_channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(n_embd, patch_size * patch_size * out_channels)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        B, L, _ = y.shape
        return self.proj(y).view(B, L, self.patch_size ** 2, -1)


# ----------------------------------------------------------------------- discriminator
class L2SelfAttention(nn.Module):
    """Multi-head L2-distance attention, ``softmax(-||q_i - k_j||^2 / sqrt(d_h)) V``, ``W_q = W_k``.

    Tying the query and key projections makes it Lipschitz (Kim et al., 2021), unlike dot-product
    attention. ``-||q_i - k_j||^2 = 2 q_i.k_j - ||q_i||^2 - ||k_j||^2``; the ``||q_i||^2`` term is
    constant along the softmax axis and drops out, ``-||k_j||^2`` is an additive bias, so the whole
    thing runs through SDPA with ``scale = 2 / sqrt(d_h)``.
    """

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.query = nn.Linear(n_embd, n_embd)  # also the key projection (tied)
        self.value = nn.Linear(n_embd, n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, C = t.shape
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, v = self._heads(self.query(x)), self._heads(self.value(x))
        k = q
        inv_sqrt_d = (C // self.n_head) ** -0.5
        bias = -(k.square().sum(-1) * inv_sqrt_d).unsqueeze(-2)  # [B, H, 1, T]: -||k_j||^2 / sqrt(d_h)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=2 * inv_sqrt_d)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class ImprovedSpectralNorm(nn.Module):
    """Improved Spectral Normalization (parametrization): ``W_bar = sigma(W_init) * W / sigma(W)``.

    ``sigma(W)`` is estimated by power iteration (``n_power_iterations`` per training-mode
    forward); its vectors ``_u`` and ``_v`` are buffers updated in place, outside autograd, so
    they persist across steps. ``sigma_init`` is the exact spectral norm of the weight at
    construction (SVD), stored once; ``_u``/``_v`` start at its singular vectors, so ``W_bar``
    equals ``W`` at init. Weights of rank > 2 (convolutions) are flattened to ``[out, -1]``.
    """

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, eps: float = 1e-12):
        super().__init__()
        W = weight.detach().flatten(1).float()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        self.register_buffer("_u", U[:, 0].clone())
        self.register_buffer("_v", Vh[0].clone())
        self.register_buffer("sigma_init", S[0].clone())
        self.n_power_iterations = n_power_iterations
        self.eps = eps

    @torch.no_grad()
    def _power_iteration(self, W: torch.Tensor) -> None:
        for _ in range(self.n_power_iterations):
            self._v.copy_(F.normalize(W.t() @ self._u, dim=0, eps=self.eps))
            self._u.copy_(F.normalize(W @ self._v, dim=0, eps=self.eps))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        W = weight.flatten(1).float()
        with torch.autocast(weight.device.type, enabled=False):  # sigma in fp32 under mixed precision
            if self.training:
                self._power_iteration(W)
            # clones: later in-place updates must not invalidate graphs that saved u, v
            u, v = self._u.clone(), self._v.clone()
            sigma = torch.dot(u, W @ v)
        return weight * (self.sigma_init / sigma).to(weight.dtype)


def apply_isn(module: nn.Module, n_power_iterations: int = 1) -> nn.Module:
    """Register :class:`ImprovedSpectralNorm` on the weight of every ``Linear`` and ``Conv2d`` in ``module``."""
    targets = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for m in targets:
        parametrize.register_parametrization(m, "weight", ImprovedSpectralNorm(m.weight, n_power_iterations))
    return module
