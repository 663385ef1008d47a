"""VQ-Diffusion training objective (Gu et al. 2022, Eq. 6 and 11).

L = L_vlb + lambda * L_aux, estimated with one timestep per sample:

* L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) for t > 1, and the decoder
  NLL -log p_theta(x_0 | x_1) for t = 1 (summed over tokens);
* L_aux = -log p_theta(x_0 | x_t): the KL between the one-hot x_0 and the x_0 prediction.

t is drawn uniformly until every t has been seen ``min_count`` times, then by importance
sampling, p(t) ~ sqrt(E[L_t^2]) from a running mean of L_t^2 per t (Nichol & Dhariwal 2021,
as in the released code); each term is divided by p(t), so the VLB estimate is unbiased.
The history lives in buffers, so it is checkpointed with the stage.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vqtransformer.modules.diffusion import MaskAndReplace, categorical_kl, log_onehot


class DiffusionLoss(nn.Module):
    def __init__(self, num_timesteps: int, aux_weight: float = 5e-4, adaptive_aux: bool = False,
                 importance_sampling: bool = True, min_count: int = 10):
        super().__init__()
        self.T, self.aux_weight, self.adaptive_aux = num_timesteps, aux_weight, adaptive_aux
        self.importance_sampling, self.min_count = importance_sampling, min_count
        self.register_buffer("Lt_history", torch.zeros(num_timesteps))  # running mean of L_t^2, index t-1
        self.register_buffer("Lt_count", torch.zeros(num_timesteps))

    def sample_time(self, b: int, device, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] in 1..T and its probability p(t) [B]."""
        if self.importance_sampling and bool((self.Lt_count > self.min_count).all()):
            w = torch.sqrt(self.Lt_history + 1e-10) + 1e-4
            w[0] = w[1]  # the decoder term (t = 1) is on another scale: use L_2's weight
            p = w / w.sum()
            idx = torch.multinomial(p, b, replacement=True, generator=generator)
            return idx + 1, p[idx]
        t = torch.randint(1, self.T + 1, (b,), device=device, generator=generator)
        return t, torch.full((b,), 1.0 / self.T, device=device)

    @staticmethod
    def terms(denoiser: nn.Module, diffusion: MaskAndReplace, x0: torch.Tensor, t: torch.Tensor,
              y: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """Per-sample L_{t-1} and -log p(x_0 | x_t), each [B] summed over tokens."""
        x_t = diffusion.q_sample(x0, t, generator)
        log_x0 = denoiser(x_t, t, y)
        nll = -log_x0.gather(-1, x0.unsqueeze(-1)).squeeze(-1).sum(1)
        log_true = diffusion.posterior(log_onehot(x0, diffusion.K), x_t, t, t - 1)
        log_model = diffusion.posterior(log_x0, x_t, t, t - 1)
        kl = categorical_kl(log_true, log_model).sum(1)
        return torch.where(t == 1, nll, kl), nll

    def forward(self, denoiser: nn.Module, diffusion: MaskAndReplace, x0: torch.Tensor,
                y: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss for code indices x0 [B, N] (per token), updating the L_t^2 history."""
        B, N = x0.shape
        t, pt = self.sample_time(B, x0.device)
        Lt, nll = self.terms(denoiser, diffusion, x0, t, y)
        with torch.no_grad():
            idx = t - 1
            new = 0.1 * Lt.detach().pow(2) + 0.9 * self.Lt_history.gather(0, idx)
            self.Lt_history.scatter_(0, idx, new)
            self.Lt_count.scatter_add_(0, idx, torch.ones_like(new))
        aux_w = self.aux_weight * ((1 - t / self.T) + 1.0 if self.adaptive_aux else 1.0)
        vlb = (Lt / pt).mean() / N
        total = ((Lt + aux_w * nll) / pt).mean() / N
        logs = {"loss/vlb": vlb.item(), "loss/aux": (nll.mean() / N).item(), "loss/total": total.item()}
        return total, logs

    @torch.no_grad()
    def vlb(self, denoiser: nn.Module, diffusion: MaskAndReplace, x0: torch.Tensor, y: torch.Tensor | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
        """Unbiased one-sample estimate (uniform t) of the full bound, nats per token: T * L_{t-1} + L_T."""
        t = torch.randint(1, self.T + 1, (x0.shape[0],), device=x0.device, generator=generator)
        Lt, _ = self.terms(denoiser, diffusion, x0, t, y, generator)
        return (self.T * Lt + diffusion.prior_kl(x0)).mean() / x0.shape[1]
