"""The stage interface: the one training loop drives every stage through these few methods.

A stage owns its models and optimizers. ``setup`` prepares them with the given
``accelerate.Accelerator`` and returns one :class:`OptimizerSpec` per optimizer;
the loop steps them in order on the same batch (generator first, then
discriminator for GAN stages). Everything else is plain tensors and dicts.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig


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


class Stage(abc.ABC):
    """Base class of ``vqgan``, ``transformer``, ``vqdiffusion`` and ``vitgan``.

    Subclasses build their models in ``__init__`` (from ``cfg``) on the CPU;
    ``setup`` moves and wraps them. ``accelerator`` is set by ``setup``.
    ``validate``, ``validation_images`` and ``sample`` run on rank 0 only: they must use
    unwrapped modules (``self.unwrap(m)``) and no collective operations.
    """

    name: str = "stage"
    #: which batch key holds the images the stage reconstructs or generates
    image_key: str = "image"

    def __init__(self, cfg: DictConfig, for_inference: bool = False):
        self.cfg = cfg
        self.for_inference = for_inference  # built by evaluate/sample: skip training-only pieces
        self.accelerator = None

    # -- training ---------------------------------------------------------
    @abc.abstractmethod
    def setup(self, accelerator) -> list[OptimizerSpec]:
        """Move models to the device, build optimizers, ``accelerator.prepare`` what trains."""

    @abc.abstractmethod
    def training_step(self, batch: dict, step: int, opt_idx: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss to backpropagate for optimizer ``opt_idx`` and scalar logs (already ``float``)."""

    def train(self, mode: bool = True) -> None:
        for m in self.trainable_modules().values():
            m.train(mode)

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

    def to(self, device) -> Stage:
        """Move every module of the stage (inference: evaluate.py, sample.py)."""
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.to(device)
        return self

    def sample(self, n: int, condition: Any = None, **kwargs) -> torch.Tensor:
        raise NotImplementedError(f"stage '{self.name}' is not a generator: it has no sample()")

    # -- checkpoints ------------------------------------------------------
    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module) if self.accelerator is not None else module

    def state_dict(self) -> dict[str, Any]:
        return {name: self.unwrap(m).state_dict() for name, m in self.trainable_modules().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from vqtransformer.training.checkpoint import load_module_state

        for name, m in self.trainable_modules().items():
            if name not in state:
                raise KeyError(f"checkpoint has no weights for '{name}' (it has: {sorted(state)})")
            load_module_state(self.unwrap(m), state[name], what=f"{self.name}.{name}")
