"""The ``clip`` text encoder (``text_encoder=clip``): the frozen text transformer of a CLIP model, through
the ``transformers`` library (``CLIPTokenizer`` + ``CLIPTextModel``).

VQ-Diffusion (Gu et al. 2022, sec. 4, implementation details) encodes captions with the text encoder of
CLIP ViT-B/32, frozen, with CLIP's BPE and context length 77: every denoiser block cross-attends to the
per-token embeddings (``last_hidden_state``, after CLIP's final LayerNorm; padding masked). The same interface as
:class:`vqtransformer.modules.text.LearnedTextEncoder`: ``tokenize`` -> ids [B, L], ``forward(ids)`` ->
(tokens [B, L, C], keep [B, L] bool), ``null_id``, ``n_embd``, ``tokenizer.context_length``,
``tokenizer.null(n)``; ``pooled(ids)`` -> [B, C] is CLIP's pooled embedding (the EOS token's).

Ids: CLIP's own token ids, ``PAD_ID`` = -2 after the caption's EOS and ``NULL_ID`` = -1 for the null
caption: negative, so they collide with no CLIP vocabulary whatever its size. Captions longer than
``text_encoder.context_length`` keep their first tokens and their EOS, with one warning.

Trainable: only ``null_emb``, the null caption (classifier-free guidance) as one learned token, Improved
VQ-Diffusion's learnable null text (Tang et al. 2022, sec. 3.2). Deviations: a single token rather than
a sequence of CLIP's length, and not the CLIP encoding of the empty caption.

Frozen and not saved: the CLIP model is kept outside the registered submodules, so neither ``state_dict``
(checkpoints), ``parameters()`` (the optimizer) nor ``train()`` see it; ``.to()`` moves it (``_apply``).
A checkpoint records what it was trained with (``get_extra_state``: model id, path, hidden size) and is
loaded again from ``text_encoder.path`` / ``text_encoder.model_id``.

Cache: CLIP's output per caption (keyed by its ids, without padding) is kept in an in-memory LRU of
``text_encoder.cache_size`` captions on the encoder's device, so CLIP runs once per distinct caption,
not once per training step or denoising step (about 40 KB per 20-token caption for ViT-B/32).

Loading (:func:`load_clip`): ``text_encoder.path`` (a ``save_pretrained`` directory), else
``text_encoder.model_id`` from the Hugging Face cache; downloaded there only when neither
``HF_HUB_OFFLINE=1`` nor ``VQT_OFFLINE=1``. Otherwise :class:`~vqtransformer.weights.WeightsUnavailableError`
names the model, the cache directory and the key to set, when the model is built (before training).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from vqtransformer.config import ConfigError
from vqtransformer.weights import WeightsUnavailableError, offline

log = logging.getLogger(__name__)

NULL_ID, PAD_ID = -1, -2
DEFAULT_MODEL_ID = "openai/clip-vit-base-patch32"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hf_offline() -> bool:
    """No downloads: ``VQT_OFFLINE=1`` (the project's switch) or ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``."""
    return offline() or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``,
    else the default (``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    try:
        from huggingface_hub import constants
        return Path(constants.HF_HUB_CACHE)
    except ImportError:
        return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface" / "hub"


def _missing(model_id: str, path: str | None, why: str) -> WeightsUnavailableError:
    home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    cache = f"the Hugging Face cache {hf_cache_dir()} (HF_HOME={home}; `hf download {model_id}` where there is network)"
    saved = "a directory written by save_pretrained (config.json, the weights, vocab.json, merges.txt)"
    if path:
        todo = (f"set text_encoder.path=DIR to {saved}, or text_encoder.path=null to read "
                f"text_encoder.model_id={model_id} from {cache}")
    else:
        download = ", or unset HF_HUB_OFFLINE / VQT_OFFLINE to download it" if hf_offline() else ""
        todo = f"put '{model_id}' in {cache}{download}, or set text_encoder.path=DIR to {saved}"
    where = f"text_encoder.path={path}" if path else f"text_encoder.model_id={model_id}"
    return WeightsUnavailableError(f"the CLIP text encoder ({where}) is not available: {why}. To fix: {todo}.")


def _unreachable(timeout: float = 10.0) -> str:
    """Why the hub cannot be reached ('' when it can, or when a proxy is configured and only a download can tell)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return ""
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = "https://huggingface.co"
    url = urllib.parse.urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return f"{endpoint} cannot be reached ({e})"
    return ""


def load_clip(model_id: str | None = DEFAULT_MODEL_ID, path: str | None = None):
    """(CLIPTokenizer, CLIPTextModel in eval mode, frozen) from ``path`` or the hub cache (see the module doc)."""
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as e:
        raise ConfigError(f"text_encoder=clip needs the 'transformers' package (a project dependency: "
                          f"pip install -e . in the project's environment): {e}") from None
    model_id = model_id or DEFAULT_MODEL_ID
    if path:
        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise _missing(model_id, path, f"{p} is not a directory with a config.json")
        source, kw = str(p), {}
    else:
        source, kw = model_id, {"cache_dir": str(hf_cache_dir())}

    def load(local_only: bool):
        tok = CLIPTokenizer.from_pretrained(source, **kw, local_files_only=local_only)
        model = CLIPTextModel.from_pretrained(source, **kw, local_files_only=local_only)
        return tok, model

    try:
        tok, model = load(True)  # the cache first: no network when the files are there
    except (OSError, ValueError) as e:
        first = " ".join(str(e).split())[:300]
        if path:
            raise _missing(model_id, path, f"loading {path} failed: {first}") from None
        if hf_offline():
            flags = [k for k in ("VQT_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if _env_true(k)]
            raise _missing(model_id, path, f"not in the cache and downloads are off ({', '.join(flags)})") from None
        unreachable = _unreachable()
        if unreachable:  # fail at once, not after the hub client's retries for every file
            raise _missing(model_id, path, f"not in the cache, and {unreachable}") from None
        try:
            tok, model = load(False)
        except (OSError, ValueError) as e2:
            raise _missing(model_id, path, f"not in the cache, and the download failed: "
                                           f"{' '.join(str(e2).split())[:300].rstrip('.')}") from None
    return tok, model.eval().requires_grad_(False)


class CLIPCaptionTokenizer:
    """Captions -> CLIP ids [B, context_length]: BOS, the caption's BPE tokens, EOS, then ``PAD_ID``."""

    def __init__(self, hf_tokenizer, context_length: int):
        self.hf, self.context_length = hf_tokenizer, int(context_length)
        self.eos_id = hf_tokenizer.eos_token_id
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else self.eos_id
        self._warned = False

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        L = self.context_length
        ids = torch.full((len(captions), L), PAD_ID, dtype=torch.long)
        rows = self.hf(list(captions), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        for b, toks in enumerate(rows):
            if len(toks) > L:
                if not self._warned:
                    log.warning("a caption of %d CLIP tokens is truncated to text_encoder.context_length=%d: %r",
                                len(toks), L, captions[b][:200])
                    self._warned = True
                toks = toks[:L - 1] + [self.eos_id]  # CLIP's pooled embedding is the EOS token's: keep it
            ids[b, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        return ids

    def null(self, n: int) -> torch.Tensor:
        """n null captions (classifier-free guidance's unconditional input)."""
        ids = torch.full((n, self.context_length), PAD_ID, dtype=torch.long)
        ids[:, 0] = NULL_ID
        return ids


class CLIPTextEncoder(nn.Module):
    """ids [B, L] -> (tokens [B, L, C], keep [B, L] bool) from a frozen CLIP text model; see the module doc."""

    def __init__(self, hf_tokenizer, clip_model: nn.Module, context_length: int = 77, cache_size: int = 10000,
                 model_id: str | None = None, path: str | None = None):
        super().__init__()
        max_len = int(clip_model.config.max_position_embeddings)
        if not 1 < int(context_length) <= max_len:
            raise ConfigError(f"text_encoder.context_length={context_length} must be in 2..{max_len} (the CLIP "
                              f"model's max_position_embeddings)")
        self.tokenizer = CLIPCaptionTokenizer(hf_tokenizer, context_length)
        self.n_embd = int(clip_model.config.hidden_size)
        self.model_id, self.path, self.cache_size = model_id, path, int(cache_size)
        # a plain attribute, not a submodule: out of state_dict(), parameters() and train()
        self.__dict__["_clip"] = clip_model.eval().requires_grad_(False)
        self._cache: collections.OrderedDict[tuple[int, ...], torch.Tensor] = collections.OrderedDict()
        self.null_emb = nn.Parameter(torch.zeros(1, 1, self.n_embd))
        nn.init.normal_(self.null_emb, std=0.02)

    @classmethod
    def from_config(cls, te) -> CLIPTextEncoder:
        """From the ``text_encoder`` config group (``conf/text_encoder/clip.yaml``)."""
        model_id, path = te.get("model_id") or DEFAULT_MODEL_ID, te.get("path") or None
        tok, model = load_clip(model_id, path)
        return cls(tok, model, int(te.get("context_length", 77)), int(te.get("cache_size", 10000)), model_id, path)

    @property
    def clip(self) -> nn.Module:
        """The frozen CLIP text model."""
        return self._clip

    @property
    def null_id(self) -> int:
        return NULL_ID

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer.encode(captions).to(self.null_emb.device)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(): the frozen model too; the cache is stale
        super()._apply(fn, *args, **kwargs)
        self._clip._apply(fn)
        self._cache.clear()
        return self

    @torch.no_grad()
    def _encode_rows(self, rows: list[tuple[int, ...]], device: torch.device) -> list[torch.Tensor]:
        """CLIP's last_hidden_state [n_i, C] of each caption (ids without padding), from the cache or one pass."""
        todo = list(dict.fromkeys(r for r in rows if r not in self._cache))
        fresh: dict[tuple[int, ...], torch.Tensor] = {}
        if todo:
            self._clip.eval()
            n = max(len(r) for r in todo)
            ids = torch.full((len(todo), n), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros(len(todo), n, dtype=torch.long)
            for i, r in enumerate(todo):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            h = self._clip(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            for i, r in enumerate(todo):
                fresh[r] = h[i, :len(r)].detach()
        out = []
        for r in rows:
            if r in fresh:
                x = fresh[r]
                if self.cache_size > 0:
                    self._cache[r] = x
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
            else:
                x = self._cache[r]
                self._cache.move_to_end(r)
            out.append(x)
        return out

    def _rows(self, ids: torch.Tensor) -> tuple[list[tuple[int, ...]], torch.Tensor, torch.Tensor]:
        keep = ids != PAD_ID
        keep[:, 0] = True
        null = ids[:, 0] == NULL_ID
        rows = [tuple(r[:k]) for r, k, z in zip(ids.tolist(), keep.sum(1).tolist(), null.tolist()) if not z]
        return rows, keep, null

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L = ids.shape
        rows, keep, null = self._rows(ids)
        x = torch.zeros(B, L, self.n_embd, device=ids.device, dtype=self.null_emb.dtype)
        real = (~null).nonzero().flatten().tolist()
        for b, h in zip(real, self._encode_rows(rows, ids.device)):
            x[b, :h.shape[0]] = h.to(x.dtype)  # padding positions stay zero (and masked)
        # the null caption: one learned token, nothing else to attend to (always in the graph, for DDP)
        first = torch.zeros(L, dtype=torch.bool, device=ids.device)
        first[0] = True
        x = torch.where(null[:, None, None] & first[None, :, None], self.null_emb.to(x.dtype), x)
        keep = torch.where(null[:, None], first[None], keep)
        return x, keep

    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        """CLIP's pooled embedding [B, C] (the EOS token's last_hidden_state; null captions: ``null_emb``)."""
        x, keep = self.forward(ids)
        last = keep.sum(1) - 1  # the EOS, the caption's last kept token (the null caption: position 0)
        return x[torch.arange(ids.shape[0], device=ids.device), last]

    # what the checkpoint was trained with; the CLIP weights themselves are loaded from path / model id
    def get_extra_state(self) -> dict:
        return {"kind": "clip", "model_id": self.model_id, "path": self.path,
                "name_or_path": str(getattr(self._clip, "name_or_path", "")), "hidden_size": self.n_embd,
                "context_length": self.tokenizer.context_length}

    def set_extra_state(self, state: dict) -> None:
        if state.get("kind") != "clip":
            raise ConfigError(f"this checkpoint's text encoder is text_encoder={state.get('kind', 'learned')}, "
                              "not clip: build the model with the checkpoint's text_encoder config")
        mine = (self.model_id, self.path)
        if (state.get("model_id"), state.get("path")) != mine:
            log.warning("the checkpoint's CLIP text encoder was model_id=%s path=%s; this one is model_id=%s path=%s",
                        state.get("model_id"), state.get("path"), *mine)
