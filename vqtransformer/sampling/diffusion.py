"""VQ-Diffusion samplers over token grids.

* ``standard``: ancestral sampling along a strided time grid T = t_0 > t_1 > ... > 0; each
  jump t -> s draws x_s ~ p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p(x0 | x_t) with the exact
  cumulative s -> t transition (``MaskAndReplace.posterior``).
* ``purity`` (Improved VQ-Diffusion, Tang et al. 2022, Sec. 3.3): start fully masked; at each
  jump unmask as many positions as the schedule's mask rate drops, chosen with probability
  proportional to their *purity* max_k p(x0 = k | x_t), and fill them with samples of
  p(x0 | x_t); unmasked tokens stay.

Both use discrete classifier-free guidance, log p = log p(x0|null) + s (log p(x0|y) -
log p(x0|null)) renormalised, then truncation: keep the smallest set of x0 classes whose
probability reaches r. All randomness comes from ``generator``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vqtransformer.config import ConfigError
from vqtransformer.modules.diffusion import MaskAndReplace, sample_categorical

SAMPLERS = ("standard", "purity")


def time_grid(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` (nearly) evenly strided jumps from T down to 0, e.g. T=100, steps=25 -> [100, 96, ..., 4, 0]."""
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"steps={steps} must be in [1, diffusion.num_timesteps={num_timesteps}]")
    grid = torch.linspace(num_timesteps, 0, steps + 1).round().long().tolist()
    return sorted(set(grid), reverse=True)


def truncate(log_p: torch.Tensor, rate: float, top: int = 64) -> torch.Tensor:
    """Keep the smallest set of classes (at least one) whose cumulative probability reaches ``rate``.

    Sorts only the ``top`` most likely classes, widening (x4) until every row reaches ``rate``.
    """
    if rate >= 1.0:
        return log_p
    K = log_p.shape[-1]
    k = min(top, K)
    while True:
        sorted_lp, order = log_p.topk(k, dim=-1) if k < K else log_p.sort(-1, descending=True)
        p = sorted_lp.exp()
        before = p.cumsum(-1) - p  # mass of the more likely classes
        if k == K or bool((before[..., -1] + p[..., -1] >= rate).all()):
            break
        k = min(4 * k, K)
    keep_sorted = before < rate
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, order, keep_sorted)
    return log_p.masked_fill(~keep, float("-inf")).log_softmax(-1)


@torch.no_grad()
def predict_x0(denoiser: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
               cfg_scale: float = 1.0, truncation_rate: float = 1.0) -> torch.Tensor:
    """Guided, truncated log p(x0 | x_t) [B, N, K]."""
    if y is not None and cfg_scale != 1.0:
        null = torch.full_like(y, denoiser.null_class)
        both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))
        log_c, log_u = both.chunk(2)
        log_p = (log_u + cfg_scale * (log_c - log_u)).log_softmax(-1)
    else:
        log_p = denoiser(x_t, t, y)
    return truncate(log_p, truncation_rate)


@torch.no_grad()
def sample_tokens(denoiser: nn.Module, diffusion: MaskAndReplace, n: int, y: torch.Tensor | None = None,
                  steps: int = 25, truncation_rate: float = 1.0, cfg_scale: float = 1.0, sampler: str = "standard",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Code indices [n, h, w]; ``denoiser`` has ``grid`` (h, w), ``null_class`` and (x_t, t, y) -> log p(x0 | x_t)."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler='{sampler}' is not one of {SAMPLERS}")
    gbar = 1 - diffusion.keep_bar
    if sampler == "purity" and gbar[diffusion.T] <= 0:
        raise ConfigError("the purity sampler unmasks tokens: it needs diffusion.mask_final > 0")
    h, w = denoiser.grid
    N, K = h * w, diffusion.K
    device = diffusion.alpha_bar.device
    if sampler == "standard":
        x = sample_categorical(diffusion.log_prior().expand(n, N, K + 1), generator)
    else:
        x = torch.full((n, N), K, device=device)
    times = time_grid(diffusion.T, steps)
    for t_now, s_now in zip(times[:-1], times[1:]):
        t = torch.full((n,), t_now, device=device)
        s = torch.full((n,), s_now, device=device)
        log_x0 = predict_x0(denoiser, x, t, y, cfg_scale, truncation_rate)
        masked = x == K
        if sampler == "standard":
            log_p = diffusion.posterior(log_x0, x, t, s)
            log_p[..., K].masked_fill_(~masked, float("-inf"))  # [MASK] never comes back
            x = sample_categorical(log_p, generator)
        else:
            n_masked = int(round(N * float(gbar[s_now] / gbar[diffusion.T])))
            n_unmask = int(masked[0].sum()) - n_masked
            if n_unmask <= 0:
                continue
            purity = log_x0.max(-1).values.exp().masked_fill(~masked, 0.0)
            pos = torch.multinomial(purity, n_unmask, replacement=False, generator=generator)
            x0 = sample_categorical(log_x0, generator)
            x = x.scatter(1, pos, x0.gather(1, pos))
    return x.view(n, h, w)
