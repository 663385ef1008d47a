"""The house: checkpoint I/O on the ground floor, vqtransformer.loading on the top floor, entry points that reach
stages only through the Stage interface; one home for gradient clipping; hyperparameters no weight shows are
recorded in our checkpoints and checked; accelerator.accumulate does the loop's gradient accumulation."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tests.conftest import ROOT, compose
from tests.stages.test_transformer_stage import FakeAccelerator
from vqtransformer.config import ConfigError
from vqtransformer.stages import STAGES, OptimizerSpec, Stage

PKG = ROOT / "vqtransformer"


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def offending(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imports_of(path) if m.startswith(forbidden))


def test_the_import_layers_hold():
    ground = PKG / "training" / "checkpoint.py"
    own = sorted(m for m in imports_of(ground) if m.startswith("vqtransformer"))
    assert own == ["vqtransformer.errors", "vqtransformer.errors.UserError"], own  # imports nothing above it
    upper = ("vqtransformer.loading", "vqtransformer.tracking", "mlflow", "vqtransformer.training.loop")
    for folder in ("stages", "models", "modules", "sampling"):
        for f in sorted((PKG / folder).glob("*.py")):
            assert not offending(f, upper), (f.name, offending(f, upper))
    cond = PKG / "models" / "conditioning.py"
    assert not offending(cond, ("mlflow", "vqtransformer.training", "vqtransformer.tracking", "vqtransformer.loading"))
    code = ("import sys, vqtransformer.models.conditioning, vqtransformer.stages.transformer, "
            "vqtransformer.stages.vqdiffusion; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow' "
            "or m in ('vqtransformer.loading', 'vqtransformer.tracking')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]


def test_entry_points_do_not_name_stages_or_probe_them():
    for script in ("train.py", "evaluate.py", "sample.py"):
        tree = ast.parse((ROOT / script).read_text())
        names = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in STAGES]
        assert not names, (script, names)
        probes = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                  and n.func.id in ("hasattr", "build_stage")]
        assert not probes, (script, probes)
        internals = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                     and n.attr in ("cond", "tokens", "gpt", "first_stage", "vqgan", "denoiser")]
        assert not internals, (script, internals)


def test_capabilities_and_sampling_options_are_declared():
    from vqtransformer.stages import stage_class

    caps = {name: stage_class(name).capabilities for name in STAGES}
    assert caps == {"vqgan": {"reconstruct"}, "transformer": {"sample", "nll", "complete", "larger_grid"},
                    "vqdiffusion": {"sample", "inpaint"}, "vitgan": {"sample"}}
    assert "steps" in stage_class("vqdiffusion").sampling_options and "grid" in stage_class("transformer").sampling_options


def test_every_stage_honours_trainer_grad_clip():
    from tests.models.test_vqdiffusion import tiny_vqgan
    from vqtransformer.stages.vqdiffusion import VQDiffusionStage

    common = ["stage=vqdiffusion", "first_stage.ckpt=unused", "data.resolution=16", "transformer.n_layer=1",
              "transformer.n_head=2", "transformer.n_embd=32", "diffusion.num_timesteps=10"]
    default = VQDiffusionStage(compose(common), first_stage=tiny_vqgan()).setup(FakeAccelerator())
    assert default[0].grad_clip == 1.0  # stage.grad_clip: the stage's own default
    clipped = VQDiffusionStage(compose(common + ["trainer.grad_clip=0.25"]), first_stage=tiny_vqgan())
    assert clipped.setup(FakeAccelerator())[0].grad_clip == 0.25  # trainer.grad_clip, as the divergence message says
    from tests.stages.test_transformer_stage import make_stage

    assert make_stage("trainer.grad_clip=0.5").grad_clip() == 0.5 and make_stage().grad_clip() == 1.0


def test_hyperparameters_no_weight_shows_are_recorded_and_checked():
    from tests.stages.test_transformer_stage import make_stage

    two = make_stage()  # n_head=2 (n_embd 32): the same tensor shapes as n_head=4
    state = two.state_dict()
    assert state["arch"]["transformer.n_head"] == 2
    four = make_stage("transformer.n_head=4")
    with pytest.raises(ConfigError, match="transformer.n_head=4 but the checkpoint's weights were trained with "
                                          "transformer.n_head=2"):
        four.load_state_dict(state)
    make_stage().load_state_dict(state)


class Linear2(Stage):
    """Two optimizers on one batch (as the GAN stages), the second from step 1."""

    name = "linear2"

    def __init__(self):
        super().__init__(compose([]))
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)

    def setup(self, accelerator):
        self.accelerator = accelerator
        opt_a, opt_b = torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)
        self.a, self.b, opt_a, opt_b = accelerator.prepare(self.a, self.b, opt_a, opt_b)
        return [OptimizerSpec("a", opt_a, [self.a]), OptimizerSpec("b", opt_b, [self.b], start_step=1)]

    def training_step(self, batch, step, opt_idx):
        m = self.a if opt_idx == 0 else self.b
        loss = (m(batch["x"]) ** 2).mean()
        return loss, {"loss": loss.item()}

    def trainable_modules(self):
        return {"a": self.a, "b": self.b}

    def validate(self, batch):
        return {}


def test_gradient_accumulation_through_accelerator_accumulate():
    from accelerate import Accelerator

    from vqtransformer.training.loop import train_step

    stage = Linear2()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    specs = stage.setup(acc)
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(4, 3, generator=g)} for _ in range(2)]

    def expected(m):
        ref = nn.Linear(3, 1)
        ref.load_state_dict(m.state_dict())
        loss = sum((ref(b["x"]) ** 2).mean() for b in batches) / 2  # the mean over the micro-batches
        loss.backward()
        return {k: v - 0.1 * dict(ref.named_parameters())[k].grad for k, v in ref.state_dict().items()}

    for step in range(2):
        want_a, want_b = expected(stage.a), expected(stage.b)
        before_b = {k: v.clone() for k, v in stage.b.state_dict().items()}
        train_step(stage, specs, batches, step, acc)
        for k, v in stage.a.state_dict().items():
            torch.testing.assert_close(v, want_a[k])
        for k, v in stage.b.state_dict().items():  # inactive at step 0, stepped at step 1
            torch.testing.assert_close(v, before_b[k] if step == 0 else want_b[k])
    with pytest.raises(ConfigError, match="trainer.grad_accum"):
        train_step(stage, specs, batches[:1], 2, acc)
