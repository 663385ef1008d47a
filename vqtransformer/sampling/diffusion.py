"""VQ-Diffusion samplers over token grids.

* ``standard``: ancestral sampling along a strided time grid T = t_0 > t_1 > ... > 0; each
  jump t -> s draws x_s ~ p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p(x0 | x_t) with the exact
  cumulative s -> t transition (``MaskAndReplace.posterior``).
* ``purity`` (Improved VQ-Diffusion, Tang et al. 2022, Sec. 3.3): start fully masked; at each
  jump unmask as many positions as the schedule's mask rate drops, chosen with probability
  proportional to their *purity* max_k p(x0 = k | x_t), and fill them with samples of
  p(x0 | x_t) (optionally sharpened by the purity prior, ``prior_weight`` r, see
  ``purity_prior``); unmasked tokens stay. The denoiser is shown the timestep whose cumulative
  mask rate gbar_t is nearest the *current* fraction of [MASK] tokens (``timestep_for_mask_fraction``),
  not the grid time: the all-[MASK] start and the rescaled unmasking schedule are not states of
  q(x_t | x_0) at the grid times unless gbar_T = 1. With ``diffusion=paper`` (gbar_T = 0.9, 10% of
  the tokens replaced at t = T) the all-[MASK] start lies outside the training distribution
  altogether; the sampler warns about it.

Both use discrete classifier-free guidance, log p = log p(x0|null) + s (log p(x0|y) -
log p(x0|null)) renormalised, then truncation: keep the smallest set of x0 classes whose
probability reaches r. All randomness comes from ``generator``.

Inpainting (``known`` codes and a ``region`` to regenerate; the known tokens reset after every step, as
in microsoft/VQ-Diffusion's released inpainting): only the region starts from the sampler's start
state (the prior / [MASK]); every other position holds its known code from the start and is set
back to it after every step, so the output equals ``known`` there exactly. The time each sampler
shows the denoiser follows its own rule, applied to the whole, partially known sequence:

* ``standard``: the grid time t. The region is a draw of the chain at t (the posterior jump t -> s
  needs that t, and the region's unmasked tokens may be replacements, as at t); the known codes are
  what x_0 holds there, which a training input of that t keeps with probability abar_t.
* ``purity``: the t whose gbar_t is nearest the [MASK] fraction of the *whole* sequence, the known
  tokens counting as unmasked (an M-token region starts at fraction M / N, not 1); the region is
  unmasked on the schedule rescaled to its size, round(M gbar_s / gbar_T) [MASK] tokens left after
  the jump to s. With the full region both reduce to ordinary sampling, draw for draw.
"""

from __future__ import annotations

import warnings

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


def timestep_for_mask_fraction(gbar: torch.Tensor, fraction: float) -> int:
    """The t in 1..T whose cumulative mask rate ``gbar[t]`` is nearest ``fraction`` (ties: the smaller t).

    A state with a fraction f of [MASK] tokens is most like a training input x_t ~ q(x_t | x_0) at
    that t (its expected mask fraction is gbar_t). f above gbar_T (e.g. the all-[MASK] start
    with gbar_T = 0.9) gives T; t = 0 (clean data) is never returned.
    """
    return int((gbar[1:] - fraction).abs().argmin()) + 1


def purity_prior(log_x0: torch.Tensor, prior_weight: float) -> torch.Tensor:
    """Improved VQ-Diffusion's purity prior (Tang et al. 2022, Eq. 11, weight r = ``prior_weight``).

    With the purity of position n, pur_n = max_k p(x0 = k | x_t), normalised by the largest purity
    of its sample, s_n = pur_n / max_m pur_m in [0, 1], the x0 distribution is sharpened

        p'(x0 = k) = p(x0 = k)^(1 + r s_n) / sum_j p(x0 = j)^(1 + r s_n),

        i.e. log p' = log_softmax((1 + r s_n) log p),

    so r = 0 leaves p unchanged and r > 0 moves mass to each position's most likely class, more so
    at pure (confident) positions. This is the released implementation: microsoft/VQ-Diffusion,
    image_synthesis/modeling/transformers/diffusion_transformer.py, ``p_sample`` with
    ``prior_rule == 2`` and ``prior_weight`` ("'r' in Equation.11 of Improved VQ-Diffusion"):
    ``score = exp(log_x_recon).max(1).clamp(0, 1); score /= score.max(1) + 1e-10;
    prob = ((1 + score * prior_weight) * log_x_recon).softmax(1)``. (A factor (1 + r s_n) on p
    itself would be a no-op: it is the same for every class of a position and cancels on
    renormalisation; the weight multiplies log p.) ``log_x0`` [B, N, K]; the max runs over all N
    positions of a sample, as in the released code.
    """
    if prior_weight == 0:
        return log_x0
    purity = log_x0.max(-1).values.exp().clamp(0, 1)  # [B, N]
    score = purity / (purity.max(-1, keepdim=True).values + 1e-10)
    return ((1 + prior_weight * score).unsqueeze(-1) * log_x0).log_softmax(-1)


def _warn_if_outside_training(gbar_T: float, N: int) -> None:
    """The purity sampler starts from all [MASK]; q(x_T | x_0) leaves N (1 - gbar_T) tokens unmasked on average."""
    if N * (1 - gbar_T) >= 0.5:
        warnings.warn(
            f"sampler=purity starts from all-[MASK] tokens, but this diffusion schedule's final mask rate is "
            f"gbar_T = {gbar_T:.6g} < 1: training inputs at t = T keep {1 - gbar_T:.2%} of the tokens "
            f"(~{N * (1 - gbar_T):.1f} of {N}) unmasked, so the all-[MASK] start lies outside the training "
            "distribution. The denoiser is given the t whose mask rate gbar_t is nearest the current [MASK] "
            "fraction (t = T while that fraction exceeds gbar_T). A schedule with gbar_T ~ 1 "
            "(diffusion=released) matches this sampler.", UserWarning, stacklevel=4)


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


def inpainting_start(known: torch.Tensor, region: torch.Tensor, n: int, K: int,
                     grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked, flattened ``known`` codes [n, N] and ``region`` [N] (bool, True = regenerate) of an inpainting.

    ``known``: [N], [h, w], [1 or n, N] or [1 or n, h, w] code indices in [0, K) (positions inside the region
    are ignored); ``region``: [N] or [h, w], one region for all n rows, at least one position.
    """
    h, w = grid
    N = h * w
    if region.numel() != N:
        raise ConfigError(f"the inpainting region must have one entry per code token of the {h}x{w} grid")
    region = region.reshape(-1).bool()
    if not bool(region.any()):
        raise ConfigError("the inpainting region is empty: there is nothing to regenerate")
    if known.numel() not in (N, n * N):
        raise ConfigError(f"the known codes of an inpainting must be [{h}, {w}] or [{n}, {h}, {w}], "
                          f"not {list(known.shape)}")
    known = known.long().reshape(-1, N).expand(n, N)
    outside = known[:, ~region]
    if outside.numel() and (int(outside.min()) < 0 or int(outside.max()) >= K):
        raise ConfigError(f"the known codes of an inpainting must be code indices in [0, {K})")
    return known, region


@torch.no_grad()
def sample_tokens(denoiser: nn.Module, diffusion: MaskAndReplace, n: int, y: torch.Tensor | None = None,
                  steps: int = 25, truncation_rate: float = 1.0, cfg_scale: float = 1.0, sampler: str = "standard",
                  generator: torch.Generator | None = None, prior_weight: float = 0.0,
                  known: torch.Tensor | None = None, region: torch.Tensor | None = None) -> torch.Tensor:
    """Code indices [n, h, w]; ``denoiser`` has ``grid`` (h, w), ``null_class`` and (x_t, t, y) -> log p(x0 | x_t).

    ``prior_weight`` (purity sampler only): r of Improved VQ-Diffusion's purity prior
    (``purity_prior``); 0 (default) samples p(x0 | x_t) unchanged.
    ``known`` and ``region`` (together; ``inpainting_start``): inpainting, the positions outside ``region``
    fixed at the ``known`` codes at every step and in the output, the region sampled (module docstring).
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler='{sampler}' is not one of {SAMPLERS}")
    if prior_weight < 0 or (prior_weight != 0 and sampler != "purity"):
        raise ConfigError(f"prior_weight={prior_weight} must be >= 0, and is for sampler=purity only")
    gbar = 1 - diffusion.keep_bar
    if sampler == "purity" and gbar[diffusion.T] <= 0:
        raise ConfigError("the purity sampler unmasks tokens: it needs diffusion.mask_final > 0")
    if (known is None) != (region is None):
        raise ConfigError("inpainting needs both the known codes and the region to regenerate")
    h, w = denoiser.grid
    N, K = h * w, diffusion.K
    device = diffusion.alpha_bar.device
    if known is not None:
        known, region = inpainting_start(known.to(device), region.to(device), n, K, (h, w))
    M = N if region is None else int(region.sum())  # the tokens to sample
    if sampler == "purity":
        _warn_if_outside_training(float(gbar[diffusion.T]), M)

    def keep_known(x: torch.Tensor) -> torch.Tensor:
        return x if region is None else torch.where(region, x, known)

    if sampler == "standard":
        x = sample_categorical(diffusion.log_prior().expand(n, N, K + 1), generator)
    else:
        x = torch.full((n, N), K, device=device)
    x = keep_known(x)
    times = time_grid(diffusion.T, steps)
    for t_now, s_now in zip(times[:-1], times[1:]):
        masked = x == K
        if sampler == "purity":  # the t a training input with this mask fraction comes from (all rows alike;
            # known tokens count as unmasked)
            t_now = timestep_for_mask_fraction(gbar, float(masked[0].sum()) / N)
        t = torch.full((n,), t_now, device=device)
        s = torch.full((n,), s_now, device=device)
        log_x0 = predict_x0(denoiser, x, t, y, cfg_scale, truncation_rate)
        if sampler == "standard":
            log_p = diffusion.posterior(log_x0, x, t, s)
            log_p[..., K].masked_fill_(~masked, float("-inf"))  # [MASK] never comes back
            x = keep_known(sample_categorical(log_p, generator))
        else:
            n_masked = int(round(M * float(gbar[s_now] / gbar[diffusion.T])))  # the schedule, on the region
            n_unmask = int(masked[0].sum()) - n_masked
            if n_unmask <= 0:
                continue
            purity = log_x0.max(-1).values.exp().masked_fill(~masked, 0.0)  # known tokens are never masked
            pos = torch.multinomial(purity, n_unmask, replacement=False, generator=generator)
            x0 = sample_categorical(purity_prior(log_x0, prior_weight), generator)
            x = keep_known(x.scatter(1, pos, x0.gather(1, pos)))
    return x.view(n, h, w)
