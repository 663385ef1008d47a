"""ViTGAN generator, discriminator, EMA and the vitgan stage (incl. a short training run)."""

import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from vqtransformer.models.vitgan import EMA, Discriminator, Generator
from vqtransformer.modules.vit import SLN, L2SelfAttention

# small enough for one CPU core: 16 px, patch 4 (a 4x4 token grid, like the tiny preset at 32 px)
SMALL = ["data.resolution=16", "vitgan.generator.patch_size=4", "vitgan.discriminator.patch_size=4"]


pytestmark = pytest.mark.usefixtures("one_thread")


def small_generator(decoder="siren"):
    return Generator(image_size=16, patch_size=4, n_embd=32, n_layer=2, n_head=2, latent_dim=16,
                     mapping_depth=2, decoder=decoder, inr_dim=16)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return Accelerator(cpu=True)


def make_stage(compose_cfg, *overrides):
    from vqtransformer.stages.vitgan import ViTGANStage

    torch.manual_seed(0)
    return ViTGANStage(compose_cfg(["stage=vitgan", "logger=none", *SMALL, *overrides]))


# --------------------------------------------------------------------------- generator
@pytest.mark.parametrize("decoder", ["siren", "linear"])
def test_generator_shape_and_range(decoder):
    torch.manual_seed(0)
    G = small_generator(decoder)
    x = G(torch.randn(5, 16))
    assert x.shape == (5, 3, 16, 16)
    assert x.abs().max() < 1 and x.std() > 0.05
    assert G(100 * torch.randn(3, 16)).abs().max() <= 1  # tanh: in [-1, 1] whatever the input


def test_latent_reaches_the_generator_only_through_sln():
    torch.manual_seed(0)
    G = small_generator()
    z1, z2 = torch.randn(2, 16), torch.randn(2, 16)
    assert torch.equal(G(z1), G(z1))
    assert not torch.allclose(G(z1), G(z2), atol=1e-3)
    with torch.no_grad():  # SLN's gamma(w), beta(w) constant in w: z no longer matters
        for m in G.modules():
            if isinstance(m, SLN):
                m.gamma.weight.zero_()
                m.beta.weight.zero_()
    torch.testing.assert_close(G(z1), G(z2))


def test_generator_from_config_rejects_bad_values():
    with pytest.raises(ValueError, match="vitgan.generator.patch_size"):
        Generator(image_size=16, patch_size=5)
    with pytest.raises(ValueError, match="vitgan.generator.decoder"):
        Generator(image_size=16, patch_size=4, decoder="conv")
    with pytest.raises(ValueError, match="vitgan.discriminator.patch_size"):
        Discriminator(image_size=18, patch_size=3)


# ----------------------------------------------------------------------- discriminator
def test_discriminator_uses_l2_attention_and_isn_everywhere():
    D = Discriminator(image_size=16, patch_size=4, n_embd=32, n_layer=2, n_head=2)
    assert D(torch.randn(3, 3, 16, 16)).shape == (3,)
    blocks = list(D.blocks)
    assert blocks and all(isinstance(b.attn, L2SelfAttention) for b in blocks)
    layers = [m for m in D.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(layers) == 1 + 2 * 5 + 1  # patch conv, (query, value, proj, 2 MLP) per block, head
    assert all(parametrize.is_parametrized(m, "weight") for m in layers)


def test_overlapping_patches_cover_pixels_more_than_once():
    torch.manual_seed(0)
    P, S = 4, 16
    D = Discriminator(image_size=S, patch_size=P, n_embd=8, n_layer=1, n_head=1, isn=False)
    x = torch.randn(1, 3, S, S, requires_grad=True)
    tokens = D.patchify(x)[0]  # [L, C]
    assert tokens.shape[0] == (S // P) ** 2
    cover = torch.zeros(S, S)
    for t in range(tokens.shape[0]):
        g, = torch.autograd.grad(tokens[t].sum(), x, retain_graph=True)
        field = g[0].abs().sum(0) > 0
        rows, cols = field.any(1).nonzero(), field.any(0).nonzero()
        # receptive field: the patch plus P/2 on each side (clipped at the border), i.e. up to 2P x 2P
        ty, tx = divmod(t, S // P)
        assert rows.min() == max(ty * P - P // 2, 0) and rows.max() == min(ty * P + P + P // 2, S) - 1
        assert cols.min() == max(tx * P - P // 2, 0) and cols.max() == min(tx * P + P + P // 2, S) - 1
        cover += field
    inner = cover[P // 2:S - P // 2, P // 2:S - P // 2]
    assert (inner == 4).all()  # every pixel away from the border lies in 2 x 2 patches
    assert (cover >= 1).all()


# ------------------------------------------------------------------------------- EMA
def test_ema_update_and_warmup():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    assert not any(p.requires_grad for p in ema.parameters())
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # t = 1: decay_t = min(0.9, 2 / 11)
    d = 2 / 11
    torch.testing.assert_close(ema.module.weight, d * before + (1 - d) * model.weight)
    for _ in range(100):
        ema.update(model)
    torch.testing.assert_close(ema.module.weight, model.weight)
    ema.train()
    assert not ema.module.training


# ----------------------------------------------------------------------------- stage
def test_stage_steps_touch_only_their_own_network(compose_cfg, accelerator):
    stage = make_stage(compose_cfg)
    specs = stage.setup(accelerator)
    assert [s.name for s in specs] == ["generator", "discriminator"]
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1}
    G, D = stage.generator, stage.discriminator

    loss, logs = stage.training_step(batch, 0, 0)
    loss.backward()
    assert set(logs) == {"loss/g"}
    assert all(p.grad is not None for p in G.parameters())
    assert all(p.grad is None for p in D.parameters())
    assert all(p.requires_grad for p in D.parameters())  # unfrozen again
    specs[0].optimizer.step()
    specs[0].optimizer.zero_grad(set_to_none=True)
    ema_before = [p.clone() for p in stage.ema.parameters()]

    loss, logs = stage.training_step(batch, 0, 1)
    loss.backward()
    assert set(logs) == {"loss/d", "d/real", "d/fake", "bcr"} and all(math.isfinite(v) for v in logs.values())
    assert all(p.grad is None for p in G.parameters())
    assert all(p.grad is not None for p in D.parameters())
    assert int(stage.ema.num_updates) == 1  # the EMA followed the generator step
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, stage.ema.parameters()))
    stage.after_step(0)
    assert int(stage.ema.num_updates) == 1  # once per generator step


def test_stage_r1_and_sampling(compose_cfg, accelerator):
    stage = make_stage(compose_cfg, "vitgan.r1_gamma=1.0", "vitgan.bcr.real=0", "vitgan.bcr.fake=0")
    stage.setup(accelerator)
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1}
    loss, logs = stage.training_step(batch, 0, 1)  # no cached fakes: regenerated
    loss.backward()
    assert "r1" in logs and logs["r1"] > 0 and "bcr" not in logs

    stage.train(False)
    x = stage.sample(5, seed=3)
    assert x.shape == (5, 3, 16, 16) and x.abs().max() <= 1
    assert torch.equal(x, stage.sample(5, seed=3))
    grid = stage.validation_images(batch)["samples"]
    assert grid.shape[0] == 3 and grid.min() >= 0 and grid.max() <= 1
    assert set(stage.validate(batch)) == {"d/real", "d/fake", "d/gap"}
    with pytest.raises(ValueError, match="unconditional"):
        stage.sample(2, condition=[1, 2])
    with pytest.raises(ValueError, match="vitgan.image_size"):
        stage.training_step({"image": torch.zeros(2, 3, 32, 32)}, 0, 0)


def test_bcr_views_are_independent_augmentations_of_the_raw_images(compose_cfg, monkeypatch):
    """bCR compares D(T1(x)) with D(T2(x)), T1 = DiffAugment (augment.policy), T2 = bcr.policy, each drawn
    once on the raw reals / detached fakes, not D(T1(x)) with D(T2(T1(x)))."""
    import vqtransformer.stages.vitgan as vitgan_stage

    # a recognisable "augmentation": adds 0.25 (augment policy) or 4.0 (bcr policy), so T2(T1(x)) = x + 4.25
    shift = {"color,translation,cutout": 0.25, "translation": 4.0}
    calls = []

    def tagged(x, policy="color,translation,cutout", strength=1.0):
        calls.append((policy, x.detach().clone()))
        return x + shift[policy]

    monkeypatch.setattr(vitgan_stage, "DiffAugment", tagged)
    stage = make_stage(compose_cfg, "vitgan.bcr.policy=translation")
    seen = []
    stage.discriminator.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    real = torch.rand(3, 3, 16, 16) * 2 - 1
    loss, logs = stage.training_step({"image": real}, 0, 1)
    assert "bcr" in logs and torch.isfinite(loss)
    (x,) = seen  # one D forward for all four views
    assert x.shape[0] == 4 * 3
    raw = calls[0][1]  # [real, detached fake]
    torch.testing.assert_close(raw[:3], real)
    assert [p for p, _ in calls] == ["color,translation,cutout", "translation"]
    assert all(torch.equal(inp, raw) for _, inp in calls)  # both augmentations see the raw batch
    torch.testing.assert_close(x[:6], raw + 0.25)  # T1(real), T1(fake): the adversarial views
    torch.testing.assert_close(x[6:], raw + 4.0)   # T2(real), T2(fake): one augmentation from raw, not x + 4.25


def test_bcr_second_view_is_not_the_first_augmented_again(compose_cfg):
    """With the real DiffAugment (seeded): brightness-only T1 and translation T2. T2 of the raw image keeps the
    raw pixel values (a shift with zero fill); T2(T1(x)) would carry T1's per-image brightness offset."""
    stage = make_stage(compose_cfg, "vitgan.augment.policy=color", "vitgan.augment.strength=1.0",
                       "vitgan.bcr.policy=translation")
    seen = []
    stage.discriminator.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    torch.manual_seed(3)
    real = torch.rand(4, 3, 16, 16) * 0.5 + 0.25  # values in [0.25, 0.75]: no pixel is 0
    stage.training_step({"image": real}, 0, 1)
    (x,) = seen
    view1, view3 = x[:4], x[8:12]
    assert not torch.allclose(view1, real)  # T1 changed the colours
    for i in range(4):
        inside = view3[i] != 0  # translation fills the border with zeros; the rest are raw pixels
        assert inside.float().mean() > 0.5
        raw_values = set(real[i].flatten().tolist())
        assert all(v in raw_values for v in view3[i][inside].tolist()), "T2 was applied to T1(x), not to x"


def test_stage_checkpoint_round_trip(compose_cfg, accelerator):
    stage = make_stage(compose_cfg)
    stage.setup(accelerator)
    stage.training_step({"image": torch.zeros(2, 3, 16, 16)}, 0, 0)
    stage.after_step(0)
    state = stage.state_dict()
    assert set(state) == {"generator", "discriminator", "generator_ema", "arch"}
    other = make_stage(compose_cfg)
    torch.manual_seed(1)
    other.load_state_dict(state)
    for a, b in zip(stage.ema.parameters(), other.ema.parameters()):
        assert torch.equal(a, b)
    assert int(other.ema.num_updates) == 1


def test_tiny_vitgan_trains_on_shapes(compose_cfg, accelerator):
    """A few hundred steps of the tiny preset on shapes (16 px): losses finite, D keeps real and fake apart,
    and the generator moves towards the data."""
    from vqtransformer.data.shapes import ShapesDataset

    torch.manual_seed(0)
    stage = make_stage(compose_cfg)
    ds = ShapesDataset("train", resolution=16, size=1024, seed=0)
    data = torch.stack([ds[i]["image"] for i in range(len(ds))])
    specs = stage.setup(accelerator)
    g = torch.Generator().manual_seed(0)

    def mean_colour_gap() -> float:  # distance of per-channel image statistics, EMA samples vs data
        x = stage.sample(256, seed=0)
        return ((x.mean((0, 2, 3)) - data.mean((0, 2, 3))).abs().sum()
                + (x.std((2, 3)).mean(0) - data.std((2, 3)).mean(0)).abs().sum()).item()

    gap_before = mean_colour_gap()
    stage.train(True)
    for step in range(250):
        batch = {"image": data[torch.randint(len(data), (16,), generator=g)]}
        for idx, spec in enumerate(specs):
            loss, logs = stage.training_step(batch, step, idx)
            assert torch.isfinite(loss), (step, idx, logs)
            accelerator.backward(loss)
            spec.optimizer.step()
            spec.optimizer.zero_grad(set_to_none=True)
        stage.after_step(step)
    stage.train(False)
    val = [stage.validate({"image": data[i:i + 64]}) for i in range(0, 256, 64)]
    d_real = sum(v["d/real"] for v in val) / len(val)
    d_fake = sum(v["d/fake"] for v in val) / len(val)
    assert math.isfinite(d_real) and math.isfinite(d_fake)
    assert d_real - d_fake > 0.1, (d_real, d_fake)  # D has not collapsed to a constant
    assert mean_colour_gap() < 0.85 * gap_before
