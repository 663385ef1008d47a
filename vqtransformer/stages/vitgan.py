"""The ``vitgan`` stage: unconditional ViTGAN training (Lee et al., ICLR 2022).

Optimizer 0 is the generator (non-saturating loss through DiffAugment and D), optimizer 1 the
discriminator (non-saturating loss on DiffAugment views of reals and detached fakes, + bCR,
+ optional R1). The generator's EMA copy samples and is evaluated.

bCR (Zhao et al., 2020, "Improved Consistency Regularization for GANs") adds
``lambda_real E||D(T1(x)) - D(T2(x))||^2 + lambda_fake E||D(T1(G(z))) - D(T2(G(z)))||^2`` with
``T1`` = DiffAugment (``vitgan.augment``, the view of the adversarial loss) and ``T2`` =
DiffAugment with ``vitgan.bcr.policy`` at full strength, drawn independently and each applied
once to the *raw* real / detached fake images (not ``T2(T1(x))``). With ``augment.strength=0``
this is the paper's ``||D(x) - D(T(x))||^2``.

Config: ``stage.*`` (``lr``, ``betas``, ``lr_d``, ``grad_clip``, ``sample_grid``) and the
``vitgan`` group (architecture, ``augment``, ``bcr``, ``r1_gamma``, ``ema_decay``,
``mapping_lr_mul``, ``equalized_lr``, and the optimiser defaults ``lr``/``betas``).

The EMA is updated once per generator optimizer step: by the loop's ``after_step`` hook, or
at the start of the discriminator step that follows, whichever comes first.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig

from vqtransformer.grids import square_grid
from vqtransformer.losses.diffaugment import DiffAugment
from vqtransformer.losses.vitgan import consistency, d_loss_nonsat, g_loss_nonsat, r1_penalty
from vqtransformer.models.vitgan import EMA, Discriminator, Generator
from vqtransformer.stages.base import OptimizerSpec, Stage


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters of ``module`` take no gradient inside the block (flags restored after)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def adam_param_groups(module: nn.Module, lr: float, equalized: bool, lr_mul: float = 1.0) -> list[dict]:
    """Adam parameter groups; with ``equalized``, the equalized learning rate of Karras et al.

    StyleGAN-style layers (and the public ViTGAN code) store weights as ``N(0, 1)`` and scale
    them by ``1/sqrt(fan_in)`` at run time, so a learning rate such as the paper's 2e-3 moves
    each weight by about ``lr / sqrt(fan_in)``. Adam is invariant to that reparametrisation up
    to the step size, so plain ``nn.Linear`` weights with a per-layer learning rate of
    ``lr * lr_mul / sqrt(fan_in)`` follow the same trajectory; vectors (biases, norms,
    embeddings) get ``lr * lr_mul``.
    """
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        is_weight = p.dim() >= 2 and name.split(".")[-1] in ("weight", "original")  # ISN keeps it in .original
        fan_in = p[0].numel() if is_weight else 1
        plr = lr * lr_mul / (fan_in ** 0.5 if equalized else 1.0)
        groups.setdefault(plr, []).append(p)
    # largest (the base lr) first: the loop logs param_groups[0]["lr"]
    return [{"params": groups[plr], "lr": plr} for plr in sorted(groups, reverse=True)]


class ViTGANStage(Stage):
    name = "vitgan"
    capabilities = frozenset({"sample"})
    architecture_keys = ("vitgan.latent_dim", "vitgan.mapping_depth", "vitgan.generator.n_head",
                         "vitgan.generator.decoder", "vitgan.discriminator.n_head", "vitgan.discriminator.isn")
    grad_clip_key = "stage.grad_clip"

    def __init__(self, cfg: DictConfig, for_inference: bool = False):
        super().__init__(cfg, for_inference)
        self.v = cfg.vitgan
        self.generator = Generator.from_config(self.v)
        self.discriminator = Discriminator.from_config(self.v)
        self.ema = EMA(self.generator, self.v.ema_decay)
        # fakes of the generator micro-batches, reused (in order) by the discriminator micro-batches
        self._fakes: list[torch.Tensor] = []
        self._ema_pending = False  # a generator step happened whose EMA update is still due

    # -- training ---------------------------------------------------------
    def setup(self, accelerator) -> list[OptimizerSpec]:
        self.accelerator = accelerator
        s, eq = self.cfg.stage, self.v.equalized_lr
        lr, betas = s.lr, tuple(s.betas)
        lr_d = s.get("lr_d") or lr
        G, mapping = self.generator, self.generator.mapping
        rest = nn.ModuleList(m for name, m in G.named_children() if name != "mapping")
        opt_g = torch.optim.Adam(adam_param_groups(rest, lr, eq)
                                 + adam_param_groups(mapping, lr, eq, self.v.mapping_lr_mul), lr=lr, betas=betas)
        opt_d = torch.optim.Adam(adam_param_groups(self.discriminator, lr_d, eq), lr=lr_d, betas=betas)
        self.generator, self.discriminator, opt_g, opt_d = accelerator.prepare(
            self.generator, self.discriminator, opt_g, opt_d)
        self.ema.to(accelerator.device)
        clip = self.grad_clip()
        return [OptimizerSpec("generator", opt_g, [self.generator], grad_clip=clip),
                OptimizerSpec("discriminator", opt_d, [self.discriminator], grad_clip=clip)]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return DiffAugment(x, self.v.augment.policy, self.v.augment.strength)

    def _real(self, batch: dict) -> torch.Tensor:
        real = batch[self.image_key]
        if real.shape[-1] != self.v.image_size or real.shape[-2] != self.v.image_size:
            raise ValueError(f"batch images are {tuple(real.shape[-2:])} px but vitgan.image_size="
                             f"{self.v.image_size}; set vitgan.image_size (default: data.resolution)")
        return real

    def training_step(self, batch: dict, step: int, opt_idx: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self._generator_step(batch) if opt_idx == 0 else self._discriminator_step(batch)

    def _generator_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        real = self._real(batch)
        z = torch.randn(real.shape[0], self.v.latent_dim, device=real.device)
        fake = self.generator(z)
        self._fakes = self._fakes[-15:] + [fake.detach()]
        # the unwrapped D, frozen: a DDP-wrapped D would otherwise wait for gradients it never gets
        with frozen(self.unwrap(self.discriminator)) as D:
            loss = g_loss_nonsat(D(self._augment(fake)))
        self._ema_pending = True
        return loss, {"loss/g": loss.item()}

    def after_step(self, step: int) -> None:
        """Loop hook after all optimizer steps: the EMA update for this step's generator step."""
        if self._ema_pending:
            self.ema.update(self.unwrap(self.generator))
            self._ema_pending = False

    def _discriminator_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        self.after_step(-1)  # G has been stepped already: update the EMA now if still due
        real = self._real(batch)
        B = real.shape[0]
        fake = self._fakes.pop(0) if self._fakes else None
        if fake is None or fake.shape[0] != B:
            with torch.no_grad():
                fake = self.generator(torch.randn(B, self.v.latent_dim, device=real.device))
        r1_gamma = self.v.r1_gamma
        if r1_gamma > 0:
            real = real.detach().requires_grad_(True)
        raw = torch.cat([real, fake.detach()])
        x = self._augment(raw)
        lam_r, lam_f = self.v.bcr.real, self.v.bcr.fake
        use_bcr = lam_r > 0 or lam_f > 0
        if use_bcr:  # bCR: D(T1(x)) vs D(T2(x)), two independent views of the raw images, one forward for both
            x = torch.cat([x, DiffAugment(raw, self.v.bcr.policy, 1.0)])
        logits = self.discriminator(x)
        d_real, d_fake = logits[:B], logits[B:2 * B]
        loss = d_loss_nonsat(d_real, d_fake)
        logs = {"d/real": d_real.mean().item(), "d/fake": d_fake.mean().item()}
        if use_bcr:
            bcr = lam_r * consistency(d_real, logits[2 * B:3 * B]) + lam_f * consistency(d_fake, logits[3 * B:])
            loss = loss + bcr
            logs["bcr"] = bcr.item()
        if r1_gamma > 0:
            r1 = r1_penalty(d_real, real)
            loss = loss + 0.5 * r1_gamma * r1
            logs["r1"] = r1.item()
        logs["loss/d"] = loss.item()
        return loss, logs

    # -- validation / sampling ---------------------------------------------
    @torch.no_grad()
    def validate(self, batch: dict) -> dict[str, float]:
        """Mean D logits on real images and on EMA-generator samples (no augmentation)."""
        real = self._real(batch)
        D = self.unwrap(self.discriminator)
        fake = self.ema(torch.randn(real.shape[0], self.v.latent_dim, device=real.device))
        d_real, d_fake = D(real).mean().item(), D(fake).mean().item()
        return {"d/real": d_real, "d/fake": d_fake, "d/gap": d_real - d_fake}

    @torch.no_grad()
    def validation_images(self, batch: dict) -> dict[str, torch.Tensor]:
        """An 8x8 grid (``stage.sample_grid``) of EMA samples from fixed noise, in [0, 1]."""
        nrow = self.cfg.stage.get("sample_grid", 8)
        x = self.sample(nrow * nrow, seed=0)
        return {"samples": square_grid(x, nrow)}

    @torch.no_grad()
    def sample(self, n: int, condition: Any = None, seed: int | None = None, batch_size: int | None = None,
               **kwargs) -> torch.Tensor:
        """``n`` EMA-generator images in [-1, 1], ``[n, 3, H, W]``; ``seed`` makes ``z`` reproducible."""
        if condition is not None:
            raise ValueError("vitgan is unconditional: sample() takes no condition")
        device = next(self.ema.parameters()).device
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        z = self.ema.module.sample_z(n, generator=gen).to(device)
        return torch.cat([self.ema(zb) for zb in z.split(batch_size or n)])

    # -- checkpoints ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator_ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "generator_ema" in state:
            self.ema.load_state_dict(state["generator_ema"])
        else:  # a checkpoint without EMA: start the average from the generator
            self.ema.module.load_state_dict(self.unwrap(self.generator).state_dict())
