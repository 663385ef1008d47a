"""The stage interface: the one training loop drives every stage through these few methods.

A stage owns its models and optimizers. ``setup`` prepares them with the given
``accelerate.Accelerator`` and returns one :class:`OptimizerSpec` per optimizer;
the loop steps them in order on the same batch (generator first, then
discriminator for GAN stages). Everything else is plain tensors and dicts.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from vqtransformer.training.checkpoint import CheckpointError, load_module_state


def lr_schedule(schedule: str, warmup_steps: int, max_steps: int, min_ratio: float = 0.0,
                key: str = "transformer.schedule"):
    """Learning-rate factor of step: linear warmup over ``warmup_steps``, then ``constant`` or a ``cosine``
    decay to ``min_ratio`` at ``max_steps`` (taming: constant, no warmup). ``key`` names the config key."""
    if schedule not in ("cosine", "constant"):
        from vqtransformer.config import ConfigError

        raise ConfigError(f"{key}='{schedule}' must be cosine or constant")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class OptimizerSpec:
    """One optimizer and the (prepared) modules it updates."""

    name: str
    optimizer: torch.optim.Optimizer
    modules: list[nn.Module]
    scheduler: Any = None
    start_step: int = 0  # inactive before this global step (e.g. the discriminator before disc_start)
    grad_clip: float | None = None
    params: list[nn.Parameter] = field(default_factory=list)  # for clipping; defaults to modules' params

    def parameters(self) -> list[nn.Parameter]:
        if self.params:
            return self.params
        return [p for m in self.modules for p in m.parameters() if p.requires_grad]


#: capabilities a stage may declare (``Stage.capabilities``); entry points ask these, never a stage's name
CAPABILITIES = {
    "reconstruct": "a first stage: reconstruction_model() encodes and decodes (evaluate.py: rFID, PSNR, ...)",
    "sample": "a generator: sample(n, condition, **sampling_options) -> images (sample.py, FID/IS/KID)",
    "nll": "nll(batch) -> per-token negative log-likelihood (evaluate.py: nll, bpd)",
    "complete": "sample(..., complete=batch) keeps the first half of the batch's codes (sample.py half=true)",
    "larger_grid": "sample(..., grid=[h, w]) larger than the trained grid (sliding window; sample.py grid=)",
    "inpaint": "sample(..., inpaint=(image, mask)) regenerates the code tokens whose cells the mask touches and "
               "keeps the others at the image's codes; inpaint_region(mask) says which (sample.py init_image= mask=)",
}


class Stage(abc.ABC):
    """Base class of ``vqgan``, ``transformer``, ``vqdiffusion`` and ``vitgan``.

    Subclasses build their models in ``__init__`` (from ``cfg``) on the CPU; frozen models they need
    (a first stage, a condition's VQ model) are given to ``__init__`` by :mod:`vqtransformer.loading`,
    as :meth:`frozen_models` declares. ``setup`` moves and wraps them; ``accelerator`` is set by ``setup``.
    ``validate``, ``validation_images`` and ``sample`` run on rank 0 only: they must use unwrapped modules
    (``self.unwrap(m)``) and no collective operations.
    """

    name: str = "stage"
    #: which batch key holds the images the stage reconstructs or generates
    image_key: str = "image"
    #: what the entry points may ask of this stage (keys of ``CAPABILITIES``)
    capabilities: frozenset[str] = frozenset()
    #: keyword options of ``sample()`` that sample.py passes through when given (null: the run's defaults)
    sampling_options: tuple[str, ...] = ()
    #: config keys of hyperparameters that no tensor shape shows (e.g. ``transformer.n_head``), or that a shape
    #: shows only as an unexplained mismatch: stored in checkpoints (``model.arch``) and compared on loading
    architecture_keys: tuple[str, ...] = ()
    #: the config node holding this stage's optimiser settings (learning rate, betas, ...; docs/architecture.md)
    optimizer_key: str = "stage"
    #: this stage's own gradient-clipping key (its default); ``trainer.grad_clip``, when set, overrides it
    grad_clip_key: str | None = None

    def __init__(self, cfg: DictConfig, for_inference: bool = False):
        self.cfg = cfg
        self.for_inference = for_inference  # built by evaluate/sample: skip training-only pieces
        self.accelerator = None

    @classmethod
    def frozen_models(cls, cfg: DictConfig) -> dict[str, tuple[str, DictConfig]]:
        """Frozen models this stage needs, ``{__init__ keyword: (config key, node)}``; the node says where the
        model is (``ckpt``, ``run_id``, ``taming_config``). :func:`vqtransformer.loading.build_stage` loads them."""
        return {}

    def load_pretrained(self) -> None:
        """Initial weights named by the config (e.g. ``first_stage.pretrained``); ``__init__`` calls it when
        training, :mod:`vqtransformer.loading` for inference from a foreign file. Default: none."""
        return None

    # -- training ---------------------------------------------------------
    @abc.abstractmethod
    def setup(self, accelerator) -> list[OptimizerSpec]:
        """Move models to the device, build optimizers, ``accelerator.prepare`` what trains."""

    @abc.abstractmethod
    def training_step(self, batch: dict, step: int, opt_idx: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss to backpropagate for optimizer ``opt_idx`` and scalar logs (already ``float``)."""

    def after_step(self, step: int) -> None:
        """Called by the loop after every optimizer of a step has stepped. Default: nothing."""
        return None

    def grad_clip(self) -> float | None:
        """Max gradient norm: ``trainer.grad_clip`` when set, else this stage's own default (``grad_clip_key``)."""
        clip = OmegaConf.select(self.cfg, "trainer.grad_clip", default=None)
        if clip is None and self.grad_clip_key:
            clip = OmegaConf.select(self.cfg, self.grad_clip_key, default=None)
        return float(clip) if clip else None

    def train(self, mode: bool = True) -> None:
        for m in self.trainable_modules().values():
            m.train(mode)

    def eval(self) -> Stage:
        """Every module of the stage in eval mode (inference)."""
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.eval()
        self.train(False)
        return self

    @abc.abstractmethod
    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules whose parameters are trained and checkpointed (unwrapped or wrapped)."""

    # -- validation / sampling ---------------------------------------------
    @abc.abstractmethod
    def validate(self, batch: dict) -> dict[str, float]:
        """Per-batch validation metrics; the loop averages them over the validation batches."""

    def validation_end(self) -> dict[str, float]:
        """Metrics that need the whole validation pass (e.g. codebook usage)."""
        return {}

    def validation_images(self, batch: dict) -> dict[str, torch.Tensor]:
        """Image grids in [0, 1], ``[3, H, W]``, logged as artifacts at each validation."""
        return {}

    @property
    def condition_type(self) -> str:
        """``none``, ``class`` or a spatial type (``segmentation``, ``depth``, ``coord``, ``lowres``)."""
        return "none"

    @property
    def num_classes(self) -> int:
        return 0

    @property
    def condition_needs_data(self) -> bool:
        """Whether conditions are maps or images taken from data (``condition_from_batch``), not labels."""
        return False

    def condition_from_batch(self, batch: dict) -> Any:
        """This model's condition for ``sample()``, taken from a dataset batch (None: unconditional)."""
        return None

    def to(self, device) -> Stage:
        """Move every module of the stage (inference: evaluate.py, sample.py)."""
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.to(device)
        return self

    def sample(self, n: int, condition: Any = None, **kwargs) -> torch.Tensor:
        raise NotImplementedError(f"stage '{self.name}' is not a generator: it has no sample()")

    def inpaint_region(self, mask: torch.Tensor) -> torch.Tensor:
        """The code tokens [h, w] (bool) that ``sample(..., inpaint=(image, mask))`` regenerates for a pixel mask
        [H, W] (True = regenerate) of an image at the model's resolution (capability ``inpaint``)."""
        raise NotImplementedError(f"stage '{self.name}' cannot inpaint (capability 'inpaint')")

    def nll(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError(f"stage '{self.name}' has no likelihood (capability 'nll')")

    def reconstruction_model(self) -> nn.Module:
        """The (unwrapped) model with ``encode_to_indices`` / ``decode_indices`` (capability ``reconstruct``)."""
        raise NotImplementedError(f"stage '{self.name}' is not a first stage (capability 'reconstruct')")

    # -- checkpoints ------------------------------------------------------
    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module) if self.accelerator is not None else module

    def architecture(self) -> dict[str, Any]:
        """``{key: value}`` of :attr:`architecture_keys` in this stage's config."""
        out = {}
        for key in self.architecture_keys:
            v = OmegaConf.select(self.cfg, key, default=None)
            out[key] = OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        return out

    def check_architecture(self, saved: dict[str, Any] | None) -> None:
        """Refuse weights trained with other hyperparameters than this stage's config (``ConfigError`` naming
        the key and both values). Checkpoints without a record (older ones) are not checked."""
        from vqtransformer.config import ConfigError

        mine = self.architecture()
        for key, value in (saved or {}).items():
            if key in mine and mine[key] != value:
                raise ConfigError(f"{key}={mine[key]} but the checkpoint's weights were trained with {key}={value} "
                                  f"(a setting the weights alone do not show); set {key}={value} or drop the override")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: self.unwrap(m).state_dict() for name, m in self.trainable_modules().items()}
        if self.architecture_keys:
            state["arch"] = self.architecture()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Weights of every trainable module (errors name the shapes that differ), then the architecture
        record: a setting that no shape shows (``transformer.n_head``) is an error too."""
        for name, m in self.trainable_modules().items():
            if name not in state:
                raise CheckpointError(f"checkpoint has no weights for '{name}' (it has: {sorted(state)})")
            load_module_state(self.unwrap(m), state[name], what=f"{self.name}.{name}")
        self.check_architecture(state.get("arch"))
