"""ViTGAN generator and discriminator (Lee et al., "ViTGAN: Training GANs with Vision Transformers", ICLR 2022).

Generator: a mapping MLP ``z -> w``; the input sequence is only the Fourier embedding of the
patch-grid positions; ``w`` enters every block through self-modulated LayerNorm::

    h' = MSA(SLN(h, w)) + h
    h  = MLP(SLN(h', w)) + h'
    y  = SLN(h_L, w)

and each output embedding ``y_i`` drives an implicit neural representation of its patch
(modulated SIREN, or a linear map for the ablation); patches are stitched into the image and
squashed by ``tanh`` into [-1, 1].

Discriminator: overlapping patches (conv, kernel ``2P``, stride ``P``, padding ``P/2``), a class
token, pre-LN blocks with L2-distance attention, a linear head on the class token, and Improved
Spectral Normalization on every linear layer (the patch conv included).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from vqtransformer.modules.transformer import MLP, SelfAttention
from vqtransformer.modules.vit import (
    SLN,
    FourierEmbedding,
    L2SelfAttention,
    LinearPatchDecoder,
    SirenPatchDecoder,
    apply_isn,
    grid_coords,
    patches_to_image,
)


def _check_patching(image_size: int, patch_size: int, key: str) -> int:
    if image_size % patch_size != 0:
        raise ValueError(f"{key}.patch_size={patch_size} must divide vitgan.image_size={image_size}")
    return image_size // patch_size


class MappingNetwork(nn.Sequential):
    """StyleGAN mapping ``z -> w``: pixel norm of ``z``, then ``depth`` x (Linear, LeakyReLU(0.2))."""

    def __init__(self, latent_dim: int, depth: int):
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(latent_dim, latent_dim), nn.LeakyReLU(0.2)]
        super().__init__(*layers)
        for m in self:
            if isinstance(m, nn.Linear):  # He init: w keeps the unit scale of the normalised z
                nn.init.kaiming_normal_(m.weight, a=0.2)
                nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8))


class GeneratorBlock(nn.Module):
    """``h' = MSA(SLN(h, w)) + h``; ``h = MLP(SLN(h', w)) + h'``."""

    def __init__(self, n_embd: int, n_head: int, w_dim: int):
        super().__init__()
        self.sln1 = SLN(n_embd, w_dim)
        self.attn = SelfAttention(n_embd, n_head, causal=False)
        self.sln2 = SLN(n_embd, w_dim)
        self.mlp = MLP(n_embd)

    def forward(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.sln1(h, w)) + h
        return self.mlp(self.sln2(h, w)) + h


class Generator(nn.Module):
    """ViTGAN generator: ``z [B, latent_dim] -> images [B, 3, image_size, image_size]`` in [-1, 1]."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, n_embd: int = 384, n_layer: int = 4,
                 n_head: int = 6, latent_dim: int = 384, mapping_depth: int = 8, decoder: str = "siren",
                 inr_dim: int = 64, inr_depth: int = 2):
        super().__init__()
        self.grid = _check_patching(image_size, patch_size, "vitgan.generator")
        self.image_size, self.latent_dim = image_size, latent_dim
        self.mapping = MappingNetwork(latent_dim, mapping_depth)
        self.register_buffer("positions", grid_coords(self.grid), persistent=False)
        self.pos_emb = FourierEmbedding(2, n_embd)
        self.blocks = nn.ModuleList(GeneratorBlock(n_embd, n_head, latent_dim) for _ in range(n_layer))
        self.sln_f = SLN(n_embd, latent_dim)
        if decoder == "siren":
            self.decoder = SirenPatchDecoder(n_embd, patch_size, inr_dim, inr_depth)
        elif decoder == "linear":
            self.decoder = LinearPatchDecoder(n_embd, patch_size)
        else:
            raise ValueError(f"vitgan.generator.decoder must be 'siren' or 'linear', got '{decoder}'")

    @classmethod
    def from_config(cls, cfg) -> Generator:
        """Build from the ``vitgan`` config group."""
        g = cfg.generator
        return cls(cfg.image_size, g.patch_size, g.n_embd, g.n_layer, g.n_head, cfg.latent_dim,
                   cfg.mapping_depth, g.decoder, g.inr_dim, g.inr_depth)

    def sample_z(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, device=device, generator=generator)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        w = self.mapping(z)
        h = self.pos_emb(self.positions).unsqueeze(0).expand(z.shape[0], -1, -1)  # E_pos, [B, L, D]
        for block in self.blocks:
            h = block(h, w)
        y = self.sln_f(h, w)
        return torch.tanh(patches_to_image(self.decoder(y), self.grid))


class DiscriminatorBlock(nn.Module):
    """Pre-LN block: ``x + L2Attn(LN(x))``; ``x + MLP(LN(x))``."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = L2SelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Discriminator(nn.Module):
    """ViTGAN discriminator: ``images [B, 3, H, W] -> logits [B]``."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, n_embd: int = 384, n_layer: int = 4,
                 n_head: int = 6, isn: bool = True):
        super().__init__()
        if patch_size % 2 != 0:
            raise ValueError(f"vitgan.discriminator.patch_size={patch_size} must be even (overlap is P/2 per side)")
        n_patches = _check_patching(image_size, patch_size, "vitgan.discriminator") ** 2
        # each patch extended by P/2 on every side: kernel 2P, stride P, padding P/2
        self.patch_embed = nn.Conv2d(3, n_embd, kernel_size=2 * patch_size, stride=patch_size,
                                     padding=patch_size // 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.pos_emb = nn.Parameter(torch.randn(1, n_patches + 1, n_embd) * 0.02)
        self.blocks = nn.Sequential(*(DiscriminatorBlock(n_embd, n_head) for _ in range(n_layer)))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, 1)
        if isn:
            apply_isn(self)

    @classmethod
    def from_config(cls, cfg) -> Discriminator:
        d = cfg.discriminator
        return cls(cfg.image_size, d.patch_size, d.n_embd, d.n_layer, d.n_head, d.isn)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Overlapping patch embeddings ``[B, L, n_embd]``."""
        return self.patch_embed(x).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patchify(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_emb
        h = self.ln_f(self.blocks(h))
        return self.head(h[:, 0]).squeeze(-1)


class EMA(nn.Module):
    """Exponential moving average of a model's parameters (buffers are copied).

    ``decay_t = min(decay, (1 + t) / (10 + t))`` after ``t`` updates, so that the average is
    useful early in training. The copy stays in eval mode and takes no gradients.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> EMA:
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        t = int(self.num_updates)
        decay = min(self.decay, (1 + t) / (10 + t))
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), 1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

