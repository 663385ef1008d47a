"""Autoregressive sampling from the GPT prior of "Taming Transformers".

* :func:`sample_cached`: one forward pass over the prefix (condition tokens plus any given
  image codes) fills a static, preallocated :class:`KVCache`; then one token per step, the head
  evaluated on the last position only.
* :func:`sample_naive`: taming's loop, the whole sequence recomputed at every step (the
  reference the cached sampler must match token for token).
* :func:`sample_sliding`: images larger than the training grid (paper, sec. 3.2 / fig. 3):
  each position is sampled from a window of the trained size around it, centred except at the
  borders; while the window does not move, its KV cache carries over from one position to the
  next, so the cost is linear in the number of positions.
* :func:`sample`: picks one of them from the grid and the trained window.

Every sampler draws one uniform number per sequence and position from ``generator``, in raster
order, so equal seeds give equal tokens across samplers. Logits are shaped by temperature (0: greedy),
top-k, top-p (nucleus) and classifier-free guidance,
``l = l_c + (s - 1) (l_c - l_u)`` (= ``l_u + s (l_c - l_u)``; exact ``l_c`` at ``s = 1``).

Text-conditional GPTs take caption ids ``text`` [B, L] (and, with guidance, the null caption
``utext``, the unconditional rows): every sampler encodes ``[text; utext]`` once, in one pass of the
text encoder; the cached and sliding-window samplers compute the captions' cross-attention keys
and values once, into the KV cache, for all tokens and windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqtransformer.models.gpt import GPT


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1 (or null)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (or null)")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value kept), -inf elsewhere."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of top tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs >= p  # mass before this token already reaches p (never the top one)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def guide(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on a stacked batch ``[cond; uncond]`` -> [B, V]."""
    cond, uncond = logits.chunk(2)
    return cond + (scale - 1.0) * (cond - uncond)


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token [B] from logits [B, V] (or [2B, V] stacked cond/uncond with guidance)."""
    logits = logits.float()
    if params.cfg_scale != 1.0:
        logits = guide(logits, params.cfg_scale)
    if params.temperature == 0:
        return logits.argmax(-1)
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    # inverse-CDF draw: one uniform per row (cheaper than torch.multinomial's exponential per class)
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(cdf.shape[1] - 1)


def _inputs(gpt: GPT, c: torch.Tensor, uc: torch.Tensor | None, z: torch.Tensor | None,
            params: SamplingParams) -> torch.Tensor:
    """Model input [B or 2B, Lc + Lz]: the conditional rows, then (with guidance) the unconditional ones."""
    x = gpt.sequence(c, z)
    if params.cfg_scale == 1.0:
        return x
    if uc is None:
        raise ValueError("sample.cfg_scale != 1 needs unconditional tokens: train with conditioning.type=class "
                         "and conditioning.p_uncond > 0")
    return torch.cat((x, gpt.sequence(uc, z)))


def _context(gpt: GPT, text: torch.Tensor | None, utext: torch.Tensor | None,
             params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The encoded captions of the rows of :func:`_inputs` (text GPTs): ``text``, then with guidance
    the null captions ``utext``, in one pass of the text encoder."""
    if text is None:
        if utext is not None:
            raise ValueError("utext (null captions) without text (captions)")
        return None
    if params.cfg_scale == 1.0:
        return gpt.encode_text(text)
    if utext is None:
        raise ValueError("sample.cfg_scale != 1 needs the null caption: train with conditioning.p_uncond > 0 and "
                         "pass utext=gpt.null_text(B)")
    return gpt.encode_text(torch.cat((text, utext)))


def _check_length(gpt: GPT, n: int, what: str) -> None:
    if n > gpt.block_size:
        raise ValueError(f"{what} needs {n} positions but transformer.block_size={gpt.block_size}; sample the "
                         "trained grid, or pass window=<trained grid> for the sliding-window sampler")


@torch.inference_mode()
def sample_cached(gpt: GPT, c: torch.Tensor, steps: int, z: torch.Tensor | None = None,
                  uc: torch.Tensor | None = None, params: SamplingParams | None = None,
                  generator: torch.Generator | None = None, *, text: torch.Tensor | None = None,
                  utext: torch.Tensor | None = None) -> torch.Tensor:
    """Continue ``[c, z]`` by ``steps`` image codes with a static KV cache; returns [B, Lz + steps].

    c: local condition ids [B, Lc]; z: given image codes [B, Lz] (half-image completion) or None;
    uc: unconditional condition ids for classifier-free guidance; text / utext: caption ids [B, L]
    and null-caption ids (text-conditional GPTs).
    """
    params = params or SamplingParams()
    x = _inputs(gpt, c, uc, z, params)
    _check_length(gpt, x.shape[1] + steps - 1, "sampling")
    B = c.shape[0]
    out = torch.empty(B, steps, dtype=torch.long, device=c.device)
    if steps == 0:
        return out if z is None else z
    cache = gpt.new_cache(x.shape[0], x.shape[1] + steps - 1, context=_context(gpt, text, utext, params))
    logits = gpt(x, cache, last_only=True)
    for t in range(steps):
        tok = pick(logits, params, generator)
        out[:, t] = tok
        if t + 1 < steps:
            logits = gpt((tok if x.shape[0] == B else tok.repeat(2))[:, None], cache, last_only=True)
    return out if z is None else torch.cat((z, out), 1)


@torch.inference_mode()
def sample_naive(gpt: GPT, c: torch.Tensor, steps: int, z: torch.Tensor | None = None,
                 uc: torch.Tensor | None = None, params: SamplingParams | None = None,
                 generator: torch.Generator | None = None, *, text: torch.Tensor | None = None,
                 utext: torch.Tensor | None = None) -> torch.Tensor:
    """Taming's sampler: the full sequence is recomputed at every step (same contract as :func:`sample_cached`;
    captions are encoded once, their cross-attention recomputed with the rest)."""
    params = params or SamplingParams()
    x = _inputs(gpt, c, uc, z, params)
    _check_length(gpt, x.shape[1] + steps - 1, "sampling")
    B = c.shape[0]
    ctx = _context(gpt, text, utext, params)
    kw = {} if ctx is None else {"context": ctx}
    for _ in range(steps):
        tok = pick(gpt(x, **kw)[:, -1], params, generator)
        x = torch.cat((x, (tok if x.shape[0] == B else tok.repeat(2))[:, None]), 1)
    return x[:B, c.shape[1]:]


def window_origin(i: int, size: int, window: int) -> int:
    """First row (or column) of the window for position i: centred, clamped to the grid (taming)."""
    return min(max(i - window // 2, 0), size - window)


@torch.inference_mode()
def sample_sliding(gpt: GPT, c: torch.Tensor, grid: tuple[int, int], window: tuple[int, int],
                   z: torch.Tensor | None = None, start: int = 0, uc: torch.Tensor | None = None,
                   params: SamplingParams | None = None, generator: torch.Generator | None = None, *,
                   text: torch.Tensor | None = None, utext: torch.Tensor | None = None) -> torch.Tensor:
    """Sample an ``grid`` = (H, W) code grid with a transformer trained on ``window`` = (h, w) grids.

    Position (i, j) is sampled from the window starting at ``(window_origin(i, H, h),
    window_origin(j, W, w))``, i.e. from the window's condition tokens and its image codes
    before (i, j) in the window's raster order. c (and uc) are either non-spatial [B, Lc]
    (the same prefix for every window) or spatial [B, H, W] (cropped with the window).
    z [B, H, W] holds given codes; positions ``< start`` (raster order) are kept.
    text / utext: captions (text GPTs), the same for every window: their cross-attention keys and
    values are computed once and kept by the cache across windows. Returns codes [B, H, W].
    """
    params = params or SamplingParams()
    (H, W), (h, w) = grid, window
    if h > H or w > W:
        raise ValueError(f"window {h}x{w} is larger than the grid {H}x{W}")
    spatial = c.dim() == 3
    if spatial and tuple(c.shape[1:]) != (H, W):
        raise ValueError(f"spatial condition grid {tuple(c.shape[1:])} must equal the image grid {(H, W)} "
                         "for sliding-window sampling")
    B = c.shape[0]
    z = torch.zeros(B, H, W, dtype=torch.long, device=c.device) if z is None else z.clone()
    Lc = h * w if spatial else c.shape[1]
    _check_length(gpt, Lc + h * w - 1, f"a {h}x{w} window")
    guided = params.cfg_scale != 1.0
    cache = gpt.new_cache(B * (2 if guided else 1), Lc + h * w - 1, context=_context(gpt, text, utext, params))
    prev = None  # (origin, local index) of the previous position
    logits = None
    for p in range(start, H * W):
        i, j = divmod(p, W)
        origin = (window_origin(i, H, h), window_origin(j, W, w))
        k = (i - origin[0]) * w + (j - origin[1])
        if prev == (origin, k - 1):  # window did not move: feed the last sampled code
            pi, pj = divmod(p - 1, W)
            tok = z[:, pi, pj]
            logits = gpt((tok.repeat(2) if guided else tok)[:, None], cache, last_only=True)
        else:  # window moved (or first position): recompute its prefix
            rows, cols = slice(origin[0], origin[0] + h), slice(origin[1], origin[1] + w)
            cw = c[:, rows, cols].flatten(1) if spatial else c
            ucw = None if uc is None else (uc[:, rows, cols].flatten(1) if spatial else uc)
            cache.reset()
            logits = gpt(_inputs(gpt, cw, ucw, z[:, rows, cols].flatten(1)[:, :k], params), cache, last_only=True)
        z[:, i, j] = pick(logits, params, generator)
        prev = (origin, k)
    return z


def sample(gpt: GPT, c: torch.Tensor, grid: tuple[int, int], window: tuple[int, int] | None = None,
           z: torch.Tensor | None = None, start: int = 0, uc: torch.Tensor | None = None,
           params: SamplingParams | None = None, generator: torch.Generator | None = None, *,
           text: torch.Tensor | None = None, utext: torch.Tensor | None = None) -> torch.Tensor:
    """Codes [B, H, W] for ``grid``: the cached sampler when the grid is the trained ``window`` (or no
    window is given), else the sliding-window sampler. ``z``/``start``: given codes kept before ``start``
    (``start = H * W // 2``: half-image completion). Spatial conditions [B, H, W] are flattened.
    ``text`` / ``utext``: caption and null-caption ids of a text-conditional GPT (both samplers)."""
    H, W = grid
    if window is None or tuple(window) == (H, W):
        flat = c.flatten(1) if c.dim() == 3 else c
        uflat = None if uc is None else (uc.flatten(1) if uc.dim() == 3 else uc)
        given = None if z is None or start == 0 else z.flatten(1)[:, :start]
        return sample_cached(gpt, flat, H * W - start, given, uflat, params, generator, text=text,
                             utext=utext).view(-1, H, W)
    return sample_sliding(gpt, c, grid, window, z, start, uc, params, generator, text=text, utext=utext)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


__all__ = ["SamplingParams", "top_k_filter", "top_p_filter", "guide", "pick", "sample", "sample_cached",
           "sample_naive", "sample_sliding", "window_origin", "make_generator"]
