"""VQ-Diffusion denoiser (Gu et al. 2022): a bidirectional transformer over the token grid.

Input: x_t, an [h, w] grid of states (K codes + [MASK]); output: log p(x_0 | x_t) over the
K codes at every position. Positions get learned row + column embeddings; the timestep
(sinusoidal -> MLP) and, for class conditioning, a class embedding (one extra learned
*null* class for classifier-free guidance) are summed into one condition vector that
modulates every LayerNorm (the released code's ``AdaLayerNorm``).

Text conditioning (``conditioning.type=text``, the paper's text-to-image model): every block
cross-attends to the caption's token embeddings from the text encoder (sec. 3.3, Fig. 2:
self-attention, cross-attention, MLP, each behind an AdaLN of the timestep); the null caption is
the encoder's learned null embedding (Improved VQ-Diffusion's learnable null text). The encoder is
the paper's frozen CLIP text model (``text_encoder=clip``, ``vqtransformer.modules.clip_text``) or,
the default on ``shapes`` (no download), a small one trained jointly (``text_encoder=learned``,
``vqtransformer.modules.text``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from vqtransformer.config import ConfigError
from vqtransformer.models.conditioning import build_text_encoder
from vqtransformer.modules.text import LearnedTextEncoder
from vqtransformer.modules.transformer import MLP, CrossAttention, SelfAttention


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, dim % 2))


class AdaLayerNorm(nn.Module):
    """LayerNorm(x) * (1 + scale(c)) + shift(c); the modulation starts at zero (plain LayerNorm)."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.norm = nn.LayerNorm(n_embd, elementwise_affine=False)
        self.linear = nn.Linear(n_embd, 2 * n_embd)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(c).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class AdaLNBlock(nn.Module):
    """Pre-norm block with adaptive LayerNorms: x + attn(ln1(x, c)); [x + cross(ln_c(x, c), text)];
    x + mlp(ln2(x, c))."""

    def __init__(self, n_embd: int, n_head: int, attn_pdrop: float = 0.0, resid_pdrop: float = 0.0,
                 n_ctx: int = 0):
        super().__init__()
        self.ln1 = AdaLayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, attn_pdrop, resid_pdrop, causal=False)
        if n_ctx:
            self.ln_c = AdaLayerNorm(n_embd)
            self.cross = CrossAttention(n_embd, n_head, n_ctx, attn_pdrop, resid_pdrop)
        self.ln2 = AdaLayerNorm(n_embd)
        self.mlp = MLP(n_embd, resid_pdrop)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x, c))
        if context is not None:
            x = x + self.cross(self.ln_c(x, c), context, keep)
        return x + self.mlp(self.ln2(x, c))


class VQDiffusionTransformer(nn.Module):
    """p_theta(x_0 | x_t, y): states [B, h*w] (or [B, h, w]), t [B] in 1..T, y -> log-probs [B, h*w, K].

    y: class ids [B] (or None: the null class), or with ``text_encoder`` caption token ids [B, L]
    (``text_encoder.tokenize``; a row of ``null_class`` ids is the null caption)."""

    def __init__(self, num_codes: int, grid: tuple[int, int], n_layer: int, n_head: int, n_embd: int,
                 num_classes: int = 0, embd_pdrop: float = 0.0, attn_pdrop: float = 0.0,
                 resid_pdrop: float = 0.0, text_encoder: LearnedTextEncoder | None = None):
        super().__init__()
        if text_encoder is not None and num_classes:
            raise ConfigError("the vqdiffusion denoiser takes a class or a caption, not both")
        n_ctx = text_encoder.n_embd if text_encoder is not None else 0
        self.num_codes, self.grid, self.num_classes, self.n_embd = num_codes, tuple(grid), num_classes, n_embd
        self.tok_emb = nn.Embedding(num_codes + 1, n_embd)  # index K = [MASK]
        self.row_emb = nn.Parameter(torch.zeros(grid[0], 1, n_embd))
        self.col_emb = nn.Parameter(torch.zeros(1, grid[1], n_embd))
        self.time_mlp = nn.Sequential(nn.Linear(n_embd, n_embd), nn.SiLU(), nn.Linear(n_embd, n_embd))
        # class ids 0..C-1 plus the learned null class C (unconditional / dropped label)
        self.class_emb = nn.Embedding(num_classes + 1, n_embd) if num_classes > 0 else None
        self.drop = nn.Dropout(embd_pdrop)
        self.blocks = nn.ModuleList(AdaLNBlock(n_embd, n_head, attn_pdrop, resid_pdrop, n_ctx) for _ in range(n_layer))
        self.ln_f = AdaLayerNorm(n_embd)
        self.head = nn.Linear(n_embd, num_codes)
        self.apply(self._init_weights)
        for m in self.modules():
            if isinstance(m, AdaLayerNorm):
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)
        self.text_encoder = text_encoder  # after the init above: it initialises itself

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def null_class(self) -> int:
        """The id that stands for "no condition": the null class, or for text the null caption's id."""
        return self.text_encoder.null_id if self.text_encoder is not None else self.num_classes

    @classmethod
    def from_config(cls, cfg: DictConfig, num_codes: int, grid: tuple[int, int],
                    captions=None) -> VQDiffusionTransformer:
        """Depth/width from ``cfg.transformer``; classes from ``cfg.conditioning.type`` / ``cfg.data.num_classes``;
        for ``conditioning.type=text`` the ``cfg.text_encoder`` (its vocabulary from ``captions``, the
        training captions, or from a checkpoint's state when None)."""
        tr = cfg.transformer
        cond = OmegaConf.select(cfg, "conditioning.type", default="none")
        if cond not in ("none", "class", "text"):
            raise ConfigError(f"conditioning.type='{cond}': the vqdiffusion stage supports 'none', 'class' and 'text'")
        num_classes, text = 0, None
        if cond == "text":
            text = build_text_encoder(cfg, captions)
        if cond == "class":
            num_classes = int(OmegaConf.select(cfg, "conditioning.num_classes", default=None)
                              or OmegaConf.select(cfg, "data.num_classes", default=0) or 0)
            if num_classes <= 0:
                raise ConfigError("conditioning.type='class' needs data.num_classes (or conditioning.num_classes) > 0")
        return cls(num_codes, grid, tr.n_layer, tr.n_head, tr.n_embd, num_classes,
                   embd_pdrop=tr.get("embd_pdrop", 0.0), attn_pdrop=tr.get("attn_pdrop", 0.0),
                   resid_pdrop=tr.get("resid_pdrop", 0.0), text_encoder=text)

    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder's (tokens, keep) for caption ids. Outside training (sampling calls the
        denoiser once per step with the same captions) the last result is reused, so the encoder
        runs once per caption batch, not once per denoising step."""
        if self.training or torch.is_grad_enabled():
            return self.text_encoder(ids)
        cached = getattr(self, "_text_cache", None)
        if cached is None or cached[0].shape != ids.shape or cached[0].device != ids.device \
                or not torch.equal(cached[0], ids):
            cached = (ids.clone(), *self.text_encoder(ids))
            self._text_cache = cached
        return cached[1], cached[2]

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """SiLU(time_mlp(sinusoid(t)) + class_emb(y)) [B, n_embd]; y None -> the null class."""
        c = self.time_mlp(timestep_embedding(t, self.n_embd))
        if self.class_emb is not None:
            if y is None:
                y = torch.full_like(t, self.null_class)
            c = c + self.class_emb(y)
        return F.silu(c)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        B = x_t.shape[0]
        h, w = self.grid
        x_t = x_t.reshape(B, h * w)
        pos = (self.row_emb + self.col_emb).view(1, h * w, self.n_embd)
        x = self.drop(self.tok_emb(x_t) + pos)
        context = keep = None
        if self.text_encoder is not None:
            if y is None:
                y = self.text_encoder.tokenizer.null(B).to(x_t.device)
            context, keep = self.encode_text(y)
            y = None
        c = self.condition(t, y)
        for block in self.blocks:
            x = block(x, c, context, keep)
        logits = self.head(self.ln_f(x, c)).float()
        return F.log_softmax(logits, dim=-1)

    def flops_per_forward(self, batch: int = 1) -> int:
        """Analytic FLOPs (2 per multiply-add) of one forward: matmuls of the blocks, attention, head."""
        N, C, L = self.grid[0] * self.grid[1], self.n_embd, len(self.blocks)
        per_layer = 2 * N * C * 4 * C + 2 * N * C * 8 * C + 2 * 2 * N * N * C + 2 * 2 * (2 * C * C)
        if self.text_encoder is not None:  # cross-attention: q, proj on N; k, v on the caption's M tokens
            M, D = self.text_encoder.tokenizer.context_length, self.text_encoder.n_embd
            per_layer += 2 * N * C * 2 * C + 2 * M * D * 2 * C + 2 * 2 * N * M * C + 2 * 2 * (2 * C * C)
        return batch * (L * per_layer + 2 * N * C * self.num_codes + 2 * 2 * C * C + 2 * 2 * C * C)
