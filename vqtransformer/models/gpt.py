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


class SplitLinear(nn.Module):
    """Inference-only ``nn.Linear`` for token-by-token decoding on the CPU: the same product, with the
    weight stored as ``splits`` blocks of output columns and multiplied as one batched matmul, so
    that each intra-op thread streams its own block of weights (MKL parallelises small-batch
    products poorly). Single rows (``batch_hint`` <= 4) use ``x @ W^T`` blocks [S, in, out/S];
    batches use ``W x^T`` blocks [S, out/S, in] (faster each in ``make bench``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int, splits: int = 2):
        super().__init__()
        out, inp = weight.shape
        s = splits if out % splits == 0 else 1
        self.rows_first = batch_hint > 4
        w = weight.detach()
        w = w.reshape(s, out // s, inp) if self.rows_first else w.t().reshape(inp, s, out // s).transpose(0, 1)
        self.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if self.rows_first:  # [S, out/S, in] @ [in, M] -> [out, M] -> [M, out]
            y = torch.matmul(self.weight, x2.t()).reshape(-1, x2.shape[0]).t()
        else:  # [M, in] @ [S, in, out/S] -> [S, M, out/S] -> [M, out]
            y = torch.matmul(x2, self.weight).transpose(0, 1).reshape(x2.shape[0], -1)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, y.shape[-1])


def for_cpu_inference(gpt: GPT, batch_hint: int = 1) -> GPT:
    """A copy of ``gpt`` for sampling on the CPU: query/key/value fused into one product and every
    Linear a :class:`SplitLinear`; ``gpt`` itself where that does not apply (other devices,
    autocast, or a probe that disagrees with the model)."""
    p = gpt.pos_emb
    if p.device.type != "cpu" or p.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return gpt
    splits = max(1, torch.get_num_threads())
    fast = copy.deepcopy(gpt).eval().requires_grad_(False)
    for block in fast.blocks:
        a = block.attn
        w = torch.cat((a.query.weight, a.key.weight, a.value.weight))
        b = torch.cat((a.query.bias, a.key.bias, a.value.bias))
        a.fused_qkv = SplitLinear(w, b, batch_hint, splits)
        a.query = a.key = a.value = None
    for module in list(fast.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, SplitLinear(child.weight, child.bias, batch_hint, splits))
    was_training = gpt.training
    with torch.inference_mode():
        probe = torch.arange(min(4, gpt.block_size)).view(1, -1) % gpt.vocab_size
        ref = gpt.eval()(probe)
        gpt.train(was_training)
        ok = torch.allclose(fast(probe), ref, rtol=1e-4, atol=1e-4)
    return fast if ok else gpt
