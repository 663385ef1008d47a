"""Condition encoders of the GPT prior ("Taming Transformers", sec. 3.2): a condition c becomes
a sequence of discrete tokens prepended to the image codes, p(s | c) = prod_i p(s_i | s_<i, c).

``conditioning.type``:

* ``none``: a single start-of-sequence token (unconditional model);
* ``class``: one class token; with ``conditioning.p_uncond`` > 0 labels are replaced by a
  null token during training, so classifier-free guidance can sample p(s) and p(s | y);
* ``segmentation`` / ``depth``: the map's code indices from its own VQ model, trained with
  ``stage=vqgan`` on the maps (``conditioning.ckpt``; label maps as one-hot input);
* ``coord``: the normalised raster position (y W + x) / (H W) of every pixel in the full image,
  area-downsampled to the code grid and quantised into ``conditioning.n_embed`` levels, so a
  model trained on crops knows where each crop lies and can be sampled larger (sliding window);
* ``lowres``: the image area-downsampled by ``conditioning.factor`` (or to ``conditioning.size``
  px) and encoded by the first stage (or by its own VQ model, ``conditioning.ckpt``);
* ``text``: the batch's ``caption``. Not prefix tokens: the prefix is one start token (as ``none``)
  and the GPT cross-attends to the caption's token embeddings from ``text_encoder`` (built by
  :func:`build_text_encoder`, shared with stage=vqdiffusion, and trained with the GPT); with
  ``conditioning.p_uncond`` > 0 captions are replaced by the null caption during training.

Encoders return *local* ids in ``[0, vocab_size)``: [B, L] or, for spatial maps, [B, h, w].
The GPT shifts them into its condition vocabulary range.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from vqtransformer.config import ConfigError
from vqtransformer.errors import UserError
from vqtransformer.modules.text import LearnedTextEncoder, WordTokenizer

CONDITIONING_TYPES = ("none", "class", "segmentation", "depth", "coord", "lowres", "text")
CONDITION_KEYS = ("class_label", "segmentation", "depth", "coord", "lowres", "caption")


class ConditionError(UserError, ValueError):
    """A condition that does not fit the model (wrong type, size, range); the message says what to fix.
    (Configuration mistakes raise :class:`~vqtransformer.config.ConfigError`.)"""


def _frozen(model: nn.Module) -> nn.Module:
    """Eval mode for good: ``train()`` no longer switches it (taming's ``disabled_train``)."""
    model.eval().requires_grad_(False)
    model.train = lambda mode=True: model  # type: ignore[method-assign]
    return model


def downsample_factor(vq: nn.Module) -> int:
    f = getattr(vq, "downsample_factor", None)
    if f is None:
        raise ConditionError(f"{type(vq).__name__} has no downsample_factor")
    return int(f)


def _device(batch: dict) -> torch.device:
    return next((v.device for v in batch.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))


def _in_channels(vq: nn.Module) -> int:
    dd = getattr(vq, "ddconfig", None)
    return int(dd["in_channels"]) if dd else int(vq.encoder.conv_in.in_channels)


class Conditioning(nn.Module):
    """Base class: ``encode(batch) -> ids``; a frozen module, never trained."""

    type: str = "none"
    key: str | None = None  # batch key it reads
    spatial: bool = False  # ids are a [B, h, w] grid
    vocab_size: int = 1

    @property
    def supports_uncond(self) -> bool:
        return False

    def batch_size(self, batch: dict) -> int:
        for k in ("image", "codes", "batch_size", *CONDITION_KEYS):
            if batch.get(k) is not None:
                v = batch[k]
                return int(v) if k == "batch_size" else v.shape[0] if torch.is_tensor(v) else len(v)
        raise ConditionError("cannot tell the batch size: the batch has no image, codes or condition")

    def check_condition(self, condition: dict) -> None:
        """Refuse user-given conditions of another type (e.g. a class label for a segmentation model)."""
        accepted = {"none": set(), "class": {"class_label"}, "segmentation": {"segmentation"}, "depth": {"depth"},
                    "coord": {"coord"}, "lowres": {"lowres", "image"}, "text": {"caption"}}[self.type]
        foreign = sorted(k for k in CONDITION_KEYS if condition.get(k) is not None and k not in accepted)
        if foreign:
            need = f"needs {sorted(accepted)}" if accepted else "takes no condition"
            raise ConditionError(f"this model was trained with conditioning.type={self.type} ({need}); "
                                 f"got {', '.join(foreign)}")

    def encode(self, batch: dict, image_size: tuple[int, int]) -> torch.Tensor:
        """Condition ids for the images of ``batch`` whose pixel size is ``image_size``."""
        raise NotImplementedError

    def length(self, image_size: tuple[int, int]) -> int:
        """Number of condition tokens for images of ``image_size`` pixels."""
        return 1

    def drop(self, c: torch.Tensor, p: float | None = None) -> torch.Tensor:
        """Label dropout for classifier-free guidance (identity for types without a null token)."""
        return c

    def uncond(self, c: torch.Tensor) -> torch.Tensor:
        raise ConditionError(f"conditioning.type={self.type} has no unconditional token; classifier-free "
                             "guidance (sample.cfg_scale != 1) needs conditioning.type=class with p_uncond > 0")

    def show(self, batch: dict, image_size: tuple[int, int]) -> torch.Tensor | None:
        """The condition as images [B, 3, H, W] in [-1, 1] (for validation grids), or None."""
        return None

    def from_batch(self, batch: dict) -> dict | None:
        """This model's condition taken from a dataset batch (for sampling with the batch's conditions)."""
        if self.type == "none":
            return None
        if self.type == "lowres":
            return {"lowres": batch["image"]}
        if self.type == "coord" and batch.get("coord") is None:
            return {"batch_size": self.batch_size(batch)}
        return {self.key: batch[self.key]}


class StartToken(Conditioning):
    """``none``: taming's SOSProvider, one start token."""

    type = "none"

    def encode(self, batch: dict, image_size: tuple[int, int]) -> torch.Tensor:
        return torch.zeros(self.batch_size(batch), 1, dtype=torch.long, device=_device(batch))


class ClassTokens(Conditioning):
    """``class``: token y in [0, num_classes); token ``num_classes`` is the null (unconditional) token."""

    type, key = "class", "class_label"

    def __init__(self, num_classes: int, p_uncond: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise ConfigError("conditioning.num_classes (or data.num_classes) must be >= 1 for conditioning.type=class")
        if not 0.0 <= p_uncond < 1.0:
            raise ConfigError(f"conditioning.p_uncond={p_uncond} must be in [0, 1)")
        self.num_classes, self.p_uncond = num_classes, p_uncond
        self.vocab_size = num_classes + 1

    @property
    def supports_uncond(self) -> bool:
        return self.p_uncond > 0

    def encode(self, batch: dict, image_size: tuple[int, int]) -> torch.Tensor:
        y = batch.get("class_label")
        if y is None:
            raise ConditionError("conditioning.type=class needs 'class_label' in the batch (data without labels?)")
        y = torch.as_tensor(y).long().view(-1)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ConditionError(f"class label {int(y.max()) if int(y.max()) >= self.num_classes else int(y.min())} "
                                 f"is out of range [0, {self.num_classes}) (conditioning.num_classes)")
        return y[:, None]

    def drop(self, c: torch.Tensor, p: float | None = None) -> torch.Tensor:
        p = self.p_uncond if p is None else p
        if p <= 0:
            return c
        return c.masked_fill(torch.rand(c.shape, device=c.device) < p, self.num_classes)

    def uncond(self, c: torch.Tensor) -> torch.Tensor:
        if not self.supports_uncond:
            raise ConditionError("classifier-free guidance needs a model trained with conditioning.p_uncond > 0")
        return torch.full_like(c, self.num_classes)


class TextCaptions(Conditioning):
    """``text``: captions (the batch's ``caption``, a list of strings). The GPT takes them through
    cross-attention to the text encoder's tokens (:mod:`vqtransformer.models.gpt`), so the prefix
    is one start token, as ``none``; this module reads the captions and drops them to the null
    caption with probability ``p_uncond`` (classifier-free guidance). The text encoder, trained
    with the model, lives in the GPT (a Conditioning is frozen)."""

    type, key = "text", "caption"

    def __init__(self, p_uncond: float = 0.1):
        super().__init__()
        if not 0.0 <= p_uncond < 1.0:
            raise ConfigError(f"conditioning.p_uncond={p_uncond} must be in [0, 1)")
        self.p_uncond = p_uncond

    @property
    def supports_uncond(self) -> bool:
        return self.p_uncond > 0

    def captions(self, batch: dict) -> list[str]:
        caps = batch.get("caption")
        if caps is None:
            raise ConditionError("conditioning.type=text needs captions: the batches of this data have no "
                                 "'caption' (data=shapes has them)")
        caps = [caps] if isinstance(caps, str) else list(caps)
        if not all(isinstance(t, str) for t in caps):
            raise ConditionError(f"captions must be strings, got {caps!r:.100}")
        return caps

    def encode(self, batch: dict, image_size: tuple[int, int]) -> torch.Tensor:
        """The start token (captions enter through cross-attention, not the prefix)."""
        return torch.zeros(self.batch_size(batch), 1, dtype=torch.long, device=_device(batch))

    def drop_captions(self, ids: torch.Tensor, null: torch.Tensor, p: float | None = None) -> torch.Tensor:
        """Caption ids [B, L] with each row replaced by the null caption ``null`` [B, L] with probability p
        (default ``p_uncond``)."""
        p = self.p_uncond if p is None else p
        if p <= 0:
            return ids
        drop = torch.rand(ids.shape[0], device=ids.device) < p
        return torch.where(drop[:, None], null.to(ids.device), ids)

    def uncond(self, c: torch.Tensor) -> torch.Tensor:
        """The prefix of the unconditional rows: the same start token (the null caption is their context)."""
        if not self.supports_uncond:
            raise ConditionError("classifier-free guidance needs a model trained with conditioning.p_uncond > 0")
        return c

    def from_batch(self, batch: dict) -> dict | None:
        return {"caption": self.captions(batch)}


def one_hot_map(seg: torch.Tensor, num_classes: int, values: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Class ids [B, H, W] -> one-hot [B, K, H, W] with ``values`` (off, on): {-1, 1} is the input of a
    ``stage=vqgan data.target=segmentation`` model (K = data.num_classes + 1, id 0 = background), {0, 1} that
    of taming's segmentation VQ models (``VQModel.label_values``)."""
    off, on = values
    return F.one_hot(seg.long(), num_classes).permute(0, 3, 1, 2).float() * (on - off) + off


def _palette(num_classes: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)  # the vqgan stage's colours: background black
    palette = torch.rand(num_classes, 3, generator=g) * 2 - 1
    palette[0] = -1
    return palette


class MapTokens(Conditioning):
    """``segmentation`` / ``depth``: code indices of the map under its own frozen VQ model."""

    spatial = True

    def __init__(self, type: str, vq: nn.Module):
        super().__init__()
        self.type = self.key = type
        self.vq = _frozen(vq)
        self.vocab_size = int(vq.quantize.n_embed)
        self.f = downsample_factor(vq)
        self.in_channels = _in_channels(vq)
        self.label_values = tuple(getattr(vq, "label_values", (-1.0, 1.0)))
        if type == "depth" and self.in_channels != 1:
            raise ConfigError(f"the depth VQ model (conditioning.ckpt) takes {self.in_channels} input channels, "
                                 "expected 1: train it with stage=vqgan data.target=depth")

    def length(self, image_size: tuple[int, int]) -> int:
        return (image_size[0] // self.f) * (image_size[1] // self.f)

    def _map(self, batch: dict, image_size: tuple[int, int]) -> torch.Tensor:
        m = batch.get(self.key)
        if m is None:
            raise ConditionError(f"conditioning.type={self.type} needs '{self.key}' maps in the batch")
        if self.type == "segmentation":
            if m.dim() == 4 and m.shape[1] == 1:
                m = m[:, 0]
            if m.dim() != 3 or m.is_floating_point():
                raise ConditionError(f"segmentation maps must be class ids [B, H, W] (long), got {tuple(m.shape)} "
                                     f"{m.dtype}")
        elif m.dim() != 4 or m.shape[1] != 1:
            raise ConditionError(f"depth maps must be [B, 1, H, W], got {tuple(m.shape)}")
        if tuple(m.shape[-2:]) != tuple(image_size):
            raise ConditionError(f"{self.type} map is {tuple(m.shape[-2:])} px but the images are {tuple(image_size)} px")
        if self.type == "segmentation" and m.numel():
            lo, hi = int(m.min()), int(m.max())
            if lo < 0 or hi >= self.in_channels:
                raise ConditionError(f"segmentation map has class id {hi if hi >= self.in_channels else lo} but its "
                                     f"VQ model (conditioning.ckpt) takes ids 0..{self.in_channels - 1} "
                                     f"(data.num_classes={self.in_channels - 1})")
        return m

    def encode(self, batch: dict, image_size: tuple[int, int]) -> torch.Tensor:
        m = self._map(batch, image_size)
        x = one_hot_map(m, self.in_channels, self.label_values) if self.type == "segmentation" else m
        w = next(self.vq.parameters())
        return self.vq.encode_to_indices(x.to(device=w.device, dtype=w.dtype))

    def show(self, batch: dict, image_size: tuple[int, int]) -> torch.Tensor | None:
        m = self._map(batch, image_size)
        if self.type == "depth":
            return m.float().repeat(1, 3, 1, 1)
        return _palette(self.in_channels).to(m.device)[m].permute(0, 3, 1, 2)


def coord_map(batch: int, size: tuple[int, int], device=None) -> torch.Tensor:
    """Normalised raster position (y W + x) / (H W) of every pixel, [B, 1, H, W] in [0, 1)."""
    H, W = size
    pos = torch.arange(H * W, dtype=torch.float32, device=device).view(1, 1, H, W) / (H * W)
    return pos.expand(batch, 1, H, W)


class CoordTokens(Conditioning):
    """``coord``: quantised positions on the image-code grid (taming's CoordStage)."""

    type, key, spatial = "coord", "coord", True

    def __init__(self, n_embed: int, down_factor: int):
        super().__init__()
        if n_embed < 2:
            raise ConfigError(f"conditioning.n_embed={n_embed} must be >= 2")
        self.vocab_size, self.f = n_embed, down_factor

    def length(self, image_size: tuple[int, int]) -> int:
        return (image_size[0] // self.f) * (image_size[1] // self.f)

    def _map(self, batch: dict, image_size: tuple[int, int]) -> torch.Tensor:
        c = batch.get("coord")
        if c is None:  # no crop information: the image is the whole frame
            return coord_map(self.batch_size(batch), image_size, _device(batch))
        if c.dim() != 4 or c.shape[1] != 1 or tuple(c.shape[-2:]) != tuple(image_size):
            raise ConditionError(f"coord maps must be [B, 1, {image_size[0]}, {image_size[1]}], got {tuple(c.shape)}")
        return c

    def encode(self, batch: dict, image_size: tuple[int, int]) -> torch.Tensor:
        c = F.avg_pool2d(self._map(batch, image_size).float(), self.f).clamp(0.0, 1.0)
        return (c * self.vocab_size).long().clamp_max(self.vocab_size - 1)[:, 0]

    def show(self, batch: dict, image_size: tuple[int, int]) -> torch.Tensor | None:
        return (self._map(batch, image_size).float() * 2 - 1).repeat(1, 3, 1, 1)


class LowResTokens(Conditioning):
    """``lowres``: the image area-downsampled to ``size`` px, encoded by a frozen VQ model."""

    type, key, spatial = "lowres", "image", True

    def __init__(self, vq: nn.Module, size: int):
        super().__init__()
        self.vq = _frozen(vq)
        self.size, self.vocab_size, self.f = size, int(vq.quantize.n_embed), downsample_factor(vq)
        if size % self.f:
            raise ConfigError(f"conditioning.size={size} must be a multiple of the VQ model's downsampling "
                                 f"factor {self.f}")

    def length(self, image_size: tuple[int, int]) -> int:
        return (self.size // self.f) ** 2

    def lowres(self, batch: dict, image_size: tuple[int, int]) -> torch.Tensor:
        x = batch.get("lowres", batch.get("image"))
        if x is None:
            raise ConditionError("conditioning.type=lowres needs 'image' (or a 'lowres' image) in the batch")
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="area")
        return x

    def encode(self, batch: dict, image_size: tuple[int, int]) -> torch.Tensor:
        return self.vq.encode_to_indices(self.lowres(batch, image_size))

    def show(self, batch: dict, image_size: tuple[int, int]) -> torch.Tensor | None:
        return F.interpolate(self.lowres(batch, image_size), size=tuple(image_size), mode="nearest")


def needs_vq(cfg: DictConfig) -> bool:
    """Whether ``conditioning`` (the config group) encodes its condition with a VQ model of its own
    (``conditioning.ckpt`` / ``run_id`` / ``taming_config``), which the caller loads and passes in."""
    kind = cfg.get("type", "none")
    return kind in ("segmentation", "depth") or (kind == "lowres" and bool(cfg.get("ckpt") or cfg.get("run_id")))


def build_conditioning(cfg: DictConfig, first_stage: nn.Module, resolution: int, num_classes: int | None = None,
                       cond_vq: nn.Module | None = None) -> Conditioning:
    """The encoder for ``cfg`` (the ``conditioning`` group) and images of ``resolution`` px. ``cond_vq``: the
    frozen VQ model of the condition when :func:`needs_vq` (loaded by :mod:`vqtransformer.loading`)."""
    kind = cfg.get("type", "none")
    if kind not in CONDITIONING_TYPES:
        raise ConfigError(f"conditioning.type='{kind}' is unknown; choose one of {', '.join(CONDITIONING_TYPES)}")

    def vq_from_cfg() -> nn.Module:
        if cond_vq is None:
            raise ConfigError(f"conditioning.type={kind} needs its VQ model: set conditioning.ckpt=PATH (or "
                              f"conditioning.run_id=ID) of a stage=vqgan run trained on the {kind} maps")
        return cond_vq

    if kind == "none":
        return StartToken()
    if kind == "text":  # the text encoder itself: build_text_encoder (a trained part of the model)
        return TextCaptions(float(cfg.get("p_uncond", 0.1)))
    if kind == "class":
        n = cfg.get("num_classes") or num_classes
        if not n:
            raise ConfigError("conditioning.type=class needs the number of classes: set conditioning.num_classes "
                                 "(or data.num_classes)")
        return ClassTokens(int(n), float(cfg.get("p_uncond", 0.0)))
    if kind in ("segmentation", "depth"):
        vq = vq_from_cfg()
        enc = MapTokens(kind, vq)
        if kind == "segmentation" and num_classes and int(num_classes) + 1 != enc.in_channels:
            raise ConfigError(f"data.num_classes={num_classes} (label ids 0..{num_classes}) but the segmentation VQ "
                              f"model (conditioning.ckpt) takes {enc.in_channels} label ids")
        return enc
    if kind == "coord":
        return CoordTokens(int(cfg.get("n_embed", 1024)), downsample_factor(first_stage))
    vq = vq_from_cfg() if needs_vq(cfg) else first_stage
    return LowResTokens(vq, int(cfg.get("size") or resolution // int(cfg.get("factor", 4))))


# -- text (conditioning.type=text): one text encoder for both second stages --------------------------
def build_text_encoder(cfg: DictConfig, captions=None) -> nn.Module:
    """The ``cfg.text_encoder`` of a text-conditional model. ``learned``: its vocabulary from ``captions``
    (an iterable of the training captions) or, when None, left empty for a checkpoint's state to fill;
    ``clip``: a frozen CLIP text model from ``text_encoder.path`` / ``text_encoder.model_id`` (captions
    unused; raises WeightsUnavailableError, before any training, when the model cannot be had)."""
    te = OmegaConf.select(cfg, "text_encoder", default=None)
    if te is None:
        raise ConfigError("conditioning.type=text needs a text encoder: add text_encoder=learned (or clip)")
    kind = te.get("kind", "learned")
    if kind == "clip":
        from vqtransformer.modules.clip_text import CLIPTextEncoder

        return CLIPTextEncoder.from_config(te)
    if kind != "learned":
        raise ConfigError(f"text_encoder.kind={kind!r}: choose text_encoder=learned or text_encoder=clip")
    n_embd = int(te.get("n_embd") or cfg.transformer.n_embd)
    tok = (WordTokenizer.from_captions(captions, te.context_length, te.max_words) if captions is not None
           else WordTokenizer([], te.context_length))
    return LearnedTextEncoder(tok, te.max_words, te.n_layer, te.n_head, n_embd)


def training_captions(cfg: DictConfig) -> list[str]:
    """The captions of the first ``text_encoder.vocab_captions`` training images (the learned
    tokenizer's vocabulary is built from them; a CLIP encoder ignores them, it brings its own)."""
    from vqtransformer.data import build_dataset

    ds = build_dataset(cfg.data, True)
    n = min(len(ds), int(OmegaConf.select(cfg, "text_encoder.vocab_captions", default=2000)))
    if hasattr(ds, "all_captions"):  # several captions an image (data=captions): every one of them
        return [c for i in range(n) for c in ds.all_captions(i)]
    if hasattr(ds, "caption"):
        return [ds.caption(i) for i in range(n)]
    items = [ds[i] for i in range(n)]
    if not items or "caption" not in items[0]:
        raise ConfigError(f"conditioning.type=text needs captions, but data={cfg.data.get('name')} has none")
    return [it["caption"] for it in items]
