"""VQ-Diffusion denoiser, loss and stage: shapes, conditioning, importance sampling, learning."""

import pytest
import torch
from omegaconf import OmegaConf

from vqtransformer.losses.diffusion import DiffusionLoss
from vqtransformer.models.vqdiffusion import VQDiffusionTransformer
from vqtransformer.modules.diffusion import MaskAndReplace


def test_denoiser_outputs_log_probs_and_is_bidirectional():
    torch.manual_seed(0)
    m = VQDiffusionTransformer(32, (4, 4), n_layer=2, n_head=2, n_embd=32, num_classes=5).eval()
    x_t = torch.randint(0, 33, (3, 4, 4))
    t = torch.tensor([1, 50, 100])
    out = m(x_t, t, torch.tensor([0, 1, 5]))
    assert out.shape == (3, 16, 32)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3, 16))
    x2 = x_t.clone().view(3, 16)
    x2[:, -1] = (x2[:, -1] + 1) % 33
    assert not torch.allclose(m(x2, t)[:, 0], m(x_t, t)[:, 0])  # the first position sees the last
    for p in m.parameters():  # non-zero AdaLN: timestep and class both change the prediction
        torch.nn.init.normal_(p, std=0.1)
    base = m(x_t, t, torch.tensor([0, 0, 0]))
    assert not torch.allclose(base, m(x_t, t + 1, torch.tensor([0, 0, 0])))
    assert not torch.allclose(base, m(x_t, t, torch.tensor([1, 1, 1])))
    torch.testing.assert_close(m(x_t, t, None), m(x_t, t, torch.full((3,), m.null_class)))


def test_from_config_reads_transformer_and_conditioning():
    cfg = OmegaConf.create({"transformer": {"n_layer": 2, "n_head": 2, "n_embd": 32, "attn_pdrop": 0.1},
                            "conditioning": {"type": "class"}, "data": {"num_classes": 6}})
    m = VQDiffusionTransformer.from_config(cfg, 64, (8, 8))
    assert len(m.blocks) == 2 and m.num_classes == 6 and m.class_emb.num_embeddings == 7
    cfg.conditioning.type = "text"
    with pytest.raises(ValueError, match="conditioning.type"):
        VQDiffusionTransformer.from_config(cfg, 64, (8, 8))


def test_importance_sampling_switches_on_after_every_t_is_seen():
    loss = DiffusionLoss(num_timesteps=4, min_count=2)
    t, pt = loss.sample_time(1000, "cpu")
    assert t.min() == 1 and t.max() == 4 and torch.all(pt == 0.25)
    loss.Lt_count.fill_(3)
    loss.Lt_history.copy_(torch.tensor([1.0, 1.0, 100.0, 1.0]) ** 2)
    t, pt = loss.sample_time(4000, "cpu", torch.Generator().manual_seed(0))
    freq = torch.bincount(t - 1, minlength=4).float() / 4000
    want = torch.tensor([1.0, 1.0, 100.0, 1.0]) / 103
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)
    torch.testing.assert_close(pt, want[t - 1], atol=1e-4, rtol=1e-4)
    assert set(loss.state_dict()) == {"Lt_history", "Lt_count"}  # checkpointed


def shapes_tokens(n: int, g: torch.Generator, K: int = 64, side: int = 8) -> torch.Tensor:
    """Shapes-like code grids: a background code with one filled rectangle of another code."""
    bg = torch.randint(0, K // 2, (n, 1, 1), generator=g)
    fg = torch.randint(K // 2, K, (n, 1, 1), generator=g)
    r0, c0 = torch.randint(0, side - 3, (2, n, 1, 1), generator=g)
    hh, ww = torch.randint(2, 4, (2, n, 1, 1), generator=g)
    ii = torch.arange(side).view(1, side, 1)
    jj = torch.arange(side).view(1, 1, side)
    inside = (ii >= r0) & (ii < r0 + hh) & (jj >= c0) & (jj < c0 + ww)
    return torch.where(inside, fg, bg).view(n, side * side)


def test_tiny_model_learns_shapes_tokens():
    """A few hundred steps on one core: the VLB of held-out grids drops well below its start."""
    torch.manual_seed(0)
    K, T = 64, 50
    d = MaskAndReplace(K, T, 0.9, 0.1)
    model = VQDiffusionTransformer(K, (8, 8), n_layer=2, n_head=4, n_embd=64)
    loss_fn = DiffusionLoss(T, min_count=2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    val = shapes_tokens(128, torch.Generator().manual_seed(123))

    def held_out_vlb():
        model.eval()
        v = loss_fn.vlb(model, d, val, generator=torch.Generator().manual_seed(0))
        model.train()
        return v.item()

    before = held_out_vlb()
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds synchronisation on a shared machine
    try:
        for _ in range(200):
            loss, logs = loss_fn(model, d, shapes_tokens(16, g))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(loss)
    assert (loss_fn.Lt_count > 2).all()  # importance sampling was active
    after = held_out_vlb()
    print(f"held-out VLB {before:.3f} -> {after:.3f} nats/token")
    assert after < 0.6 * before, (before, after)


def tiny_vqgan(n_embed: int = 32):
    from vqtransformer.models.vqgan import VQModel

    dd = {"ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
          "in_channels": 3, "out_ch": 3, "resolution": 16, "z_channels": 4, "double_z": False}
    return VQModel(dd, n_embed=n_embed, embed_dim=4)


@pytest.mark.parametrize("conditioning", ["none", "class"])
def test_stage_end_to_end(conditioning):
    from accelerate import Accelerator

    from tests.conftest import compose, optimizer_steps
    from vqtransformer.stages.vqdiffusion import VQDiffusionStage

    torch.manual_seed(0)
    cfg = compose(["stage=vqdiffusion", f"conditioning={conditioning}", "data.resolution=16", "transformer.n_layer=1",
                   "transformer.n_head=2", "transformer.n_embd=32", "diffusion.num_timesteps=20",
                   "stage.importance_min_count=1", "stage.sample_steps=5", "stage.val_samples=4",
                   "stage.cfg_scale=2.0"] + (["conditioning.p_uncond=0.5"] if conditioning == "class" else []))
    assert cfg.first_stage.ckpt is None and cfg.diffusion.mask_final == 0.9
    stage = VQDiffusionStage(cfg, first_stage=tiny_vqgan())
    (spec,) = stage.setup(Accelerator(cpu=True))
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "class_label": torch.tensor([0, 1, 2, 0])}
    stage.train(True)
    ((loss, logs),) = optimizer_steps(stage, spec, batch, 3)[-1:]
    assert torch.isfinite(loss) and set(logs) == {"loss/vlb", "loss/aux", "loss/total"}
    assert all(p.grad is None for p in stage.first_stage.parameters())  # frozen
    stage.train(False)
    assert set(stage.validate(batch)) == {"val/vlb"}
    grid = stage.validation_images(batch)["samples"]
    assert grid.dim() == 3 and grid.shape[0] == 3 and grid.min() >= 0 and grid.max() <= 1
    y = [1, 2] if conditioning == "class" else None
    a = stage.sample(2, y, steps=5, seed=7)
    assert a.shape == (2, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, stage.sample(2, y, steps=5, seed=7))
    assert stage.sample(2, y, steps=4, sampler="purity", seed=7).shape == (2, 3, 16, 16)
    # checkpoint round trip carries the importance-sampling history
    state = stage.state_dict()
    assert state["loss"]["Lt_count"].sum() == 12
    other = VQDiffusionStage(cfg, first_stage=tiny_vqgan())
    other.load_state_dict(state)
    torch.testing.assert_close(other.loss.Lt_history, stage.loss.Lt_history)


def test_train_py_end_to_end(tmp_path, mlflow_uri):
    """train.py stage=vqdiffusion on a (untrained) tiny VQGAN checkpoint: losses, validation, checkpoint."""
    from mlflow import MlflowClient

    from tests.conftest import run_train, untrained_vq_checkpoint

    vq_path = untrained_vq_checkpoint(tmp_path / "vq.ckpt")
    r = run_train(["stage=vqdiffusion", f"first_stage.ckpt={vq_path}", "conditioning=class", "data.resolution=16",
                   "data.batch_size=4", "data.val_size=8", "data.num_workers=0", "transformer.n_layer=1",
                   "transformer.n_head=2", "transformer.n_embd=32", "diffusion.num_timesteps=10",
                   "stage.sample_steps=5", "stage.val_samples=4", "trainer.max_steps=4", "trainer.val_every=4",
                   "trainer.ckpt_every=4", "trainer.val_batches=1", "trainer.log_every=1",
                   f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("vqdiffusion").experiment_id])
    for key in ("loss/vlb", "loss/aux", "loss/total", "val/vlb"):
        assert key in run.data.metrics, key
    from vqtransformer.loading import load_stage

    stage = load_stage(tmp_path / "run").stage  # a run directory: its checkpoints/last.ckpt
    assert stage.loss.Lt_count.sum() == 16 and stage.sample(2, [0, 1], steps=3).shape == (2, 3, 16, 16)
