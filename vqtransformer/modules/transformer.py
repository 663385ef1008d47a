"""Transformer blocks shared by the GPT prior, the VQ-Diffusion denoiser and ViTGAN.

Parameter names follow taming-transformers' ``mingpt`` (``attn.key/query/value/proj``,
``ln1``, ``ln2``, ``mlp.0``, ``mlp.2``) so released checkpoints map one to one.
Attention runs through ``F.scaled_dot_product_attention``; autoregressive decoding
uses a static, preallocated :class:`KVCache`. A :class:`Block` built with ``n_ctx`` > 0 adds a
cross-attention sublayer (``ln_c``, ``cross``) to a context such as a caption's token embeddings;
without it (the default) its parameters are exactly taming's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class KVCache:
    """Preallocated keys/values for every layer: ``[n_layer, B, n_head, max_len, head_dim]``.

    ``length`` is the number of valid positions; attention writes positions
    ``[length, length + T)`` and reads ``[0, length + T)``. Nothing is reallocated
    while decoding. ``context``: for cross-attending models, the context's per-layer keys and
    values and its key mask, ``([(k, v) per layer], keep)``, computed once when the cache is
    made (they do not grow while decoding, and :meth:`reset` keeps them).
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        self.context: tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None] | None = None

    def reset(self) -> None:
        self.length = 0


class SelfAttention(nn.Module):
    """Multi-head self-attention (causal or bidirectional) on SDPA."""

    def __init__(self, n_embd: int, n_head: int, attn_pdrop: float = 0.0, resid_pdrop: float = 0.0,
                 causal: bool = True):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.key = nn.Linear(n_embd, n_embd)
        self.query = nn.Linear(n_embd, n_embd)
        self.value = nn.Linear(n_embd, n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(resid_pdrop)
        self.attn_pdrop = attn_pdrop
        self.n_head = n_head
        self.causal = causal
        self.fused_qkv: nn.Module | None = None  # inference copies: one [3C, C] product for query/key/value

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, C = t.shape
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        if self.fused_qkv is not None:
            q, k, v = map(self._heads, self.fused_qkv(x).split(C, dim=-1))
        else:
            q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        dropout = self.attn_pdrop if self.training else 0.0
        if cache is not None:
            start = cache.length
            if start + T > cache.max_len:
                raise ValueError(f"KV cache overflow: {start + T} positions > max_len={cache.max_len}")
            cache.k[layer, :B, :, start:start + T] = k
            cache.v[layer, :B, :, start:start + T] = v
            k = cache.k[layer, :B, :, : start + T]
            v = cache.v[layer, :B, :, : start + T]
            if attn_mask is None and self.causal and T > 1:
                # query i (absolute start+i) sees keys 0..start+i
                attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        else:
            is_causal = self.causal and attn_mask is None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                               is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y))


class CrossAttention(nn.Module):
    """Multi-head attention of x [B, N, C] to a context [B, M, C_ctx] (a caption's token embeddings);
    ``keep`` [B, M] masks the context's padding."""

    def __init__(self, n_embd: int, n_head: int, n_ctx: int | None = None, attn_pdrop: float = 0.0,
                 resid_pdrop: float = 0.0):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        n_ctx = n_embd if n_ctx is None else n_ctx
        self.query, self.key, self.value = nn.Linear(n_embd, n_embd), nn.Linear(n_ctx, n_embd), nn.Linear(n_ctx, n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(resid_pdrop)
        self.attn_pdrop, self.n_head = attn_pdrop, n_head

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context's keys and values [B, n_head, M, head_dim] (computed once, reused by every query)."""
        B, M, _ = context.shape
        h = self.n_head
        k, v = self.key(context), self.value(context)
        return (k.view(B, M, h, -1).transpose(1, 2), v.view(B, M, h, -1).transpose(1, 2))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``kv``: precomputed :meth:`kv` of the context (decoding with a cache), instead of ``context``."""
        B, N, C = x.shape
        h = self.n_head
        q = self.query(x).view(B, N, h, C // h).transpose(1, 2)
        if kv is None:
            if context is None:
                raise ValueError("cross-attention needs a context (or its precomputed keys and values)")
            kv = self.kv(context)
        k, v = kv
        mask = None if keep is None else keep[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_pdrop if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, N, C)))


def MLP(n_embd: int, resid_pdrop: float = 0.0, mult: int = 4) -> nn.Sequential:
    """Position-wise feed-forward; indices 0 and 2 are the two Linear layers (taming layout)."""
    return nn.Sequential(
        nn.Linear(n_embd, mult * n_embd),
        nn.GELU(),
        nn.Linear(mult * n_embd, n_embd),
        nn.Dropout(resid_pdrop),
    )


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)); x + mlp(ln2(x)).

    With ``n_ctx`` > 0 (the width of a context, e.g. a text encoder's token embeddings) a
    cross-attention sublayer sits between the two: x + cross(ln_c(x), context) with the context's
    padding masked by ``keep``. Default off; the parameter names of a block without it are unchanged."""

    def __init__(self, n_embd: int, n_head: int, attn_pdrop: float = 0.0, resid_pdrop: float = 0.0,
                 causal: bool = True, n_ctx: int = 0):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, attn_pdrop, resid_pdrop, causal)
        self.mlp = MLP(n_embd, resid_pdrop)
        self.cross: CrossAttention | None = None
        if n_ctx:
            self.ln_c = nn.LayerNorm(n_embd)
            self.cross = CrossAttention(n_embd, n_head, n_ctx, attn_pdrop, resid_pdrop)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                attn_mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``context`` [B, M, n_ctx] / ``keep`` [B, M] (or ``kv``, its precomputed keys and values):
        what the cross-attention sublayer attends to; required exactly when the block has one."""
        x = x + self.attn(self.ln1(x), cache=cache, layer=layer, attn_mask=attn_mask)
        if self.cross is not None:
            x = x + self.cross(self.ln_c(x), context, keep, kv=kv)
        elif context is not None or kv is not None:
            raise ValueError("this block has no cross-attention (built with n_ctx=0): it takes no context")
        return x + self.mlp(self.ln2(x))
