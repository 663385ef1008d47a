"""Finite Scalar Quantization and Lookup-Free Quantization next to :class:`VectorQuantizer`.

Both come from ``vector-quantize-pytorch`` (``vector_quantize_pytorch.FSQ`` / ``LFQ``); this module
wraps them in the interface the rest of the project uses for a quantizer, so VQGAN, the transformer,
VQ-Diffusion, the code cache and ``evaluate.py`` do not ask which one they have:

* ``forward(z [B, D, H, W]) -> (z_q [B, D, H, W], loss, {"indices" [B, H, W], "perplexity", "counts" [K]})``
  with straight-through gradients;
* ``n_embed`` (K, the second stage's vocabulary), ``embed_dim`` (D, the channels it quantizes: the
  same key as for VQ, so it stays constant across codebook presets), ``code_dim`` (the dimension of a
  code: ``len(levels)`` for FSQ, ``log2 K`` for LFQ, ``embed_dim`` for VQ) and ``kind``;
* ``usage()`` -> (fraction of codes used in the last ``usage_window`` training steps, dead codes by
  ``dead_after``), counted exactly as :meth:`VectorQuantizer.usage` does;
* ``get_codebook_entry(indices [B, h, w]) -> [B, D, h, w]`` (decoding the second stage's tokens).

FSQ (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple"): no codebook; D -> d
by a linear projection, each of the d channels bounded and rounded to ``levels[i]`` values, codes =
prod(levels) (``[8, 5, 5, 5]`` = 1000). The paper has no auxiliary loss; ours adds the code-spread
penalty below (``loss`` is exactly 0 with both weights at 0, the paper's FSQ).

LFQ (Yu et al. 2023, MAGVIT-v2, "Language Model Beats Diffusion"): D -> log2 K binary latents
(sign), code = the bit pattern; loss = ``entropy_weight`` * (per-sample entropy - ``diversity_gamma`` *
batch entropy) + ``beta`` * commitment, plus the decorrelation term below.

Code-spread penalty (our addition; why: the usage of a K = prod(levels) or 2^bits code space is the
usage of the *joint* of the d channels, and after a short run the channels are correlated: FSQ
[8,8,8,6,5] on CIFAR-10 after 1,500 steps had |r| up to 0.69 between channels, a joint code entropy of
7.88 nats against 9.13 for the sum of the channel entropies, and 56.7 % of the 15,360 codes used on the
test split, where channels with the same marginals drawn independently use 98.5 %). On the d
continuous channels u before rounding (FSQ: the bounded value in level units; LFQ: the projection whose
sign is the bit), over the tokens of a batch:

    L_spread = decorrelation_weight * mean_{i != j} corr(u_i, u_j)^2
             + marginal_entropy_weight * sum_i (log L_i - H(mean_n p_n,i)) / sum_i log L_i      (FSQ only)

with p_n,i = softmax_k(-(u_n,i - k)^2 / 0.5) the soft assignment of token n to the levels k of channel i.
The first term makes the channels carry different information (a linear decorrelation of project_in
costs the reconstruction nothing), the second spreads each channel over all its levels (tanh saturates:
the outer levels are the least used). ``loss`` and ``info["spread"]`` carry it.

Our ``VectorQuantizer`` stays the quantizer of ``codebook.kind=vq`` (taming-compatible checkpoints).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from vqtransformer.modules.quantize import VectorQuantizer, perplexity

KINDS = ("vq", "fsq", "lfq")


class _CodeUsage(nn.Module):
    """Step / last-used bookkeeping shared by FSQ and LFQ (the same buffers as ``VectorQuantizer``)."""

    def _init_usage(self, n_embed: int, usage_window: int, dead_after: int) -> None:
        self.usage_window, self.dead_after = int(usage_window), int(dead_after)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(n_embed, dtype=torch.long))

    @torch.no_grad()
    def _count(self, indices: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(indices.flatten(), minlength=self.n_embed).float()
        if self.training:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(counts)
            self.step += 1
            self.last_used[counts > 0] = self.step
        return counts

    @torch.no_grad()
    def usage(self) -> tuple[float, int]:
        age = self.step - self.last_used
        used = (age < self.usage_window) & (self.last_used > 0)
        return float(used.float().mean()), int((age > self.dead_after).sum())


def decorrelation(u: torch.Tensor) -> torch.Tensor:
    """mean over i != j of corr(u_i, u_j)^2 for u [N, d] (0 for d = 1 or fewer than 2 tokens)."""
    n, d = u.shape
    if d < 2 or n < 2:
        return u.new_zeros(())
    u = u - u.mean(0)
    u = u / (u.pow(2).mean(0).sqrt() + 1e-6)
    r = (u.T @ u) / n
    return (r.pow(2).sum() - r.diagonal().pow(2).sum()) / (d * (d - 1))


def marginal_entropy_gap(u: torch.Tensor, levels: list[int], tau: float = 0.5) -> torch.Tensor:
    """sum_i (log L_i - H(batch-mean soft assignment of channel i)) / sum_i log L_i, in [0, 1]; u [N, d] in level
    units (channel i's levels are the integers -(L_i // 2) .. (L_i - 1) // 2, as FSQ's bound rounds to)."""
    gap = u.new_zeros(())
    for i, L in enumerate(levels):
        k = torch.arange(L, device=u.device, dtype=u.dtype) - L // 2
        p = torch.softmax(-(u[:, i:i + 1] - k).pow(2) / tau, dim=1).mean(0)
        gap = gap + math.log(L) + (p * p.clamp_min(1e-12).log()).sum()
    return gap / sum(math.log(L) for L in levels)


class FSQuantizer(_CodeUsage):
    kind = "fsq"

    def __init__(self, levels: list[int], embed_dim: int, *, decorrelation_weight: float = 0.0,
                 marginal_entropy_weight: float = 0.0, usage_window: int = 100, dead_after: int = 100):
        super().__init__()
        from vector_quantize_pytorch import FSQ

        self.levels = [int(v) for v in levels]
        self.n_embed = int(math.prod(self.levels))
        self.embed_dim, self.code_dim = int(embed_dim), len(self.levels)
        # preserve_symmetry is the library's requirement for levels of 2
        self.fsq = FSQ(levels=self.levels, dim=self.embed_dim, preserve_symmetry=any(v == 2 for v in self.levels))
        self.decorrelation_weight, self.marginal_entropy_weight = float(decorrelation_weight), float(marginal_entropy_weight)
        self._init_usage(self.n_embed, usage_window, dead_after)

    def bounded(self, z: torch.Tensor) -> torch.Tensor:
        """[B, D, H, W] -> [B*H*W, d]: the channels FSQ rounds, before rounding, in level units centred so that
        round(u) + L // 2 is the channel's level index (the library's ``bound`` without its round; with levels
        of 2, its ``symmetry_preserving_bound`` without its floor). Pinned to the library's codes by a test."""
        u = self.fsq.project_in(z.float().permute(0, 2, 3, 1).reshape(-1, self.embed_dim))
        lv = self.fsq._levels.to(u.dtype)
        if self.fsq.preserve_symmetry:  # level index = floor((L - 1) (tanh u + 1) / 2 + 0.5)
            return (lv - 1) * (torch.tanh(u) + 1) / 2 - self.fsq._levels // 2
        half_l, offset = (lv - 1) * (1 + 1e-3) / 2, torch.where(self.fsq._levels % 2 == 0, 0.5, 0.0).to(u.dtype)
        return torch.tanh(u + torch.atanh(offset / half_l)) * half_l - offset

    def spread(self, z: torch.Tensor) -> torch.Tensor:
        if not (self.decorrelation_weight or self.marginal_entropy_weight):
            return z.new_zeros((), dtype=torch.float32)
        u = self.bounded(z)
        return (self.decorrelation_weight * decorrelation(u)
                + self.marginal_entropy_weight * marginal_entropy_gap(u, self.levels))

    def forward(self, z: torch.Tensor):
        if z.shape[1] != self.embed_dim:
            raise ValueError(f"quantizer expects {self.embed_dim} channels (codebook.embed_dim), got {z.shape[1]}")
        z_q, indices = self.fsq(z.float())
        indices = indices.long()
        counts = self._count(indices)
        loss = self.spread(z)
        return z_q.to(z.dtype), loss.to(z.dtype), {"indices": indices, "perplexity": perplexity(counts),
                                                   "counts": counts, "spread": loss.detach()}

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
        if shape is not None:
            indices = indices.view(*shape)
        return self.fsq.indices_to_codes(indices.long()).contiguous()  # [B, D, h, w]


class LFQuantizer(_CodeUsage):
    kind = "lfq"

    def __init__(self, n_embed: int, embed_dim: int, *, entropy_weight: float = 0.1, beta: float = 0.25,
                 diversity_gamma: float = 1.0, decorrelation_weight: float = 0.0, usage_window: int = 100,
                 dead_after: int = 100):
        super().__init__()
        from vector_quantize_pytorch import LFQ

        bits = math.log2(n_embed)
        if not bits.is_integer():
            from vqtransformer.config import ConfigError

            raise ConfigError(f"codebook.n_embed={n_embed}: LFQ needs a power of 2 (2^bits codes), e.g. "
                              f"{2 ** math.ceil(bits)}")
        self.n_embed, self.embed_dim, self.code_dim = int(n_embed), int(embed_dim), int(bits)
        self.lfq = LFQ(dim=self.embed_dim, codebook_size=self.n_embed, entropy_loss_weight=float(entropy_weight),
                       commitment_loss_weight=float(beta), diversity_gamma=float(diversity_gamma))
        self.decorrelation_weight = float(decorrelation_weight)
        self._init_usage(self.n_embed, usage_window, dead_after)

    def spread(self, z: torch.Tensor) -> torch.Tensor:
        if not self.decorrelation_weight:
            return z.new_zeros((), dtype=torch.float32)
        u = self.lfq.project_in(z.float().permute(0, 2, 3, 1).reshape(-1, self.embed_dim))  # the bits' pre-signs
        return self.decorrelation_weight * decorrelation(u)

    def forward(self, z: torch.Tensor):
        if z.shape[1] != self.embed_dim:
            raise ValueError(f"quantizer expects {self.embed_dim} channels (codebook.embed_dim), got {z.shape[1]}")
        z_q, indices, aux = self.lfq(z.float())
        indices = indices.long()
        counts = self._count(indices)
        spread = self.spread(z)
        return z_q.to(z.dtype), (aux.reshape(()) + spread).to(z.dtype), {
            "indices": indices, "perplexity": perplexity(counts), "counts": counts, "spread": spread.detach()}

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
        if shape is not None:
            indices = indices.view(*shape)
        return self.lfq.indices_to_codes(indices.long()).contiguous()


def fsq_levels(codebook) -> list[int]:
    levels = codebook.get("levels")
    if not levels:
        from vqtransformer.config import ConfigError

        raise ConfigError("codebook.kind=fsq needs codebook.levels (e.g. [8,5,5,5] = 1000 codes); "
                          "see conf/codebook/fsq_1k.yaml")
    return [int(v) for v in levels]


def build_quantizer(codebook) -> nn.Module:
    """The quantizer of a ``codebook`` config: ``kind`` vq (default) | fsq | lfq."""
    from vqtransformer.config import ConfigError

    kind = str(codebook.get("kind", "vq") or "vq")
    common = {k: codebook[k] for k in ("usage_window", "dead_after") if k in codebook}
    n_embed, embed_dim = int(codebook.n_embed), int(codebook.embed_dim)
    if kind == "vq":
        quantizer = {k: codebook[k] for k in ("beta", "ema", "decay", "l2_normalize", "restart_dead", "dead_after",
                                             "usage_window", "init") if k in codebook}
        return VectorQuantizer(n_embed, embed_dim, **quantizer)
    if kind == "fsq":
        levels = fsq_levels(codebook)
        if math.prod(levels) != n_embed:
            raise ConfigError(f"codebook.n_embed={n_embed} but codebook.levels={levels} give {math.prod(levels)} codes; "
                              f"set codebook.n_embed={math.prod(levels)}")
        if any(v < 2 for v in levels):
            raise ConfigError(f"codebook.levels={levels}: every level must be >= 2")
        return FSQuantizer(levels, embed_dim, decorrelation_weight=float(codebook.get("decorrelation_weight", 0.0)),
                           marginal_entropy_weight=float(codebook.get("marginal_entropy_weight", 0.0)), **common)
    if kind == "lfq":
        return LFQuantizer(n_embed, embed_dim, entropy_weight=float(codebook.get("entropy_weight", 0.1)),
                           beta=float(codebook.get("beta", 0.25)),
                           diversity_gamma=float(codebook.get("diversity_gamma", 1.0)),
                           decorrelation_weight=float(codebook.get("decorrelation_weight", 0.0)), **common)
    raise ConfigError(f"codebook.kind='{kind}' must be one of {', '.join(KINDS)}")


def describe(quantizer: nn.Module) -> dict:
    """kind / size (K) / code dim / embed dim of a quantizer (what a second stage logs about its first stage)."""
    kind = getattr(quantizer, "kind", "vq")
    return {"kind": kind, "size": int(quantizer.n_embed), "dim": int(getattr(quantizer, "code_dim", quantizer.embed_dim)),
            "embed_dim": int(quantizer.embed_dim)}
