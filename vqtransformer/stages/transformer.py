"""``transformer`` stage: the GPT prior of "Taming Transformers" over the codes of a frozen VQGAN.

Images are encoded to code indices s by the frozen first stage (``first_stage.ckpt`` or
``first_stage.run_id``, a vqgan run of ours or a taming VQGAN with ``first_stage.taming_config``; loaded by
:mod:`vqtransformer.loading` and given to the stage), conditions to tokens c (``conditioning.type``), and the GPT is trained
with the likelihood L = E[-log p(s | c)] = -sum_i log p(s_i | s_<i, c) (teacher forcing). With
``stage.pkeep`` < 1 a fraction 1 - pkeep of the *input* codes is replaced by random codes
(targets stay clean), as in taming. Logged: ``loss/train``, ``val/nll`` (nats per token),
``val/bpd`` (``val/nll`` / ln 2, bits per token) and sample grids.

Text conditioning (``conditioning=text``): the batch's ``caption``, encoded by ``text_encoder`` (the
factory shared with stage=vqdiffusion; the ``learned`` encoder's vocabulary comes from the first
``text_encoder.vocab_captions`` training captions and is saved with the model), is cross-attended
by every GPT block (:mod:`vqtransformer.models.gpt`); with probability ``conditioning.p_uncond`` a
caption is replaced by the null caption in training, so ``sample.cfg_scale`` != 1 guides with it.
``sample()`` then takes prompts, and refuses class labels and maps (as other models refuse prompts).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from vqtransformer.config import ConfigError
from vqtransformer.data.codes import CodeCache, cache_key, fingerprint
from vqtransformer.grids import image_grid, labelled_grid
from vqtransformer.models.conditioning import (
    ConditionError,
    Conditioning,
    build_conditioning,
    build_text_encoder,
    needs_vq,
    one_hot_map,
    training_captions,
)
from vqtransformer.models.gpt import GPT, for_cpu_inference
from vqtransformer.sampling.autoregressive import SamplingParams, make_generator, sample
from vqtransformer.stages.base import OptimizerSpec, Stage, lr_schedule
from vqtransformer.stages.vqgan import colorize


def first_stage_vocab(first_stage: nn.Module) -> int:
    """The second stage's vocabulary: the number of codes of whichever quantizer the first stage has
    (learned VQ: ``n_embed``; FSQ: prod(levels); LFQ: 2^bits)."""
    return int(first_stage.quantize.n_embed)


def record_first_stage(cfg: DictConfig, first_stage: nn.Module) -> dict[str, Any]:
    """Write what a second stage models into its config, so that the run's params say it (the loop logs
    the flattened config): ``first_stage.codebook.{kind,size,dim,embed_dim}``, ``first_stage.arch.*``
    (f, ch, ch_mult, z_channels, ...), ``first_stage.checkpoint``; a null ``transformer.vocab_size``
    becomes the first stage's K."""
    from vqtransformer.modules.scalar_quantize import describe

    dd = dict(getattr(first_stage, "ddconfig", {}) or {})
    record = {
        "codebook": describe(first_stage.quantize),
        "arch": {"f": int(getattr(first_stage, "downsample_factor", 0) or 0),
                 **{k: dd[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels",
                                       "resolution") if k in dd}},
        "checkpoint": str(getattr(first_stage, "checkpoint_path", None)
                          or OmegaConf.select(cfg, "first_stage.ckpt", default=None) or ""),
    }
    levels = getattr(first_stage.quantize, "levels", None)
    if levels:
        record["codebook"]["levels"] = list(levels)
    if OmegaConf.is_readonly(cfg):
        return record
    with open_dict(cfg):
        if cfg.get("first_stage") is None:
            cfg.first_stage = {}
        cfg.first_stage.codebook = record["codebook"]
        cfg.first_stage.arch = record["arch"]
        cfg.first_stage.checkpoint = record["checkpoint"]
        if "transformer" in cfg and cfg.transformer.get("vocab_size") is None:
            cfg.transformer.vocab_size = first_stage_vocab(first_stage)
    return record


class TransformerStage(Stage):
    name = "transformer"
    capabilities = frozenset({"sample", "nll", "complete", "larger_grid"})
    sampling_options = ("temperature", "top_k", "top_p", "cfg_scale", "grid")
    architecture_keys = ("transformer.n_layer", "transformer.n_head", "transformer.n_embd", "transformer.block_size",
                         "conditioning.type")
    optimizer_key = "transformer"
    grad_clip_key = "transformer.grad_clip"

    @classmethod
    def frozen_models(cls, cfg: DictConfig) -> dict[str, tuple[str, DictConfig]]:
        models = {"first_stage": ("first_stage", cfg.first_stage)}
        if needs_vq(cfg.conditioning):
            models["cond_stage"] = ("conditioning", cfg.conditioning)
        return models

    @property
    def condition_type(self) -> str:
        return self.cond.type

    @property
    def num_classes(self) -> int:
        return int(self.cond.num_classes or 0) if self.cond.type == "class" else 0

    def __init__(self, cfg: DictConfig, for_inference: bool = False, first_stage: nn.Module | None = None,
                 cond_stage: nn.Module | None = None):
        """``first_stage``: the frozen VQModel of the images; ``cond_stage``: the frozen VQ model of the condition
        maps (``conditioning.type`` segmentation / depth, or lowres with its own). :func:`vqtransformer.loading.
        build_stage` loads both from the config."""
        super().__init__(cfg, for_inference)
        if OmegaConf.select(cfg, "transformer.taming_config", default=None):  # a taming GPT: its YAML is the architecture
            from vqtransformer.models.taming import apply_taming_configs

            apply_taming_configs(cfg)  # (the entry points applied it already, refusing contradicting overrides)
        tr = cfg.transformer
        if first_stage is None:
            raise ConfigError("stage=transformer needs its frozen first stage: set first_stage.ckpt=PATH (or "
                              "first_stage.run_id=ID) and build the stage with vqtransformer.loading.build_stage")
        self.first_stage = first_stage.eval().requires_grad_(False)
        # a first stage trained with data.target=segmentation|depth makes this a prior over those maps
        self.image_key = getattr(first_stage, "target", "image")
        V = first_stage_vocab(first_stage)
        if tr.get("vocab_size") and int(tr.vocab_size) != V:
            raise ConfigError(f"transformer.vocab_size={tr.vocab_size} but the first stage "
                              f"({getattr(first_stage, 'checkpoint_path', 'first_stage')}) has {V} codes "
                              f"(its {getattr(first_stage.quantize, 'kind', 'vq')} quantizer's n_embed); "
                              f"set transformer.vocab_size={V} (or null)")
        record_first_stage(cfg, first_stage)
        res, f = int(cfg.data.resolution), int(first_stage.downsample_factor)
        if res % f:
            raise ConfigError(f"data.resolution={res} is not a multiple of the first stage's downsampling factor {f}")
        self.image_size, self.grid = (res, res), (res // f, res // f)
        num_classes = OmegaConf.select(cfg, "data.num_classes", default=None)
        self.cond: Conditioning = build_conditioning(cfg.conditioning, first_stage, res, num_classes, cond_stage)
        self.cond_len = self.cond.length(self.image_size)
        need = self.cond_len + self.grid[0] * self.grid[1] - 1
        if need > tr.block_size:
            raise ConfigError(f"transformer.block_size={tr.block_size} is too short: {self.cond_len} condition tokens "
                              f"+ {self.grid[0]}x{self.grid[1]} image codes - 1 = {need} positions; set "
                              f"transformer.block_size={need} or more")
        self.pkeep = float(cfg.stage.get("pkeep", 1.0))
        if not 0.0 < self.pkeep <= 1.0:
            raise ConfigError(f"stage.pkeep={self.pkeep} must be in (0, 1]")
        self.lr_factor = lr_schedule(tr.get("schedule", "cosine"), int(tr.get("warmup_steps", 0)),
                                     int(OmegaConf.select(cfg, "trainer.max_steps", default=1) or 1))
        text = None
        if self.cond.type == "text":  # its vocabulary: from the training captions, or a checkpoint's state
            if tr.get("pretrained") or tr.get("taming_config"):
                raise ConfigError("conditioning.type=text: taming-transformers has no text-conditional GPT to load "
                                  "(transformer.pretrained / taming_config); train one with stage=transformer")
            text = build_text_encoder(cfg, None if for_inference else training_captions(cfg))
        self.gpt = GPT.from_config(tr, V, self.cond.vocab_size, text_encoder=text)
        self.vocab_size = V
        self._caches: dict[str, CodeCache | None] = {}
        self._val_data = None
        if tr.get("pretrained") and not for_inference:
            self.load_pretrained()

    def load_pretrained(self) -> None:
        """``transformer.pretrained``: a Net2NetTransformer checkpoint of taming-transformers (Lightning ``.ckpt``)
        with its project YAML (``transformer.taming_config``: n_head, the start token and the condition are in no
        weight), its shared vocabulary split into image codes and condition tokens."""
        from vqtransformer.models import taming
        from vqtransformer.training.checkpoint import load, load_module_state

        tr = self.cfg.transformer
        if not tr.get("taming_config"):
            raise ConfigError(f"transformer.pretrained={tr.pretrained} needs its taming project YAML: set "
                              "transformer.taming_config=PATH/to/*-project.yaml (n_head, the start token and the "
                              "conditioning are in no weight)")
        state = taming.state_dict_of(load(tr.pretrained))
        kind = self.cond.type
        if kind == "text":
            raise ConfigError("conditioning.type=text: taming-transformers has no text-conditional GPT to convert")
        cond_vocab = self.cond.num_classes if kind == "class" else (None if kind == "none" else self.cond.vocab_size)
        converted = taming.convert_transformer(state, self.vocab_size, kind, cond_vocab, int(tr.get("sos_token", 0)))
        load_module_state(self.gpt, converted, what=f"transformer.pretrained={tr.pretrained}",
                          dropped={"transformer.blocks.*.attn.mask": taming.DROPPED["transformer.blocks.*.attn.mask"]})

    # -- helpers -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.first_stage.parameters()).device

    @property
    def gpt_module(self) -> GPT:
        return self.unwrap(self.gpt)

    @property
    def text_conditional(self) -> bool:
        return self.cond.type == "text"

    def caption_ids(self, batch: dict, drop: bool = False) -> torch.Tensor:
        """Caption ids [B, L] of the batch's captions (text models); ``drop``: each replaced by the null
        caption with probability ``conditioning.p_uncond`` (classifier-free guidance's training)."""
        gpt = self.gpt_module
        ids = gpt.text_encoder.tokenize(self.cond.captions(batch)).to(self.device)
        return self.cond.drop_captions(ids, gpt.null_text(ids.shape[0])) if drop else ids

    def meta(self) -> dict[str, Any]:
        return {"conditioning": self.cond.type, "vocab_size": self.vocab_size,
                "cond_vocab_size": self.cond.vocab_size, "grid": list(self.grid)}

    def _cache(self, split: str) -> CodeCache | None:
        root = self.cfg.stage.get("code_cache")
        if not root:
            return None
        if split not in self._caches:
            models = [self.first_stage] + [m for m in self.cond.children()]
            key = cache_key(models, self.cfg.data, self.cfg.conditioning, split)
            self._caches[split] = CodeCache(f"{root}/codes-{split}-{key}.pt", max(self.vocab_size, self.cond.vocab_size))
        return self._caches[split]

    @torch.no_grad()
    def tokens(self, batch: dict, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(image codes [B, h*w], condition ids [B, Lc]) of a batch, from the code cache when it has them."""
        image = batch.get(self.image_key)
        if image is None:
            raise ConditionError(f"batch has no '{self.image_key}'")
        size = tuple(image.shape[-2:])
        if size != self.image_size:
            raise ConditionError(f"images are {size} px but this model was built for data.resolution={self.image_size[0]}")
        cache, fp = self._cache(split), None
        if cache is not None and "index" in batch:
            fp = fingerprint(image)
            hit = cache.lookup(batch["index"], fp)
            if hit is not None:
                c = hit["c"] if "c" in hit else self.cond.encode(batch, size)
                return hit["z"].to(self.device), c.to(self.device).flatten(1)
        z = self.first_stage.encode_to_indices(self.first_stage_input(image)).flatten(1)
        c = self.cond.encode(batch, size).to(self.device).flatten(1)
        if fp is not None:
            cache.store(batch["index"], fp, z=z, **({"c": c} if self.cond.spatial else {}))
        return z, c

    def first_stage_input(self, x: torch.Tensor) -> torch.Tensor:
        """``batch[image_key]`` as the first stage takes it (label maps one-hot, as stage=vqgan trains them)."""
        x = x.to(self.device)
        if self.image_key == "segmentation":
            w = self.first_stage.encoder.conv_in.weight
            return one_hot_map(x, w.shape[1], self.first_stage.label_values).to(w.dtype)
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> RGB [B, 3, H, W] in [-1, 1] (label maps coloured, depth maps grey)."""
        return self.show(self.first_stage.decode_indices(z), decoded=True)

    def show(self, x: torch.Tensor, decoded: bool = False) -> torch.Tensor:
        if self.image_key == "segmentation":
            labels = x.argmax(1) if decoded else x
            return colorize(labels, self.first_stage.encoder.conv_in.in_channels).to(x.device)
        return (x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x).clamp(-1, 1)

    def logits(self, gpt: nn.Module, z: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Teacher-forced logits [B, h*w, V]: output Lc - 1 + i predicts s_i from (c, s_<i) (and, text
        models, the captions ``context``, ids [B, L], encoded inside the GPT's forward)."""
        x = self.gpt_module.sequence(c, z)
        kw = {} if context is None else {"context": context}
        return gpt(x[:, :-1], **kw)[:, c.shape[1] - 1:]

    def _text(self, batch: dict, drop: bool) -> dict:
        """``logits``' extra arguments: the caption ids of a text model, nothing otherwise."""
        return {"context": self.caption_ids(batch, drop)} if self.text_conditional else {}

    # -- training ------------------------------------------------------------------
    def setup(self, accelerator) -> list[OptimizerSpec]:
        self.accelerator = accelerator
        tr = self.cfg.transformer
        self.first_stage.to(accelerator.device)
        self.cond.to(accelerator.device)
        opt = torch.optim.AdamW(self.gpt.optimizer_groups(float(tr.get("weight_decay", 0.01))), lr=float(tr.lr),
                                betas=tuple(tr.get("betas", (0.9, 0.95))))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        self.gpt, opt = accelerator.prepare(self.gpt, opt)
        return [OptimizerSpec("transformer", opt, [self.gpt], sched, grad_clip=self.grad_clip())]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"transformer": self.gpt}

    def training_step(self, batch: dict, step: int, opt_idx: int) -> tuple[torch.Tensor, dict[str, float]]:
        z, c = self.tokens(batch, "train")
        c = self.cond.drop(c)  # label dropout (class conditioning) for classifier-free guidance
        text = self._text(batch, drop=True)  # text: the null caption with probability p_uncond
        x = z
        if self.pkeep < 1.0:
            keep = torch.rand(z.shape, device=z.device) < self.pkeep
            x = torch.where(keep, z, torch.randint_like(z, self.vocab_size))
        logits = self.logits(self.gpt, x, c, **text)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), z.reshape(-1))
        return loss, {"loss/train": loss.item()}

    # -- validation ------------------------------------------------------------------
    @torch.no_grad()
    def nll(self, batch: dict) -> torch.Tensor:
        """Per-token negative log-likelihood in nats, [B, h*w] (teacher-forced, no corruption)."""
        z, c = self.tokens(batch, "validation")
        logits = self.logits(self.gpt_module, z, c, **self._text(batch, drop=False))
        return F.cross_entropy(logits.transpose(1, 2).float(), z, reduction="none")

    def validate(self, batch: dict) -> dict[str, float]:
        nll = self.nll(batch).mean().item()
        return {"val/nll": nll, "val/bpd": nll / math.log(2), "val/loss": nll}

    def validation_end(self) -> dict[str, float]:
        for cache in self._caches.values():
            if cache is not None:
                cache.save()
        return {}

    @torch.no_grad()
    def validation_images(self, batch: dict) -> dict[str, torch.Tensor]:
        """Rows: condition (if any), input, reconstruction, half-image completion, sample (with the
        batch's conditions). Class models: a grid of one row per class; text models: of one row per
        validation caption (the first four of the batch), the caption under it."""
        n = min(int(self.cfg.stage.get("val_samples", 8)), batch[self.image_key].shape[0])
        b = {k: v[:n] if (torch.is_tensor(v) and v.dim() > 0) or isinstance(v, (list, tuple)) else v
             for k, v in batch.items()}  # (captions are a list)
        z, _ = self.tokens(b, "validation")
        z = z.view(n, *self.grid)
        seed = int(OmegaConf.select(self.cfg, "trainer.seed", default=0) or 0)
        cond = self.cond.from_batch(b)
        half = self.sample(n, cond, z=z, start=z[0].numel() // 2, seed=seed)
        samples = self.sample(n, cond, seed=seed + 1)
        rows = [self.show(b[self.image_key].to(self.device)), self.decode(z), half, samples]
        shown = self.cond.show(b, self.image_size) if self.cond.type != "none" else None
        grids = {"samples": image_grid(([shown] if shown is not None else []) + rows)}
        if self.cond.type == "class":  # one row per requested class
            k = int(self.cfg.stage.get("val_samples_per_class", 6))
            x = self.sample(k * self.num_classes, [c for c in range(self.num_classes) for _ in range(k)],
                            seed=seed + 2)
            grids["class_samples"] = image_grid(list(x.split(k)))
        if self.text_conditional:
            k = max(1, n // 2)
            prompts = self.cond.captions(batch)[:4]
            x = self.sample(k * len(prompts), [p for p in prompts for _ in range(k)], seed=seed + 2)
            grids["caption_samples"] = labelled_grid(list(x.split(k)), prompts)
        return grids

    # -- sampling ----------------------------------------------------------------
    @property
    def condition_needs_data(self) -> bool:
        """Maps and images, and captions (without prompts: those of the validation data)."""
        return self.cond.type in ("segmentation", "depth", "lowres", "text")

    def condition_from_batch(self, batch: dict) -> Any:
        return self.cond.from_batch(batch)

    def _condition(self, n: int, condition: Any, image_size: tuple[int, int]) -> dict:
        """A batch-like dict of conditions for n samples."""
        if self.text_conditional:
            return self._text_condition(n, condition)
        if isinstance(condition, str) or (isinstance(condition, (list, tuple)) and
                                          any(isinstance(x, str) for x in condition)):
            raise ConditionError(f"this model was trained with conditioning.type={self.cond.type}; prompts are for "
                                 "text-conditional models (conditioning.type=text)")
        if condition is None:
            if self.cond.type == "class":  # class-balanced
                return {"class_label": torch.arange(n) % self.cond.num_classes}
            if self.cond.type in ("none", "coord"):
                return {"batch_size": n}
            if image_size != self.image_size:
                raise ConditionError(f"conditioning.type={self.cond.type}: give {self.cond.key} maps of "
                                     f"{image_size} px to sample that size")
            return self._validation_conditions(n)
        if isinstance(condition, dict):
            self.cond.check_condition(condition)
            return dict(condition) if condition else {"batch_size": n}
        if self.cond.type != "class":
            raise ConditionError(f"this model was trained with conditioning.type={self.cond.type}; class labels "
                                 "are not accepted")
        y = torch.as_tensor(condition).long().reshape(-1)
        return {"class_label": y.expand(n) if y.numel() == 1 else y}

    def _text_condition(self, n: int, condition: Any) -> dict:
        """Captions for n samples: a prompt (str), 1 or n prompts, or ``{"caption": ...}``; None: the null caption."""
        if isinstance(condition, dict):
            self.cond.check_condition(condition)
            condition = condition.get("caption")
        if condition is None:
            return {"batch_size": n}  # the null caption (unconditional samples)
        prompts = [condition] if isinstance(condition, str) else condition
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ConditionError("this model is text-conditional (conditioning.type=text): give a prompt (str) or "
                                 f"{n} prompts, not {condition!r:.100} (class labels and maps are not accepted)")
        if len(prompts) not in (1, n):
            raise ConditionError(f"{len(prompts)} prompts for {n} samples: give 1 or {n}")
        return {"caption": list(prompts) * (n if len(prompts) == 1 else 1)}

    def _validation_conditions(self, n: int) -> dict:
        """Conditions (maps / images) of the next n validation items, for samples without given conditions."""
        from torch.utils.data import default_collate

        from vqtransformer.data import build_dataset

        if self._val_data is None:
            self._val_data, self._val_offset = build_dataset(self.cfg.data, False), 0
        items = [self._val_data[(self._val_offset + i) % len(self._val_data)] for i in range(n)]
        self._val_offset += n  # successive calls (evaluation batches) continue through the split
        batch = default_collate(items)
        key = "lowres" if self.cond.type == "lowres" else self.cond.key
        return {key: batch["image" if key == "lowres" else key]}

    def sampling_params(self, **overrides) -> SamplingParams:
        """``stage.sample.*`` with the non-None ``overrides``."""
        node = OmegaConf.select(self.cfg, "stage.sample", default=None)
        base = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**{k: base[k] for k in ("temperature", "top_k", "top_p", "cfg_scale") if k in base})

    @torch.no_grad()
    def sample_codes(self, n: int, condition: Any = None, grid: tuple[int, int] | None = None,
                     z: torch.Tensor | None = None, start: int = 0, seed: int = 0,
                     generator: torch.Generator | None = None, **params) -> torch.Tensor:
        """Code grids [n, H, W]. ``grid`` larger than the trained one: sliding-window sampling.
        ``z``/``start``: codes kept before raster position ``start`` (half-image completion)."""
        grid = tuple(grid or self.grid)
        f = self.image_size[0] // self.grid[0]
        image_size = (grid[0] * f, grid[1] * f)
        batch = self._condition(n, condition, image_size)
        c = self.cond.encode({k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()},
                             image_size).to(self.device)
        if c.shape[0] != n:
            raise ConditionError(f"{c.shape[0]} conditions for {n} samples")
        p = self.sampling_params(**params)
        uc = self.cond.uncond(c) if p.cfg_scale != 1.0 else None
        gpt = self.gpt_module
        text = {}
        if self.text_conditional:  # caption ids; the null caption for no caption and for guidance's uncond rows
            ids = gpt.text_encoder.tokenize(batch["caption"]).to(self.device) if "caption" in batch \
                else gpt.null_text(n)
            text = {"text": ids, "utext": gpt.null_text(n) if uc is not None else None}
        was_training = gpt.training
        gpt.eval()
        try:
            gen = generator or make_generator(seed, self.device)
            window = None if grid == self.grid else self.grid
            z = None if z is None else z.to(self.device).view(n, *grid)
            return sample(self._inference_gpt(gpt, n), c, grid, window, z, start, uc, p, gen, **text)
        finally:
            gpt.train(was_training)

    def _inference_gpt(self, gpt: GPT, batch: int) -> GPT:
        """The GPT to sample with: on the CPU a copy made by ``for_cpu_inference``, re-made when the weights change."""
        key = (id(gpt), batch, tuple(p._version for p in gpt.parameters()))
        if getattr(self, "_packed", (None,))[0] != key:
            self._packed = (key, for_cpu_inference(gpt, batch))
        return self._packed[1]

    @torch.no_grad()
    def sample(self, n: int, condition: Any = None, complete: dict | None = None, **kwargs) -> torch.Tensor:
        """n images [n, 3, H, W] in [-1, 1] (see :meth:`sample_codes`). ``condition``: None (start token;
        class-balanced labels; validation maps; the null caption), class labels (int, list, tensor), a dict of
        maps (``segmentation`` [n, H, W], ``depth`` [n, 1, H, W], ``coord``, ``lowres``) or, for a
        text-conditional model, a prompt (str) or n prompts (``sample.py prompt=``). ``complete``: a batch of
        n items whose images' first half of codes (raster order) is kept (half-image completion)."""
        if complete is not None:
            z, _ = self.tokens(complete, "validation")
            kwargs.update(z=z, start=z.shape[1] // 2)
        return self.decode(self.sample_codes(n, condition, **kwargs))

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "meta": self.meta()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = state.get("meta")
        if meta is not None and meta.get("conditioning") != self.cond.type:
            raise ConfigError(f"checkpoint was trained with conditioning.type={meta.get('conditioning')}, this config "
                              f"has conditioning.type={self.cond.type}")
        if meta is not None and int(meta.get("vocab_size", self.vocab_size)) != self.vocab_size:
            raise ConfigError(f"checkpoint's transformer predicts {meta['vocab_size']} codes but the first stage has "
                              f"{self.vocab_size} (quantize.n_embed)")
        super().load_state_dict({k: v for k, v in state.items() if k != "meta"})
