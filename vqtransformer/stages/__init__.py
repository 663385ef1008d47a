"""Stage registry: ``cfg.stage.name`` -> the Stage class that trains it. Building a stage (with the frozen
models it needs) is :func:`vqtransformer.loading.build_stage`'s job."""

from __future__ import annotations

import importlib

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


__all__ = ["Stage", "OptimizerSpec", "STAGES", "stage_class"]
