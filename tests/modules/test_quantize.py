import pytest
import torch
import torch.nn.functional as F

from vqtransformer.modules.quantize import VectorQuantizer, nearest_code, perplexity


def brute_nearest(z, e):
    return torch.cdist(z, e).argmin(1)


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_nearest_code_matches_brute_force_for_any_chunk(chunk):
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(300, 16, generator=g), torch.randn(97, 16, generator=g)
    assert torch.equal(nearest_code(z, e, chunk_size=chunk), brute_nearest(z, e))


def test_cosine_lookup_picks_most_similar_direction():
    e = F.normalize(torch.randn(50, 8), dim=1)
    z = F.normalize(torch.randn(40, 8), dim=1)
    assert torch.equal(nearest_code(z, e, cosine=True), (z @ e.t()).argmax(1))


def test_forward_quantizes_to_codebook_rows_and_straight_through_gradient():
    vq = VectorQuantizer(32, 4, beta=0.25, init="normal", restart_dead=False)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, loss, info = vq(z)
    flat = z_q.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.allclose(flat, vq.embedding.weight[info["indices"].flatten()], atol=1e-6)
    # straight-through: d(sum(w * z_q))/dz == w exactly
    w = torch.randn_like(z_q)
    (grad,) = torch.autograd.grad((w * z_q).sum(), z)
    assert torch.allclose(grad, w)


def test_loss_puts_beta_on_the_encoder_commitment_term():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, beta=0.25, init="normal", restart_dead=False)
    z = torch.randn(1, 4, 4, 4, requires_grad=True)
    _, loss, info = vq(z)
    e = vq.embedding.weight[info["indices"].flatten()]
    zf = z.permute(0, 2, 3, 1).reshape(-1, 4)
    mse = F.mse_loss(zf, e).item()
    assert loss.item() == pytest.approx((1 + 0.25) * mse, rel=1e-5)
    gz, ge = torch.autograd.grad(loss, [z, vq.embedding.weight])
    # encoder gets beta * d mse/dz; codebook gets 1 * d mse/de (the original code swapped them)
    gz_expected = 0.25 * 2 * (zf - e) / zf.numel()
    assert torch.allclose(gz.permute(0, 2, 3, 1).reshape(-1, 4), gz_expected, atol=1e-6)
    assert ge.abs().sum() > 0


def test_ema_update_moves_codes_to_the_mean_of_their_vectors_and_has_no_codebook_grad():
    vq = VectorQuantizer(2, 2, beta=1.0, ema=True, decay=0.0, eps=1e-9, init="normal", restart_dead=False)
    vq.embedding.weight.data = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    vq.embed_avg.copy_(vq.embedding.weight.data)
    vq.train()
    z = torch.tensor([[1.0, 1.0], [3.0, 1.0], [9.0, 9.0]]).view(3, 2, 1, 1).permute(1, 0, 2, 3).reshape(1, 2, 3, 1)
    _, loss, _ = vq(z)
    assert torch.allclose(vq.embedding.weight, torch.tensor([[2.0, 1.0], [9.0, 9.0]]), atol=1e-4)
    assert not vq.embedding.weight.requires_grad


def test_dead_codes_restart_from_batch_vectors():
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 4, init="normal", restart_dead=True, dead_after=2)
    vq.train()
    z = torch.randn(1, 4, 2, 2) + 50.0  # far from every code: only a few codes ever win
    for _ in range(4):
        vq(z)
    used_before = int((vq.step - vq.last_used <= 2).sum())
    # after a restart every code was either used or reset to one of the batch's vectors
    zf = z.permute(0, 2, 3, 1).reshape(-1, 4)
    d = torch.cdist(vq.embedding.weight.detach(), zf).min(1).values
    assert used_before == 64
    assert (d < 1.0).float().mean() > 0.9


def test_data_init_and_l2_normalized_codes():
    vq = VectorQuantizer(8, 3, init="data", l2_normalize=True, restart_dead=False)
    vq.train()
    z = torch.randn(2, 3, 4, 4)
    z_q, _, _ = vq(z)
    assert bool(vq.initted)
    assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)


def test_usage_and_perplexity():
    assert perplexity(torch.tensor([5.0, 5.0, 5.0, 5.0])).item() == pytest.approx(4.0)
    assert perplexity(torch.tensor([10.0, 0.0, 0.0])).item() == pytest.approx(1.0)
    vq = VectorQuantizer(4, 2, init="normal", restart_dead=False, usage_window=10)
    vq.embedding.weight.data = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]])
    vq.train()
    vq(torch.zeros(1, 2, 2, 2))
    usage, _ = vq.usage()
    assert usage == pytest.approx(0.25)


def test_loaded_codes_count_as_initialised():
    """codebook.init=data must not replace loaded codes: taming's files (no initted flag, no EMA statistics), and
    ours saved before the first step (initted False)."""
    src = VectorQuantizer(16, 4, init="normal")
    w0 = src.embedding.weight.detach().clone()
    z = (w0[torch.arange(32) % 16] + 0.01 * torch.randn(32, 4)).view(2, 4, 4, 4).permute(0, 3, 1, 2)  # near the codes
    for ema in (False, True):
        q = VectorQuantizer(16, 4, init="data", ema=ema)
        q.load_state_dict({"embedding.weight": w0.clone()})  # strict: what the file lacks is derived
        assert bool(q.initted)
        q.train()
        q(z)
        if ema:  # statistics started from the loaded codes: a small EMA move, not a data re-initialisation
            assert (q.embedding.weight - w0).abs().max() < 0.05
        else:  # no gradient step here: untouched
            assert torch.equal(q.embedding.weight, w0)
    ours = VectorQuantizer(16, 4, init="data").state_dict()
    assert not bool(ours["initted"])
    q = VectorQuantizer(16, 4, init="data")
    q.load_state_dict(ours)
    assert bool(q.initted)
