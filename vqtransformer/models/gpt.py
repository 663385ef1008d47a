"""The GPT prior of "Taming Transformers" (Esser et al. 2021), section 3.2.

A decoder-only transformer models p(s) = prod_i p(s_i | s_<i, c) over the raster-ordered
code indices s of a frozen VQGAN, conditioned on a prefix of condition tokens c. Names
follow taming's ``mingpt.GPT``: ``tok_emb``, ``pos_emb``, ``blocks``, ``ln_f``, ``head``.

Unlike taming, condition tokens and image codes do not share rows: ``tok_emb`` has
``vocab_size + cond_vocab_size`` rows, image codes in ``[0, vocab_size)`` and condition
tokens in ``[vocab_size, vocab_size + cond_vocab_size)``; ``head`` predicts image codes
only. :meth:`GPT.sequence` builds the model input from local condition ids.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from omegaconf import DictConfig

from vqtransformer.modules.transformer import Block, KVCache


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, cond_vocab_size: int = 1, n_layer: int = 12,
                 n_head: int = 8, n_embd: int = 256, embd_pdrop: float = 0.0, resid_pdrop: float = 0.0,
                 attn_pdrop: float = 0.0):
        super().__init__()
        self.vocab_size, self.cond_vocab_size, self.block_size = vocab_size, cond_vocab_size, block_size
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.tok_emb = nn.Embedding(vocab_size + cond_vocab_size, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, block_size, n_embd))
        self.drop = nn.Dropout(embd_pdrop)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, attn_pdrop, resid_pdrop, causal=True)
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)

    @classmethod
    def from_config(cls, cfg: DictConfig, vocab_size: int, cond_vocab_size: int) -> GPT:
        """From the ``transformer`` config group (``n_layer``, ``n_head``, ``n_embd``, ``block_size``, p-drops)."""
        return cls(vocab_size, cfg.block_size, cond_vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                   cfg.get("embd_pdrop", 0.0), cfg.get("resid_pdrop", 0.0), cfg.get("attn_pdrop", 0.0))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def sequence(self, c: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Model input ``[c + vocab_size, z]`` from local condition ids c [B, Lc] and image codes z [B, Lz]."""
        c = c + self.vocab_size
        return c if z is None or z.shape[1] == 0 else torch.cat((c, z), dim=1)

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """A static KV cache for ``batch`` sequences of at most ``max_len`` (default block_size) tokens,
        in the dtype keys and values are computed in (autocast's, if it is on)."""
        p = self.pos_emb
        device = torch.device(device or p.device)
        if dtype is None:
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else p.dtype
        return KVCache(self.n_layer, batch, self.n_head, max_len or self.block_size, self.n_embd // self.n_head,
                       device=device, dtype=dtype)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits over image codes, [B, T, vocab_size] (or [B, vocab_size] with ``last_only``).

        With ``cache``, ``idx`` continues the cached sequence: positions start at ``cache.length``
        and the keys/values of ``idx`` are appended.
        """
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds transformer.block_size={self.block_size}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, start:start + T])
        for i, block in enumerate(self.blocks):
            x = block(x, cache=cache, layer=i)
        if cache is not None:
            cache.length = start + T
        if last_only:
            x = x[:, -1]
        return self.head(self.ln_f(x))

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """minGPT's split: decay Linear weights only; biases, LayerNorm, embeddings and pos_emb are not decayed."""
        decay = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


class PackedLinear(nn.Module):
    """Inference-only ``nn.Linear`` whose weight is pre-packed for oneDNN (CPU): the same product,
    but the small-batch GEMMs of token-by-token decoding run ~1.2-2x faster than through MKL."""

    def __init__(self, linear: nn.Linear, batch_hint: int):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def for_cpu_inference(gpt: GPT, batch_hint: int = 1) -> GPT:
    """A copy of ``gpt`` with oneDNN-packed Linear layers for sampling on the CPU, or ``gpt`` itself
    where that does not apply (other devices, autocast, no oneDNN, or a probe that disagrees)."""
    p = gpt.pos_emb
    if p.device.type != "cpu" or p.dtype != torch.float32 or torch.is_autocast_enabled("cpu") \
            or not torch.backends.mkldnn.is_available():
        return gpt
    try:
        packed = copy.deepcopy(gpt).eval().requires_grad_(False)
        for module in list(packed.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, PackedLinear(child, batch_hint))
        was_training = gpt.training
        with torch.inference_mode():
            probe = torch.arange(min(4, gpt.block_size)).view(1, -1) % gpt.vocab_size
            ref = gpt.eval()(probe)
            gpt.train(was_training)
            ok = torch.allclose(packed(probe), ref, rtol=1e-4, atol=1e-4)
    except (RuntimeError, AttributeError):  # private oneDNN ops missing or changed
        return gpt
    return packed if ok else gpt
