"""VQ-Diffusion's mask-and-replace discrete diffusion (Gu et al., CVPR 2022, Sec. 3.2-3.3).

States are the K codebook indices plus one absorbing ``[MASK]`` (index K). One forward
step keeps a code with probability ``alpha_t``, moves it to each of the K codes with
``beta_t`` and masks it with ``gamma_t`` (``alpha_t + K beta_t + gamma_t = 1``); [MASK]
stays [MASK]. Products of such matrices are again mask-and-replace, with

    alpha_{s->t} = abar_t / abar_s,   1 - gamma_{s->t} = (1 - gbar_t) / (1 - gbar_s),
    K beta_{s->t} = 1 - alpha_{s->t} - gamma_{s->t},

so ``q(x_t | x_0)`` (s = 0) and every strided jump ``s -> t`` are closed form. Time is
1-based as in the paper: x_0 is data, x_T the (almost) fully masked prior. Distributions
are log-probabilities over the last dimension: ``[..., K]`` for x_0, ``[..., K + 1]`` for x_t.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vqtransformer.config import ConfigError

LOG_EPS = -69.0776  # log(1e-30): the floor of every log-probability (as in the released code)


def log_onehot(x: torch.Tensor, num_states: int) -> torch.Tensor:
    """Indices [...] -> exact log one-hot [..., num_states] (0 and -inf)."""
    out = torch.full((*x.shape, num_states), float("-inf"), device=x.device)
    return out.scatter_(-1, x.unsqueeze(-1), 0.0)


def sample_categorical(log_p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel-max sample of the categorical ``exp(log_p)`` over the last dim."""
    u = torch.rand(log_p.shape, device=log_p.device, generator=generator).clamp_(1e-30, 1.0)
    return (log_p - torch.log(-torch.log(u))).argmax(-1)


def categorical_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) over the last dim."""
    return (log_q.exp() * (log_q - log_p)).sum(-1)


class MaskAndReplace(nn.Module):
    """Schedule and transition math; buffers hold ``abar_t`` and ``1 - gbar_t`` for t = 0..T.

    The cumulative mask rate ``gbar_t`` and replace rate ``K bbar_t`` grow linearly from 0
    to ``mask_final`` and ``replace_final`` at t = T (paper: 0.9 and 0.1).
    """

    def __init__(self, num_codes: int, num_timesteps: int = 100, mask_final: float = 0.9,
                 replace_final: float = 0.1):
        super().__init__()
        if not (0.0 <= mask_final <= 1.0 and 0.0 < replace_final and mask_final + replace_final <= 1.0):
            raise ConfigError(f"diffusion.mask_final={mask_final} and diffusion.replace_final={replace_final} must "
                             "satisfy 0 <= mask, 0 < replace, mask + replace <= 1 (use replace ~1e-6 for almost "
                             "pure masking)")
        self.K, self.T = num_codes, num_timesteps
        frac = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        gbar, rbar = mask_final * frac, replace_final * frac
        # float64: ratios of nearly equal cumulative products must not cancel
        self.register_buffer("alpha_bar", 1.0 - gbar - rbar, persistent=False)
        self.register_buffer("keep_bar", 1.0 - gbar, persistent=False)  # 1 - gbar_t = abar_t + K bbar_t

    # -- coefficients -----------------------------------------------------------
    def log_coeffs(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """log alpha, log beta, log gamma of the jump s -> t (s <= t; s = 0 gives q(x_t | x_0)), each [B, 1, 1]."""
        a = self.alpha_bar[t] / self.alpha_bar[s]
        keep = self.keep_bar[t] / self.keep_bar[s]
        b, g = (keep - a) / self.K, 1.0 - keep
        return tuple(torch.log(c.clamp_min(1e-30)).float().view(-1, 1, 1) for c in (a, b, g))

    # -- forward process -----------------------------------------------------------
    def q_pred(self, log_x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Push a distribution of x_s [B, N, K+1] through the jump s -> t: log q(x_t) [B, N, K+1]."""
        la, lb, lg = self.log_coeffs(s, t)
        log_unmasked = log_x[..., : self.K].logsumexp(-1, keepdim=True)  # log (1 - x_mask)
        codes = torch.logaddexp(log_x[..., : self.K] + la, lb + log_unmasked)
        mask = torch.logaddexp(log_x[..., self.K:], lg + log_unmasked)
        return torch.cat([codes, mask], -1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) for code indices x0 [B, N], t [B]: keep w.p. abar_t, a uniform code w.p. K bbar_t, else [MASK]."""
        u = torch.rand(x0.shape, device=x0.device, generator=generator, dtype=torch.float64)
        a, keep = self.alpha_bar[t].unsqueeze(1), self.keep_bar[t].unsqueeze(1)
        rand_code = torch.randint(0, self.K, x0.shape, device=x0.device, generator=generator)
        return torch.where(u < a, x0, torch.where(u < keep, rand_code, torch.full_like(x0, self.K)))

    def log_prior(self) -> torch.Tensor:
        """p(x_T) [K+1]: [MASK] w.p. gbar_T, each code w.p. (1 - gbar_T)/K (q(x_T | x_0) for a uniform x_0)."""
        keep = self.keep_bar[self.T].float()
        return torch.cat([(keep / self.K).log().expand(self.K), (1 - keep).clamp_min(1e-30).log().view(1)])

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || p(x_T)) summed over tokens: [B] (0 when abar_T = 0)."""
        T = torch.full((x0.shape[0],), self.T, device=x0.device)
        log_q = self.q_pred(log_onehot(x0, self.K + 1), torch.zeros_like(T), T).clamp_min(LOG_EPS)
        return categorical_kl(log_q, self.log_prior().to(log_q)).sum(1)

    # -- reverse process --------------------------------------------------------------
    def posterior(self, log_x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """log p(x_s | x_t) = log sum_x0 q(x_s | x_t, x0) p(x0 | x_t) for 0 <= s < t: [B, N, K+1].

        ``log_x0`` [B, N, K] is log p(x0 | x_t) (a log one-hot gives the true posterior
        q(x_s | x_t, x0)). With Bayes, q(x_s | x_t, x0) = q(x_t | x_s) q(x_s | x0) / q(x_t | x0), so

            p(x_s | x_t) = q(x_t | x_s) * [Qbar_s^T w](x_s),   w(x0) = p(x0 | x_t) / q(x_t | x0),

        one linear push of w through the cumulative transition to s. Strided jumps use the
        exact s -> t transition, so chaining t -> t-1 -> ... -> s gives the same marginal.
        """
        K = self.K
        masked = (x_t == K).unsqueeze(-1)  # [B, N, 1]
        j = x_t.clamp(max=K - 1).unsqueeze(-1)  # the observed code (a dummy where x_t = [MASK])
        zero = torch.zeros_like(t)
        # q(x_t | x0) is constant in x0 except at x0 = x_t (a code), where it is abar_t + bbar_t instead of
        # bbar_t; up to per-token constants (removed by the final normalisation) w = p(x0 | x_t) there / (1 + abar_t / bbar_t)
        la, lb, _ = self.log_coeffs(zero, t)
        log_w = log_x0.scatter_add(-1, j, (lb - torch.logaddexp(la, lb)).expand_as(j).masked_fill(masked, 0.0))
        log_sum_w = log_w.logsumexp(-1, keepdim=True)
        # push w through Qbar_s: codes get abar_s w_k + bbar_s sum(w), [MASK] gets gbar_s sum(w)
        la, lb, lg = self.log_coeffs(zero, s)
        codes = torch.logaddexp(log_w + la, lb + log_sum_w)
        mask = lg + log_sum_w
        # times q(x_t | x_s) over x_s. x_t = [MASK]: gamma from a code, 1 from [MASK];
        # x_t = j: beta from a code, alpha + beta from j, 0 from [MASK] (a [MASK] never becomes a code)
        la, lb, lg = self.log_coeffs(s, t)
        codes = codes + torch.where(masked, lg, lb)
        codes = codes.scatter_add(-1, j, (torch.logaddexp(la, lb) - lb).expand_as(j).masked_fill(masked, 0.0))
        mask = mask.masked_fill(~masked, float("-inf"))
        log_p = torch.cat([codes, mask], -1)
        return (log_p - log_p.logsumexp(-1, keepdim=True)).clamp_min(LOG_EPS)
