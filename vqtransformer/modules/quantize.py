"""Vector quantizer of VQ-VAE / VQGAN with the variants a codebook ablation needs.

``VectorQuantizer`` maps each encoder vector z to its nearest code e_k and passes
gradients straight through (z_q = z + sg[e_k - z]). Loss, as in the VQ-VAE paper::

    L = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2      (beta on the encoder/commitment term)

(the original taming code put beta on the codebook term; we do not). Variants:

* ``ema=True``: codes are exponential moving averages of their assigned vectors
  (no codebook gradient; the loss is the commitment term only);
* ``l2_normalize=True``: z and codes on the unit sphere (cosine similarity lookup);
* ``restart_dead=True``: codes unused for ``dead_after`` training steps are reset to
  random encoder outputs of the current batch;
* ``init``: ``uniform`` (the original: U(-1/K, 1/K)), ``normal``, or ``data`` (the
  first training batch's encoder outputs).

The nearest-code search is chunked so that at most ``chunk_size`` x K distances exist
at once. Under torch.distributed, code statistics are all-reduced and restarts are
broadcast from rank 0, so every rank keeps the same codebook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def nearest_code(z: torch.Tensor, codebook: torch.Tensor, chunk_size: int = 4096, cosine: bool = False) -> torch.Tensor:
    """Index of the nearest row of ``codebook`` [K, D] for each row of ``z`` [N, D].

    argmin_k ||z - e_k||^2 = argmin_k (||e_k||^2 - 2 z.e_k); distances are computed
    ``chunk_size`` rows at a time.
    """
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    codebook = codebook.to(z.dtype)
    e2 = None if cosine else (codebook * codebook).sum(1)
    for start in range(0, z.shape[0], chunk_size):
        zc = z[start:start + chunk_size]
        if cosine:
            out[start:start + chunk_size] = (zc @ codebook.t()).argmax(1)
        else:
            out[start:start + chunk_size] = torch.addmm(e2, zc, codebook.t(), beta=1, alpha=-2).argmin(1)
    return out


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())


class VectorQuantizer(nn.Module):
    kind = "vq"  # codebook.kind (FSQ / LFQ: vqtransformer.modules.scalar_quantize)

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, *, ema: bool = False, decay: float = 0.99,
                 eps: float = 1e-5, l2_normalize: bool = False, restart_dead: bool = False, dead_after: int = 100,
                 usage_window: int = 100, init: str = "uniform", chunk_size: int = 4096):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.ema, self.decay, self.eps = ema, decay, eps
        self.l2_normalize, self.restart_dead, self.dead_after = l2_normalize, restart_dead, dead_after
        self.usage_window, self.init, self.chunk_size = usage_window, init, chunk_size
        self.embedding = nn.Embedding(n_embed, embed_dim)
        if init == "uniform":
            self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)
        elif init in ("normal", "data"):
            self.embedding.weight.data.normal_()
        else:
            raise ValueError(f"codebook.init must be uniform, normal or data, got '{init}'")
        if ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("cluster_size", torch.zeros(n_embed))
            self.register_buffer("embed_avg", self.embedding.weight.data.clone())
        self.register_buffer("initted", torch.tensor(init != "data"))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(n_embed, dtype=torch.long))

    # -- loading: loaded codes are initialised codes ----------------------------
    def complete_state(self, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """``state`` (in place) with what loading codes implies: loaded codes count as initialised, whatever
        the file says (with ``codebook.init=data`` the first training step must not replace a loaded codebook;
        taming's files have no ``initted`` flag, ours may carry ``False`` when saved before the first step);
        bookkeeping a file lacks (taming's) starts fresh; EMA statistics it lacks start from the loaded codes,
        as after the data init (cluster size 1). Loading (``load_state_dict``) applies it; loaders of foreign
        files call it first so that their missing-weight checks see the completed state."""
        weight = state.get(prefix + "embedding.weight")
        if weight is None:
            return state
        state[prefix + "initted"] = torch.tensor(True)
        state.setdefault(prefix + "step", self.step.detach().clone())
        state.setdefault(prefix + "last_used", torch.full_like(self.last_used, int(self.step)))
        if self.ema:
            if prefix + "embed_avg" not in state:
                state[prefix + "embed_avg"] = weight.detach().clone()
                state[prefix + "cluster_size"] = torch.ones_like(self.cluster_size)
            state.setdefault(prefix + "cluster_size", torch.ones_like(self.cluster_size))
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.complete_state(state_dict, prefix)  # (load_state_dict passes its own copy of the caller's dict)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- codebook maintenance (no grad, before the lookup) --------------------
    def _broadcast_codebook(self) -> None:
        if _dist():
            dist.broadcast(self.embedding.weight.data, 0)
            if self.ema:
                dist.broadcast(self.cluster_size, 0)
                dist.broadcast(self.embed_avg, 0)

    def _random_rows(self, z: torch.Tensor, n: int) -> torch.Tensor:
        idx = torch.randint(0, z.shape[0], (n,), device=z.device)
        rows = z[idx]
        if z.shape[0] < n:  # fewer vectors than codes: jitter the repeats
            rows = rows + 0.01 * rows.std() * torch.randn_like(rows)
        return F.normalize(rows, dim=1) if self.l2_normalize else rows

    @torch.no_grad()
    def _maintain(self, z: torch.Tensor) -> None:
        if not bool(self.initted):
            self.embedding.weight.data.copy_(self._random_rows(z, self.n_embed))
            if self.ema:
                self.embed_avg.copy_(self.embedding.weight.data)
                self.cluster_size.fill_(1.0)
            self.initted.fill_(True)
            self.last_used.fill_(int(self.step))
            self._broadcast_codebook()
        if self.restart_dead and int(self.step) > 0:
            dead = (self.step - self.last_used) > self.dead_after
            n_dead = int(dead.sum())
            if n_dead:
                self.embedding.weight.data[dead] = self._random_rows(z, n_dead)
                if self.ema:
                    self.embed_avg[dead] = self.embedding.weight.data[dead]
                    self.cluster_size[dead] = 1.0
                self.last_used[dead] = self.step
                self._broadcast_codebook()

    @torch.no_grad()
    def _update_stats(self, z: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(indices, minlength=self.n_embed).float()
        if self.ema:
            sums = torch.zeros_like(self.embed_avg).index_add_(0, indices, z.float())
        if _dist():
            dist.all_reduce(counts)
            if self.ema:
                dist.all_reduce(sums)
        self.step += 1
        self.last_used[counts > 0] = self.step
        if self.ema:
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            size = (self.cluster_size + self.eps) / (n + self.n_embed * self.eps) * n  # Laplace smoothing
            weight = self.embed_avg / size[:, None]
            self.embedding.weight.data.copy_(F.normalize(weight, dim=1) if self.l2_normalize else weight)
        return counts

    # -- forward --------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.l2_normalize else w

    def forward(self, z: torch.Tensor):
        """z [B, D, H, W] -> (z_q [B, D, H, W], loss, info{indices [B,H,W], perplexity, counts})."""
        B, D, H, W = z.shape
        if D != self.embed_dim:
            raise ValueError(f"quantizer expects {self.embed_dim} channels (codebook.embed_dim), got {D}")
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        if self.l2_normalize:
            z_flat = F.normalize(z_flat, dim=1)
        if self.training:
            self._maintain(z_flat.detach())
        codebook = self.codebook()
        indices = nearest_code(z_flat.detach(), codebook.detach(), self.chunk_size, cosine=self.l2_normalize)
        if self.training:
            counts = self._update_stats(z_flat.detach(), indices)
            codebook = self.codebook()  # EMA may have moved the codes
        else:
            counts = torch.bincount(indices, minlength=self.n_embed).float()
        z_q = F.embedding(indices, codebook)
        commitment = F.mse_loss(z_flat, z_q.detach())
        if self.ema:
            loss = self.beta * commitment
        else:
            loss = F.mse_loss(z_q, z_flat.detach()) + self.beta * commitment
        z_q = z_flat + (z_q - z_flat).detach()  # straight-through estimator
        z_q = z_q.view(B, H, W, D).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last
                                                                   if z.is_contiguous(memory_format=torch.channels_last)
                                                                   else torch.contiguous_format)
        info = {"indices": indices.view(B, H, W), "perplexity": perplexity(counts), "counts": counts}
        return z_q, loss, info

    @torch.no_grad()
    def usage(self) -> tuple[float, int]:
        """(fraction of codes used in the last ``usage_window`` training steps, dead codes by ``dead_after``)."""
        age = self.step - self.last_used
        used = (age < self.usage_window) & (self.last_used > 0)  # last_used 0: never used since creation
        return float(used.float().mean()), int((age > self.dead_after).sum())

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Codes for ``indices`` [B, h, w] (or flat with ``shape=(B, h, w)``) as [B, D, h, w]."""
        if shape is not None:
            indices = indices.view(*shape)
        return F.embedding(indices, self.codebook()).permute(0, 3, 1, 2).contiguous()
