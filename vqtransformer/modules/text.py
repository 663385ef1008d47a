"""The ``learned`` text encoder (``text_encoder=learned``): a word tokenizer built from the training
captions and a small bidirectional transformer trained jointly with the model it conditions.

Tokenizer: lower-cased words and punctuation (``WORD_RE``), a vocabulary of the most frequent
training words (ties by first appearance), ids ``PAD`` = 0, ``NULL`` = 1 (the null caption of
classifier-free guidance), ``UNK`` = 2. A word vocabulary rather than BPE (the ``tokenizers``
library): captions of the embedded data and of the small captioned folders it is meant for have a
closed vocabulary of tens to thousands of words, every word is one token, and nothing has to be
trained or downloaded; a CLIP encoder (``text_encoder=clip``) brings its own BPE tokenizer.

Encoder: ``E(c) = Transformer(tok_emb(c) + pos_emb)`` with padding masked in attention, giving
per-token embeddings [B, L, C] and a key mask [B, L] for cross-attention. A caption whose first
id is ``NULL`` is the null caption: it becomes one learned vector (``null_emb``, Improved
VQ-Diffusion's learnable null text embedding, Tang et al. 2022, sec. 3.2 - a single token here,
not a sequence of the encoder's length). The vocabulary is part of the module's state
(``get_extra_state``), so a checkpoint carries its tokenizer.
"""

from __future__ import annotations

import collections
import logging
import re
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqtransformer.modules.transformer import MLP

log = logging.getLogger(__name__)

PAD, NULL, UNK = 0, 1, 2
SPECIAL = ("[PAD]", "[NULL]", "[UNK]")
WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words_of(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


class WordTokenizer:
    """Captions -> ids [B, context_length] (PAD-filled); words outside the vocabulary -> UNK."""

    def __init__(self, words: Sequence[str], context_length: int):
        self.words = list(words)
        self.context_length = int(context_length)
        self.index = {w: i + len(SPECIAL) for i, w in enumerate(self.words)}
        self._warned = False

    @classmethod
    def from_captions(cls, captions: Iterable[str], context_length: int, max_words: int) -> WordTokenizer:
        counts: collections.Counter = collections.Counter()
        first: dict[str, int] = {}
        for text in captions:
            for w in words_of(text):
                counts[w] += 1
                first.setdefault(w, len(first))
        ranked = sorted(counts, key=lambda w: (-counts[w], first[w]))[:max_words]
        return cls(ranked, context_length)

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL) + len(self.words)

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        L = self.context_length
        ids = torch.full((len(captions), L), PAD, dtype=torch.long)
        for b, text in enumerate(captions):
            toks = [self.index.get(w, UNK) for w in words_of(text)]
            if len(toks) > L and not self._warned:
                log.warning("a caption of %d words is truncated to text_encoder.context_length=%d: %r",
                            len(toks), L, text[:200])
                self._warned = True
            toks = toks[:L]
            ids[b, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        return ids

    def null(self, n: int) -> torch.Tensor:
        """n null captions (classifier-free guidance's unconditional input)."""
        ids = torch.full((n, self.context_length), PAD, dtype=torch.long)
        ids[:, 0] = NULL
        return ids


class _EncoderBlock(nn.Module):
    """Pre-norm bidirectional block: x + attn(ln(x)) with padded keys masked; x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.mlp = MLP(n_embd)
        self.n_head = n_head

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = (t.view(B, L, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.qkv(self.ln1(x)).split(C, -1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, C))
        return x + self.mlp(self.ln2(x))


class LearnedTextEncoder(nn.Module):
    """ids [B, L] -> (tokens [B, L, C], keep [B, L] bool); see the module docstring."""

    def __init__(self, tokenizer: WordTokenizer, max_words: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.tokenizer, self.max_words, self.n_embd = tokenizer, int(max_words), n_embd
        L = tokenizer.context_length
        self.tok_emb = nn.Embedding(len(SPECIAL) + self.max_words, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, L, n_embd))
        self.null_emb = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.blocks = nn.ModuleList(_EncoderBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.null_emb, std=0.02)

    @property
    def null_id(self) -> int:
        return NULL

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer.encode(captions).to(self.pos_emb.device)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = ids != PAD
        keep[:, 0] = True  # an empty caption still has one key: its (padding) first position
        x = self.tok_emb(ids) + self.pos_emb[:, :ids.shape[1]]
        for block in self.blocks:
            x = block(x, keep)
        x = self.ln_f(x)
        # the null caption: one learned token, nothing else to attend to (in the graph for every batch, so
        # that DDP finds a gradient for null_emb also when no caption of a batch was dropped)
        null = ids[:, 0] == NULL
        x = torch.where(null[:, None, None], F.pad(self.null_emb, (0, 0, 0, x.shape[1] - 1)).expand_as(x), x)
        keep = torch.where(null[:, None], F.one_hot(torch.zeros_like(ids[:, 0]), ids.shape[1]).bool(), keep)
        return x, keep

    # the tokenizer is part of the state: a checkpoint restores its vocabulary
    def get_extra_state(self) -> dict:
        return {"words": list(self.tokenizer.words), "context_length": self.tokenizer.context_length}

    def set_extra_state(self, state: dict) -> None:
        self.tokenizer = WordTokenizer(state["words"], state["context_length"])
