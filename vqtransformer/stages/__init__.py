"""Stage registry: ``cfg.stage.name`` -> the Stage class that trains it."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from vqtransformer.stages.base import OptimizerSpec, Stage

STAGES = {
    "vqgan": "vqtransformer.stages.vqgan:VQGANStage",
    "transformer": "vqtransformer.stages.transformer:TransformerStage",
    "vqdiffusion": "vqtransformer.stages.vqdiffusion:VQDiffusionStage",
    "vitgan": "vqtransformer.stages.vitgan:ViTGANStage",
}


def stage_class(name: str) -> type[Stage]:
    if name not in STAGES:
        raise ValueError(f"stage.name='{name}' is unknown; choose one of {sorted(STAGES)}")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_stage(cfg: DictConfig, for_inference: bool = False) -> Stage:
    """The stage of ``cfg.stage.name``, built on the CPU. ``for_inference`` skips what only training
    needs (e.g. pretrained perceptual-loss weights)."""
    return stage_class(cfg.stage.name)(cfg, for_inference=for_inference)


__all__ = ["Stage", "OptimizerSpec", "STAGES", "build_stage", "stage_class"]
