"""Stage 1: VQGAN. Generator step (L1 + LPIPS + codebook + adaptive GAN term) then
discriminator step, on the same batch, as in taming's two-optimizer training."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from vqtransformer.grids import image_grid
from vqtransformer.losses.diffaugment import DiffAugment
from vqtransformer.losses.gan import D_LOSSES, generator_loss
from vqtransformer.losses.perceptual import build_lpips
from vqtransformer.models.conditioning import one_hot_map
from vqtransformer.models.vqgan import VQModel
from vqtransformer.modules.discriminator import NLayerDiscriminator
from vqtransformer.stages.base import OptimizerSpec, Stage, lr_schedule
from vqtransformer.training.checkpoint import load, load_module_state

PIXEL_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}  # first_stage.loss.pixel_loss


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    delta: float = 1e-4, max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_{last} L_rec|| / (||grad_{last} L_GAN|| + delta), clamped to [0, max], no gradient."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + delta)
    return torch.clamp(weight, 0.0, max_weight).detach()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


class VQGANStage(Stage):
    name = "vqgan"
    capabilities = frozenset({"reconstruct"})
    architecture_keys = ("first_stage.ch", "first_stage.ch_mult", "first_stage.num_res_blocks",
                         "first_stage.attn_resolutions", "first_stage.z_channels", "first_stage.norm_min_group_channels",
                         "codebook.kind", "codebook.n_embed", "codebook.embed_dim", "codebook.levels",
                         "codebook.l2_normalize", "data.target", "first_stage.loss.disc_num_layers",
                         "first_stage.loss.disc_ndf", "first_stage.loss.disc_norm")

    def __init__(self, cfg: DictConfig, for_inference: bool = False):
        super().__init__(cfg, for_inference)
        if cfg.first_stage.get("taming_config"):  # the architecture of a taming VQGAN comes from its YAML
            from vqtransformer.models.taming import apply_taming_configs

            apply_taming_configs(cfg)  # (the entry points applied it already, refusing contradicting overrides)
        fs, lc = cfg.first_stage, cfg.first_stage.loss
        self.target = cfg.data.get("target", "image")
        self.image_key = self.target
        self.num_seg_classes = int(cfg.data.get("num_classes", 0) or 0) + 1 if self.target == "segmentation" else 0
        channels = {"image": 3, "depth": 1, "segmentation": self.num_seg_classes}[self.target]
        self.vqgan = VQModel.from_config(fs, cfg.codebook, in_channels=channels)
        self.discriminator = NLayerDiscriminator(channels, lc.disc_ndf, lc.disc_num_layers,
                                                 str(lc.get("disc_norm", "batch")))
        self.perceptual = None
        if lc.perceptual == "lpips" and self.target == "image" and lc.perceptual_weight > 0 and not for_inference:
            self.perceptual = build_lpips(lc.lpips_net, lc.get("lpips_weights"), lc.get("lpips_random_backbone", False))
        elif lc.perceptual not in ("lpips", "none"):
            raise ValueError(f"first_stage.loss.perceptual must be 'lpips' or 'none', got '{lc.perceptual}'")
        self.lc = lc
        self._recs: dict[int, torch.Tensor] = {}
        if fs.get("pretrained") and not for_inference:
            self.load_pretrained()

    # -- initial weights: one of our checkpoints, or taming's (with its project YAML) ---------------
    def load_pretrained(self) -> None:
        """``first_stage.pretrained``: our vqgan checkpoint, or a taming VQGAN whose architecture
        ``first_stage.taming_config`` gave (applied to the config by :mod:`vqtransformer.loading`). Loaded codes
        count as initialised (``codebook.init=data`` keeps them); a weight the model does not have is an error."""
        from vqtransformer.config import ConfigError
        from vqtransformer.models import taming

        path = self.cfg.first_stage.pretrained
        state = load(path)
        if isinstance(state.get("model"), dict) and "vqgan" in state["model"]:
            self.load_state_dict(state["model"])  # one of ours
            return
        yaml = self.cfg.first_stage.get("taming_config")
        if not yaml:
            raise ConfigError(f"first_stage.pretrained={path} is not a vqtransformer checkpoint; a taming-transformers "
                              "VQGAN needs its project YAML: set first_stage.taming_config=PATH/to/*-project.yaml "
                              "(its architecture, e.g. GroupNorm's 32 groups, is in no weight)")
        project = taming.read_project(yaml, "first_stage.taming_config")  # a VQGAN's or a Net2Net's (its first stage)
        prefix = taming.PREFIX["first_stage"] if taming.is_net2net(project) else ""
        model_sd, disc_sd, dropped = taming.split_vqgan_state(taming.state_dict_of(state), prefix)
        load_module_state(self.vqgan, taming.complete_vqgan_state(self.vqgan, model_sd),
                          what=f"first_stage.pretrained={path}", dropped=dropped)
        if disc_sd:
            load_module_state(self.discriminator, disc_sd, what=f"the discriminator of first_stage.pretrained={path}")

    # -- setup --------------------------------------------------------------
    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"vqgan": self.vqgan, "discriminator": self.discriminator}

    def learning_rate(self, accelerator) -> float:
        st = self.cfg.stage
        if st.get("learning_rate"):
            return float(st.learning_rate)
        # taming: lr = accumulate_grad_batches * num_gpus * batch_size * base_lr
        scale = self.cfg.trainer.grad_accum * accelerator.num_processes * self.cfg.data.batch_size
        return float(st.base_learning_rate) * (scale if st.get("scale_lr", True) else 1)

    def setup(self, accelerator) -> list[OptimizerSpec]:
        self.accelerator = accelerator
        lr, betas = self.learning_rate(accelerator), tuple(self.cfg.stage.betas)
        self.lr = lr
        cl = self.cfg.trainer.get("channels_last", True)
        if cl:
            self.vqgan.to(memory_format=torch.channels_last)
            self.discriminator.to(memory_format=torch.channels_last)
        # first_stage.betas: the autoencoder's own Adam betas (null: stage.betas, taming's (0.5, 0.9) for both)
        ae_betas = tuple(self.cfg.first_stage.get("betas") or betas)
        opt_ae = torch.optim.Adam([p for p in self.vqgan.parameters() if p.requires_grad], lr=lr, betas=ae_betas)
        # TTUR (Heusel et al. 2017): the discriminator may learn faster than the generator it must follow
        d_lr = lr * float(self.lc.get("disc_lr_mult", 1.0) or 1.0)
        opt_disc = torch.optim.Adam(self.discriminator.parameters(), lr=d_lr, betas=betas)
        self.vqgan, self.discriminator, opt_ae, opt_disc = accelerator.prepare(
            self.vqgan, self.discriminator, opt_ae, opt_disc)
        if self.perceptual is not None:
            self.perceptual.to(accelerator.device, memory_format=torch.channels_last if cl else torch.preserve_format)
        clip = self.grad_clip()
        # the generator's schedule (taming: constant); the discriminator keeps its constant lr
        fs = self.cfg.first_stage
        factor = lr_schedule(str(fs.get("lr_schedule", "constant")), int(fs.get("warmup_steps", 0) or 0),
                             int(self.cfg.trainer.max_steps), float(fs.get("min_lr_ratio", 0.0) or 0.0),
                             key="first_stage.lr_schedule")
        sched = torch.optim.lr_scheduler.LambdaLR(opt_ae, factor)
        return [OptimizerSpec("generator", opt_ae, [self.vqgan], scheduler=sched, grad_clip=clip),
                OptimizerSpec("discriminator", opt_disc, [self.discriminator], start_step=self.d_start,
                              grad_clip=clip)]

    @property
    def d_start(self) -> int:
        """First discriminator step: ``disc_pretrain_steps`` before its gradient reaches the generator."""
        return max(0, int(self.lc.disc_start) - int(self.lc.get("disc_pretrain_steps", 0) or 0))

    def adversarial_factor(self, step: int) -> float:
        """disc_factor, ramped linearly from 0 over ``disc_ramp_steps`` steps from ``disc_start`` (0: a step)."""
        ramp = int(self.lc.get("disc_ramp_steps", 0) or 0)
        if step < self.lc.disc_start:
            return 0.0
        return float(self.lc.disc_factor) * (min(1.0, (step - self.lc.disc_start + 1) / ramp) if ramp > 0 else 1.0)

    # -- inputs --------------------------------------------------------------
    def inputs(self, batch: dict) -> torch.Tensor:
        x = batch[self.target]
        if self.target == "segmentation":
            x = one_hot_map(x, self.num_seg_classes)
        if self.cfg.trainer.get("channels_last", True):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def reconstruction_loss(self, x: torch.Tensor, xrec: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per-pixel reconstruction term: L1 (taming; ``first_stage.loss.pixel_loss=mse``: squared error)
        (+ LPIPS) for images, cross-entropy for label maps."""
        if self.target == "segmentation":
            return F.cross_entropy(xrec.float(), batch["segmentation"].long())
        rec = self.lc.pixelloss_weight * PIXEL_LOSSES[self.lc.get("pixel_loss", "l1")](xrec, x)
        if self.perceptual is not None:
            rec = rec + self.lc.perceptual_weight * self.perceptual(x, xrec).mean()
        return rec

    # -- training ----------------------------------------------------------
    def training_step(self, batch: dict, step: int, opt_idx: int):
        x = self.inputs(batch)
        if opt_idx == 0:
            xrec, qloss, info = self.vqgan(x)
            nll = self.reconstruction_loss(x, xrec, batch)
            loss = nll + self.lc.codebook_weight * qloss
            logs = {"loss/rec": nll.item(), "loss/codebook": qloss.item(), "codebook/perplexity": info["perplexity"].item()}
            if step >= self.lc.disc_start:
                factor = self.adversarial_factor(step)
                fm_weight = float(self.lc.get("disc_fm_weight", 0.0) or 0.0)
                if float(self.lc.disc_weight) > 0 or fm_weight <= 0:
                    loss, gan_logs = self.generator_gan_loss(nll, qloss, xrec, factor)
                    logs.update(gan_logs)
                if fm_weight > 0:
                    fm, logits_fake = self.feature_matching(x, xrec)
                    loss = loss + fm_weight * factor * fm
                    logs["loss/fm"] = fm.item()
                    if "loss/g" not in logs:  # no adversarial term: how D rates the reconstructions, for the record
                        logs.update({"loss/g": generator_loss(logits_fake.detach(), self.lc.disc_loss).item(),
                                     "loss/d_weight": 0.0, "loss/adv_factor": factor})
            if step >= self.d_start:
                self._recs[id(batch)] = xrec.detach()  # the loop passes the same batch to the D step
            logs["loss/total"] = loss.item()
            usage, dead = self.unwrap(self.vqgan).quantize.usage()
            logs.update({"codebook/usage": usage, "codebook/dead": dead})
            return loss, logs
        xrec = self._recs.pop(id(batch), None)
        if xrec is None:  # D step without a generator step on this batch: reconstruct without side effects
            model = self.unwrap(self.vqgan)
            model.eval()
            with torch.no_grad():
                xrec = model(x)[0]
            model.train()
        real = self.d_view(x.detach())
        gamma = float(self.lc.get("disc_r1_gamma", 0.0) or 0.0)
        if gamma > 0:
            real.requires_grad_(True)
        logits_real = self.discriminator(real)
        logits_fake = self.discriminator(self.d_view(xrec.detach()))
        d_loss = D_LOSSES[self.lc.disc_loss](logits_real, logits_fake)
        logs = {"disc/logits_real": logits_real.mean().item(), "disc/logits_fake": logits_fake.mean().item()}
        if gamma > 0:  # R1 (Mescheder et al. 2018): gamma/2 E ||grad_x D(x)||^2 on reals
            (grad,) = torch.autograd.grad(logits_real.sum(), real, create_graph=True)
            r1 = grad.float().pow(2).flatten(1).sum(1).mean()
            d_loss = d_loss + 0.5 * gamma * r1
            logs["disc/r1"] = r1.item()
        d_loss = self.lc.disc_factor * d_loss
        logs["loss/disc"] = d_loss.item()
        return d_loss, logs

    def feature_matching(self, x: torch.Tensor, xrec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Discriminator feature matching (pix2pixHD, Wang et al. 2018, eq. 4), paired:
        L_FM = 1/L sum_l mean |D_l(x) - D_l(x_rec)|, over the outputs D_l of D's L activations.

        A learned perceptual distance between an image and its own reconstruction: unlike the
        adversarial term it rewards no pattern that is absent from the input (e.g. the pixel noise of
        ``shapes`` backgrounds, which the adversarial term makes the decoder invent), and it keeps D
        informative, since G does not climb D's logits. No gradient reaches D. Returns (L_FM, D's
        logits on the reconstructions)."""
        disc = self.unwrap(self.discriminator)
        disc.requires_grad_(False)
        h_real, h_fake = self.d_view(x.detach()), self.d_view(xrec)
        total, n = xrec.new_zeros(()), 0
        for layer in disc.main:
            h_real, h_fake = layer(h_real), layer(h_fake)
            if isinstance(layer, nn.LeakyReLU):
                total = total + (h_real.detach() - h_fake).abs().mean()
                n += 1
        disc.requires_grad_(True)
        return total / max(n, 1), h_fake

    def d_view(self, x: torch.Tensor) -> torch.Tensor:
        """What the discriminator sees: ``first_stage.loss.disc_augment`` (a DiffAugment policy, applied
        to reals and fakes alike, in both steps; null = the images themselves, as in taming)."""
        policy = self.lc.get("disc_augment")
        return DiffAugment(x, policy, float(self.lc.get("disc_augment_strength", 1.0))) if policy else x

    def generator_gan_loss(self, nll: torch.Tensor, qloss: torch.Tensor, xrec: torch.Tensor, factor: float | None = None):
        """L = nll + lambda * factor * L_GAN + codebook_weight * L_codebook, with the adaptive lambda
        (``factor``: disc_factor, or its ramp, :meth:`adversarial_factor`).

        Returned as a surrogate with the same parameter gradients: the gradients of nll and L_GAN
        with respect to the decoder output are computed once; lambda needs their images at the
        decoder's last layer (one conv weight-gradient each), and the backward pass then reuses
        them, so LPIPS and the discriminator are back-propagated once instead of twice.
        """
        disc = self.unwrap(self.discriminator)  # no DDP hooks: D gets no grads here
        disc.requires_grad_(False)
        g_loss = generator_loss(disc(self.d_view(xrec)), self.lc.disc_loss)
        disc.requires_grad_(True)
        grad_nll = torch.autograd.grad(nll, xrec, retain_graph=True)[0]
        grad_gan = torch.autograd.grad(g_loss, xrec, retain_graph=True)[0]
        if self.lc.get("disc_adaptive_weight", True):
            last = self.unwrap(self.vqgan).get_last_layer()
            w_nll = torch.autograd.grad(xrec, last, grad_outputs=grad_nll, retain_graph=True)[0]
            w_gan = torch.autograd.grad(xrec, last, grad_outputs=grad_gan, retain_graph=True)[0]
            cap = float(self.lc.get("disc_weight_max", 1e4))
            d_weight = torch.clamp(w_nll.norm() / (w_gan.norm() + 1e-4), 0.0, cap).detach() * self.lc.disc_weight
        else:  # a fixed weight: an uninformative D (small gradients) then pushes the decoder little
            d_weight = torch.tensor(float(self.lc.disc_weight))
        factor = float(self.lc.disc_factor) if factor is None else factor
        grad_total = (grad_nll + d_weight * factor * grad_gan).detach()
        surrogate = (xrec * grad_total).sum() + self.lc.codebook_weight * qloss
        true_loss = nll.detach() + d_weight * factor * g_loss.detach() + self.lc.codebook_weight * qloss.detach()
        # value of the true loss, gradients of the surrogate
        loss = surrogate + (true_loss - surrogate.detach())
        return loss, {"loss/g": g_loss.item(), "loss/d_weight": d_weight.item(), "loss/adv_factor": factor}

    def after_step(self, step: int) -> None:
        self._recs.clear()

    # -- validation -----------------------------------------------------------
    def reconstruction_model(self) -> nn.Module:
        return self.unwrap(self.vqgan)

    def _reconstruct(self, batch: dict):
        model = self.unwrap(self.vqgan)
        x = self.inputs(batch).to(next(model.parameters()).device)
        xrec, qloss, info = model(x)
        return x, xrec, qloss, info

    def validate(self, batch: dict) -> dict[str, float]:
        x, xrec, qloss, info = self._reconstruct(batch)
        counts = info["counts"].cpu()
        self._val_counts = counts if getattr(self, "_val_counts", None) is None else self._val_counts + counts
        out = {"val/loss_codebook": qloss.item()}
        if self.target == "segmentation":
            out["val/ce"] = F.cross_entropy(xrec.float(), batch["segmentation"].to(xrec.device).long()).item()
            out["val/pixel_acc"] = (xrec.argmax(1).cpu() == batch["segmentation"]).float().mean().item()
        else:
            # on the [0, 1] scale, as eval/l1 (images here are in [-1, 1]: half their difference)
            out["val/l1"] = ((x.float().clamp(-1, 1) - xrec.float().clamp(-1, 1)).abs().mean() / 2).item()
            out["val/psnr"] = psnr(xrec.float(), x.float()).mean().item()
        return out

    def validation_end(self) -> dict[str, float]:
        from vqtransformer.modules.quantize import perplexity

        counts, self._val_counts = getattr(self, "_val_counts", None), None
        if counts is None:
            return {}
        return {"val/codebook_usage": float((counts > 0).float().mean()), "val/perplexity": float(perplexity(counts))}

    def validation_images(self, batch: dict) -> dict[str, torch.Tensor]:
        x, xrec, _, _ = self._reconstruct(batch)
        if self.target == "segmentation":
            x, xrec = self.colorize(x.argmax(1)), self.colorize(xrec.argmax(1))
        labels = batch.get("class_label")
        if labels is not None and len(labels.unique()) > 1:  # a row per class: input, reconstruction, ...
            labels = labels.to(x.device)
            rows = [torch.stack([x[labels == c], xrec[labels == c]], 1).flatten(0, 1) for c in labels.unique()]
            return {"reconstructions": image_grid(rows)}
        return {"reconstructions": image_grid([x, xrec], max_cols=8)}  # inputs above, reconstructions below  # inputs above, reconstructions below

    def colorize(self, labels: torch.Tensor) -> torch.Tensor:
        return colorize(labels, self.num_seg_classes)


def colorize(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label maps [B, H, W] -> RGB [B, 3, H, W] in [-1, 1]: a fixed palette, background (id 0) black."""
    g = torch.Generator().manual_seed(0)
    palette = torch.rand(num_classes, 3, generator=g) * 2 - 1
    palette[0] = -1
    return palette[labels.cpu()].permute(0, 3, 1, 2)
