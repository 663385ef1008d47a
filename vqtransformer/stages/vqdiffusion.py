"""``vqdiffusion`` stage: discrete diffusion over the codes of a frozen VQGAN (Gu et al. 2022).

Images are encoded to code indices by the frozen first stage (``first_stage.ckpt``); the
denoiser learns p(x_0 | x_t) under the mask-and-replace process of ``cfg.diffusion`` with
the VLB + auxiliary loss; samples are decoded back to images. Conditions: none, a class
(``conditioning=class``) or a caption (``conditioning=text``: the batch's ``caption``, encoded by
``text_encoder=learned``, whose vocabulary is built from the first ``text_encoder.vocab_captions``
training captions and saved with the model). Inpainting (capability ``inpaint``): ``sample(...,
inpaint=(image, mask))`` regenerates the code tokens whose f x f cell the pixel mask touches (any overlap)
and keeps every other token at the image's code, at every denoising step and in the output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from vqtransformer.config import ConfigError
from vqtransformer.grids import image_grid, labelled_grid, square_grid
from vqtransformer.losses.diffusion import DiffusionLoss
from vqtransformer.models.conditioning import training_captions
from vqtransformer.models.vqdiffusion import VQDiffusionTransformer
from vqtransformer.modules.diffusion import MaskAndReplace
from vqtransformer.sampling.diffusion import sample_tokens
from vqtransformer.stages.base import OptimizerSpec, Stage


class VQDiffusionStage(Stage):
    name = "vqdiffusion"
    capabilities = frozenset({"sample", "inpaint"})
    sampling_options = ("steps", "truncation_rate", "cfg_scale", "sampler", "prior_weight")
    architecture_keys = ("transformer.n_layer", "transformer.n_head", "transformer.n_embd", "conditioning.type",
                         "diffusion.num_timesteps", "diffusion.mask_final", "diffusion.replace_final")
    grad_clip_key = "stage.grad_clip"

    @classmethod
    def frozen_models(cls, cfg: DictConfig) -> dict[str, tuple[str, DictConfig]]:
        return {"first_stage": ("first_stage", cfg.first_stage)}

    @property
    def condition_type(self) -> str:
        return "text" if self.text_conditional else "class" if self.class_conditional else "none"

    @property
    def condition_needs_data(self) -> bool:
        return self.text_conditional  # without prompts: the captions of the validation data

    def condition_from_batch(self, batch: dict) -> Any:
        return list(batch["caption"]) if self.text_conditional else None

    @property
    def num_classes(self) -> int:
        return int(self.denoiser_module.num_classes)

    def __init__(self, cfg: DictConfig, for_inference: bool = False, first_stage: nn.Module | None = None):
        """``first_stage``: the frozen ``VQModel`` (:func:`vqtransformer.loading.build_stage` loads it from
        ``first_stage.ckpt`` / ``first_stage.run_id``)."""
        super().__init__(cfg, for_inference)
        if first_stage is None:
            raise ConfigError("stage=vqdiffusion needs its frozen first stage: set first_stage.ckpt=PATH (or "
                              "first_stage.run_id=ID) and build the stage with vqtransformer.loading.build_stage")
        self.first_stage = first_stage.eval().requires_grad_(False)
        from vqtransformer.stages.transformer import first_stage_vocab, record_first_stage

        K = first_stage_vocab(first_stage)  # whichever quantizer the first stage has (VQ, FSQ, LFQ)
        record_first_stage(cfg, first_stage)
        res, f = int(cfg.data.resolution), int(first_stage.downsample_factor)
        if res % f:
            raise ConfigError(f"data.resolution={res} is not a multiple of the first stage's downsampling factor {f}")
        grid = (res // f, res // f)
        self.resolution, self.factor = res, f
        d, st = cfg.diffusion, cfg.stage
        self.diffusion = MaskAndReplace(K, d.num_timesteps, d.mask_final, d.replace_final)
        captions = None
        if OmegaConf.select(cfg, "conditioning.type", default="none") == "text" and not for_inference:
            captions = training_captions(cfg)
        self.denoiser = VQDiffusionTransformer.from_config(cfg, K, grid, captions)
        self.loss = DiffusionLoss(d.num_timesteps, st.aux_weight, st.get("adaptive_aux", False),
                                  st.get("importance_sampling", True), st.get("importance_min_count", 10))
        self.class_conditional = self.denoiser.num_classes > 0
        self.text_conditional = self.denoiser.text_encoder is not None
        self.p_uncond = float(OmegaConf.select(cfg, "conditioning.p_uncond", default=0.1))

    @property
    def device(self) -> torch.device:
        return self.diffusion.alpha_bar.device

    # -- training ---------------------------------------------------------------
    def setup(self, accelerator) -> list[OptimizerSpec]:
        self.accelerator = accelerator
        st = self.cfg.stage
        for m in (self.first_stage, self.diffusion, self.loss):
            m.to(accelerator.device)
        opt = torch.optim.AdamW(self.denoiser.parameters(), lr=st.lr, betas=tuple(st.betas),
                                weight_decay=st.weight_decay)
        warmup = max(int(st.get("warmup_steps", 0)), 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        self.denoiser, opt = accelerator.prepare(self.denoiser, opt)
        return [OptimizerSpec("denoiser", opt, [self.denoiser], sched, grad_clip=self.grad_clip())]

    def trainable_modules(self) -> dict[str, nn.Module]:
        # "loss" has no parameters, only the L_t^2 history buffers of importance sampling (checkpointed)
        return {"denoiser": self.denoiser, "loss": self.loss}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> code indices [B, h*w]."""
        return self.first_stage.encode_to_indices(images.to(self.device)).flatten(1)

    def _labels(self, batch: dict, drop: bool) -> torch.Tensor | None:
        """Class ids [B] or caption ids [B, L]; ``drop``: the null class / caption with probability p_uncond."""
        if self.text_conditional:
            if batch.get("caption") is None:
                raise ConfigError("conditioning.type=text needs captions: the batches of this data have no "
                                  "'caption' (data=shapes has them)")
            y = self.denoiser_module.text_encoder.tokenize(list(batch["caption"]))
        elif self.class_conditional:
            y = batch["class_label"].to(self.device).long()
        else:
            return None
        if drop:  # classifier-free guidance: the learned null class / caption with probability p_uncond
            null = torch.rand(y.shape[0], device=y.device) < self.p_uncond
            y = y.masked_fill(null.view(-1, *[1] * (y.dim() - 1)), self.denoiser_module.null_class)
        return y

    @property
    def denoiser_module(self) -> VQDiffusionTransformer:
        return self.unwrap(self.denoiser)

    def training_step(self, batch: dict, step: int, opt_idx: int) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = self.encode(batch[self.image_key])
        return self.loss(self.denoiser, self.diffusion, x0, self._labels(batch, drop=True))

    # -- validation / sampling ----------------------------------------------------------
    @torch.no_grad()
    def validate(self, batch: dict) -> dict[str, float]:
        x0 = self.encode(batch[self.image_key])
        vlb = self.loss.vlb(self.denoiser_module, self.diffusion, x0, self._labels(batch, drop=False))
        return {"val/vlb": vlb.item()}

    def validation_images(self, batch: dict) -> dict[str, torch.Tensor]:
        st = self.cfg.stage
        n = min(int(st.get("val_samples", 16)), batch[self.image_key].shape[0])
        seed = int(OmegaConf.select(self.cfg, "trainer.seed", default=0) or 0)
        kw = {"steps": st.sample_steps, "sampler": st.get("sampler", "standard"), "seed": seed}
        if self.text_conditional:  # one row per caption of the validation batch, the caption under it
            k = max(1, n // 4)
            prompts = list(batch["caption"])[:4]
            rows = [self.sample(k, p, **kw) for p in prompts]
            return {"samples": labelled_grid(rows, prompts)}
        if self.class_conditional:  # one row per requested class
            k = max(1, n // 2)
            y = torch.arange(self.num_classes).repeat_interleave(k)
            return {"samples": image_grid(list(self.sample(len(y), y, **kw).split(k)))}
        return {"samples": square_grid(self.sample(n, None, **kw))}

    def inpaint_region(self, mask: torch.Tensor) -> torch.Tensor:
        """The code tokens [h, w] (bool) a pixel mask [H, W] (True = regenerate; H = W = ``data.resolution``)
        regenerates: those whose f x f cell holds at least one masked pixel (any overlap), so that no masked
        pixel keeps its image code."""
        r = self.resolution
        if tuple(mask.shape) != (r, r):
            raise ConfigError(f"the inpainting mask is {list(mask.shape)} pixels; this model's images are {r}x{r} "
                              "(data.resolution)")
        cells = F.max_pool2d(mask.to(self.device, torch.float32).view(1, 1, r, r), self.factor)
        return cells.view(r // self.factor, r // self.factor) > 0

    @torch.no_grad()
    def sample(self, n: int, condition: Any = None, steps: int = 25, truncation_rate: float | None = None,
               cfg_scale: float | None = None, sampler: str = "standard", seed: int = 0,
               generator: torch.Generator | None = None, prior_weight: float = 0.0,
               inpaint: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """n images [n, 3, H, W] in [-1, 1]; ``condition``: class ids (int, list or tensor [n]), for a
        text-conditional model a prompt (str) or n prompts, or None (the null class / caption).
        Defaults: ``stage.truncation_rate``, ``stage.cfg_scale``.
        ``prior_weight``: r of Improved VQ-Diffusion's purity prior (``sampler=purity``; 0 = off).
        ``inpaint``: (image [3, H, W] or [1, 3, H, W] in [-1, 1] at ``data.resolution``, pixel mask [H, W],
        True = regenerate): the tokens of ``inpaint_region(mask)`` are sampled (under ``condition``), every
        other token is the image's code at every step (``sample_tokens``' ``known`` / ``region``)."""
        st = self.cfg.stage
        truncation_rate = st.truncation_rate if truncation_rate is None else truncation_rate
        cfg_scale = st.cfg_scale if cfg_scale is None else cfg_scale
        y = None
        if condition is not None and self.text_conditional:
            prompts = [condition] * n if isinstance(condition, str) else list(condition)
            if not all(isinstance(p, str) for p in prompts) or len(prompts) not in (1, n):
                raise ConfigError(f"this vqdiffusion model is text-conditional: give a prompt or {n} prompts, "
                                  f"not {condition!r:.100}")
            y = self.denoiser_module.text_encoder.tokenize(prompts).expand(n, -1)
        elif condition is not None:
            if not self.class_conditional:
                raise ConfigError("this vqdiffusion model is unconditional (conditioning.type=none): pass condition=None")
            if isinstance(condition, str) or (isinstance(condition, (list, tuple)) and
                                              any(isinstance(c, str) for c in condition)):
                raise ConfigError("this vqdiffusion model is class-conditional (conditioning.type=class): "
                                  "give class ids, not prompts")
            y = torch.as_tensor(condition, device=self.device).long().reshape(-1).expand(n)
        known = region = None
        if inpaint is not None:
            image, mask = inpaint
            r = self.resolution
            image = image.unsqueeze(0) if image.dim() == 3 else image
            if image.dim() != 4 or image.shape[0] != 1 or tuple(image.shape[1:]) != (3, r, r):
                raise ConfigError(f"the image to inpaint is {list(image.shape)}; this model needs one RGB image "
                                  f"[3, {r}, {r}] (data.resolution={r})")
            region = self.inpaint_region(mask)
            if not bool(region.any()):
                raise ConfigError("the inpainting mask is empty: there is nothing to regenerate")
            known = self.encode(image)
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(seed)
        denoiser = self.denoiser_module
        was_training = denoiser.training
        denoiser.eval()
        try:
            idx = sample_tokens(denoiser, self.diffusion, n, y, steps, truncation_rate, cfg_scale, sampler, generator,
                                prior_weight=prior_weight, known=known, region=region)
        finally:
            denoiser.train(was_training)
        return self.first_stage.decode_indices(idx).clamp(-1, 1)
