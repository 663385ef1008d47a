"""The GPT prior of "Taming Transformers" (Esser et al. 2021), section 3.2.

A decoder-only transformer models p(s) = prod_i p(s_i | s_<i, c) over the raster-ordered
code indices s of a frozen VQGAN, conditioned on a prefix of condition tokens c. Names
follow taming's ``mingpt.GPT``: ``tok_emb``, ``pos_emb``, ``blocks``, ``ln_f``, ``head``.

Unlike taming, condition tokens and image codes do not share rows: ``tok_emb`` has
``vocab_size + cond_vocab_size`` rows, image codes in ``[0, vocab_size)`` and condition
tokens in ``[vocab_size, vocab_size + cond_vocab_size)``; ``head`` predicts image codes
only. :meth:`GPT.sequence` builds the model input from local condition ids.

Text conditioning (``conditioning.type=text``; taming has none): a GPT built with a
``text_encoder`` cross-attends to the caption's token embeddings in every block - a
cross-attention sublayer (``ln_c``, ``cross``: :class:`~vqtransformer.modules.transformer.CrossAttention`)
after the causal self-attention, as VQ-Diffusion's blocks do - rather than prepending caption
tokens to the sequence. Why: the same text encoder (the jointly trained ``learned`` one, or a
frozen CLIP) then serves both second stages through the same interface, ``(tokens [B, L, C],
keep [B, L])``; padding is masked by the encoder's ``keep`` instead of occupying positions; the
null caption of classifier-free guidance is the encoder's learned null embedding; and the image
sequence keeps its layout - one start token (``cond_vocab_size`` = 1), then the codes - so
``block_size``, half-image completion and the sliding window are those of an unconditional model
(and ``pos_emb`` does not grow with the caption length). Non-text GPTs have no ``ln_c``/``cross``
and no ``text_encoder``: their parameter names, and taming checkpoints, are unchanged.

With a KV cache the caption's cross-attention keys and values are computed once, when the cache
first sees the context (:meth:`GPT.new_cache` with ``context=``), and reused for every token (and
every window of the sliding-window sampler: :meth:`KVCache.reset` keeps them); the text encoder runs
once per caption batch.
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
                 attn_pdrop: float = 0.0, text_encoder: nn.Module | None = None):
        """``text_encoder``: caption ids [B, L] -> (tokens [B, L, C], keep [B, L]) with ``n_embd`` (C),
        ``tokenize`` and ``tokenizer.null(n)`` (:class:`~vqtransformer.modules.text.LearnedTextEncoder`);
        every block then cross-attends to its tokens (see the module docstring)."""
        super().__init__()
        self.vocab_size, self.cond_vocab_size, self.block_size = vocab_size, cond_vocab_size, block_size
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        n_ctx = int(text_encoder.n_embd) if text_encoder is not None else 0
        self.tok_emb = nn.Embedding(vocab_size + cond_vocab_size, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, block_size, n_embd))
        self.drop = nn.Dropout(embd_pdrop)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, attn_pdrop, resid_pdrop, causal=True, n_ctx=n_ctx)
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)
        self.text_encoder = text_encoder  # after the init above: it initialises itself (a frozen one keeps its weights)

    @classmethod
    def from_config(cls, cfg: DictConfig, vocab_size: int, cond_vocab_size: int,
                    text_encoder: nn.Module | None = None) -> GPT:
        """From the ``transformer`` config group (``n_layer``, ``n_head``, ``n_embd``, ``block_size``, p-drops)."""
        return cls(vocab_size, cfg.block_size, cond_vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                   cfg.get("embd_pdrop", 0.0), cfg.get("resid_pdrop", 0.0), cfg.get("attn_pdrop", 0.0),
                   text_encoder=text_encoder)

    @property
    def text_conditional(self) -> bool:
        return self.text_encoder is not None

    def null_text(self, n: int) -> torch.Tensor:
        """Caption ids [n, L] of the null caption (classifier-free guidance's unconditional input)."""
        if self.text_encoder is None:
            raise ValueError("this GPT is not text-conditional: it has no null caption")
        return self.text_encoder.tokenizer.null(n).to(self.pos_emb.device)

    def encode_text(self, context) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens [B, L, C], keep [B, L]) of ``context``: caption ids [B, L] (run through the text encoder)
        or an encoding already made by it, passed through."""
        if self.text_encoder is None:
            raise ValueError("this GPT is not text-conditional (built without a text encoder): it takes no context")
        if isinstance(context, (tuple, list)):
            tokens, keep = context
            return tokens, keep
        return self.text_encoder(context)

    def _cross_kv(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [block.cross.kv(tokens) for block in self.blocks]

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

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None,
                  context=None) -> KVCache:
        """A static KV cache for ``batch`` sequences of at most ``max_len`` (default block_size) tokens,
        in the dtype keys and values are computed in (autocast's, if it is on). ``context`` (text GPTs:
        caption ids or :meth:`encode_text`'s encoding, ``batch`` rows): its cross-attention keys and
        values are computed here, once, and held by the cache."""
        p = self.pos_emb
        device = torch.device(device or p.device)
        if dtype is None:
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else p.dtype
        cache = KVCache(self.n_layer, batch, self.n_head, max_len or self.block_size, self.n_embd // self.n_head,
                        device=device, dtype=dtype)
        if context is not None:
            tokens, keep = self.encode_text(context)
            if tokens.shape[0] != batch:
                raise ValueError(f"context of {tokens.shape[0]} captions for a cache of {batch} sequences")
            cache.context = (self._cross_kv(tokens), keep)
        return cache

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                context=None) -> torch.Tensor:
        """Logits over image codes, [B, T, vocab_size] (or [B, vocab_size] with ``last_only``).

        With ``cache``, ``idx`` continues the cached sequence: positions start at ``cache.length``
        and the keys/values of ``idx`` are appended.

        ``context`` (text-conditional GPTs only, and required there): the captions, as caption ids
        [B, L] (encoded here, in the forward: trained with the model) or :meth:`encode_text`'s
        (tokens, keep). With a cache it may be given once (or to :meth:`new_cache`): the cache keeps
        its cross-attention keys and values for the calls that follow.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds transformer.block_size={self.block_size}")
        kvs: list = [None] * self.n_layer
        tokens = keep = None
        if self.text_encoder is None:
            if context is not None:
                raise ValueError("this GPT is not text-conditional (built without a text encoder): it takes no context")
        elif cache is not None and cache.context is not None:
            if context is not None:
                raise ValueError("context given twice: this KV cache already holds the caption's keys and values")
            kvs, keep = cache.context
        elif context is None:
            raise ValueError("this GPT is text-conditional: give context= (caption ids [B, L], the null caption "
                             "null_text(B) for unconditional rows)")
        else:
            tokens, keep = self.encode_text(context)
            if tokens.shape[0] != B:
                raise ValueError(f"{tokens.shape[0]} captions for {B} sequences")
            if cache is not None:  # computed once, reused for every token that follows
                kvs = self._cross_kv(tokens)
                cache.context, tokens = (kvs, keep), None
        if kvs and kvs[0] is not None and kvs[0][0].shape[0] != B:
            raise ValueError(f"{kvs[0][0].shape[0]} captions (in the KV cache) for {B} sequences")
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, start:start + T])
        for i, block in enumerate(self.blocks):
            if self.text_encoder is None:
                x = block(x, cache=cache, layer=i)
            else:
                x = block(x, cache=cache, layer=i, context=tokens, keep=keep, kv=kvs[i])
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
    autocast, or a probe that disagrees with the model). A text encoder is shared with ``gpt``, not copied."""
    p = gpt.pos_emb
    if p.device.type != "cpu" or p.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return gpt
    splits = max(1, torch.get_num_threads())
    # the text encoder runs once per caption batch, not per token: shared as it is, not copied (a
    # frozen CLIP is large) nor converted (a CLIP's attention reads its Linear weights directly)
    text = gpt.text_encoder
    fast = copy.deepcopy(gpt, {id(text): text} if text is not None else None)
    fast.text_encoder = None  # (eval / requires_grad_ below are the copy's, not the shared encoder's)
    fast.eval().requires_grad_(False)
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
    fast.text_encoder = text
    was_training = gpt.training
    with torch.inference_mode():
        probe = torch.arange(min(4, gpt.block_size)).view(1, -1) % gpt.vocab_size
        kw = {"context": gpt.null_text(1)} if gpt.text_encoder is not None else {}
        ref = gpt.eval()(probe, **kw)
        gpt.train(was_training)
        ok = torch.allclose(fast(probe, **kw), ref, rtol=1e-4, atol=1e-4)
    return fast if ok else gpt
