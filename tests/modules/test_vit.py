"""ViTGAN building blocks: ISN, L2 attention, SLN, modulated linear, patch decoders."""

import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from vqtransformer.modules.transformer import SelfAttention
from vqtransformer.modules.vit import (
    SLN,
    FourierEmbedding,
    ImprovedSpectralNorm,
    L2SelfAttention,
    LinearPatchDecoder,
    ModulatedLinear,
    SirenPatchDecoder,
    apply_isn,
    grid_coords,
    patches_to_image,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def spectral_norm(W: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(W.detach().flatten(1), ord=2).item()


# ----------------------------------------------------------------------------- ISN
@pytest.mark.parametrize("make", [lambda: nn.Linear(24, 40), lambda: nn.Conv2d(3, 16, 4, stride=2, padding=1)])
def test_isn_converges_to_sigma_init(make):
    torch.manual_seed(0)
    layer = make()
    sigma0 = spectral_norm(layer.weight)
    apply_isn(layer)
    isn = layer.parametrizations.weight[0]
    assert isn.sigma_init.item() == pytest.approx(sigma0, rel=1e-5)
    # at init W_bar = W (u, v start at the singular vectors)
    torch.testing.assert_close(layer.weight, layer.parametrizations.weight.original, rtol=1e-4, atol=1e-6)
    # a different, larger weight (as after training): after power iteration, ||W_bar||_2 = sigma(W_init)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(5 * torch.randn_like(layer.parametrizations.weight.original))
    assert spectral_norm(layer.parametrizations.weight.original) > 3 * sigma0
    for _ in range(100):
        _ = layer.weight  # each training-mode evaluation runs one power iteration
    assert spectral_norm(layer.weight) == pytest.approx(sigma0, rel=1e-3)


def test_isn_buffers_persist_in_place_and_take_no_gradient():
    torch.manual_seed(0)
    lin = apply_isn(nn.Linear(16, 12))
    isn = lin.parametrizations.weight[0]
    u, v, sigma_init = isn._u, isn._v, isn.sigma_init.clone()
    with torch.no_grad():
        lin.parametrizations.weight.original.add_(torch.randn(12, 16))  # move W so that u, v must change
    u_before = u.clone()
    x = torch.randn(4, 16)
    loss = lin(x).square().sum() + lin(x).sum()  # two forwards before one backward
    loss.backward()
    assert isn._u is u and isn._v is v  # same tensor objects, updated in place
    assert not torch.equal(u, u_before)
    assert not (u.requires_grad or v.requires_grad or isn.sigma_init.requires_grad)
    assert u.grad is None and v.grad is None
    assert lin.parametrizations.weight.original.grad is not None
    assert torch.equal(isn.sigma_init, sigma_init)  # stored once
    names = {n for n, _ in lin.named_parameters()}
    assert names == {"bias", "parametrizations.weight.original"}
    assert {"parametrizations.weight.0._u", "parametrizations.weight.0._v",
            "parametrizations.weight.0.sigma_init"} <= set(lin.state_dict())


def test_isn_eval_mode_freezes_power_iteration():
    lin = apply_isn(nn.Linear(8, 8))
    with torch.no_grad():
        lin.parametrizations.weight.original.mul_(3).add_(torch.randn(8, 8))
    lin.eval()
    u = lin.parametrizations.weight[0]._u.clone()
    lin(torch.randn(2, 8))
    assert torch.equal(lin.parametrizations.weight[0]._u, u)


def test_isn_is_scale_invariant():
    """W_bar depends only on the direction of W: sigma(W_init) * W / sigma(W)."""
    torch.manual_seed(0)
    W = torch.randn(6, 5)
    isn = ImprovedSpectralNorm(torch.randn(6, 5))
    for _ in range(50):
        a = isn(W)
    torch.testing.assert_close(isn(7 * W), a, rtol=1e-5, atol=1e-6)
    assert parametrize.is_parametrized(apply_isn(nn.Linear(3, 3)), "weight")


# ---------------------------------------------------------------------- L2 attention
def naive_l2_attention(attn: L2SelfAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(-||q_i - k_j||^2 / sqrt(d_h)) V, written out; returns (output, weights [B,H,T,T])."""
    B, T, C = x.shape
    H = attn.n_head
    q = attn.query(x).view(B, T, H, C // H).transpose(1, 2)
    k = attn.query(x).view(B, T, H, C // H).transpose(1, 2)  # tied
    v = attn.value(x).view(B, T, H, C // H).transpose(1, 2)
    dist2 = (q.unsqueeze(-2) - k.unsqueeze(-3)).square().sum(-1)
    w = torch.softmax(-dist2 / math.sqrt(C // H), dim=-1)
    y = (w @ v).transpose(1, 2).reshape(B, T, C)
    return attn.proj(y), w


def test_l2_attention_matches_naive_with_gradients():
    torch.manual_seed(0)
    attn = L2SelfAttention(16, 2).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    y = attn(x)
    y_ref, _ = naive_l2_attention(attn, x)
    torch.testing.assert_close(y, y_ref)
    g, = torch.autograd.grad(y.square().sum(), x)
    g_ref, = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_l2_attention_weights_largest_for_nearest_key():
    torch.manual_seed(0)
    attn = L2SelfAttention(8, 1).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    _, w = naive_l2_attention(attn, x)
    q = attn.query(x)
    dist = torch.cdist(q, q)  # [B, T, T]
    # weights are ordered exactly inversely to the query-key distance (the minus sign)
    assert torch.equal(w[:, 0].argsort(-1, descending=True), dist.argsort(-1))
    assert torch.equal(w[:, 0].argmax(-1), dist.argmin(-1))


def test_l2_attention_ties_query_and_key():
    attn = L2SelfAttention(8, 2)
    assert not hasattr(attn, "key")
    assert {n for n, _ in attn.named_parameters()} == {
        "query.weight", "query.bias", "value.weight", "value.bias", "proj.weight", "proj.bias"}


def test_l2_attention_lipschitz_unlike_dot_product():
    """Kim et al.'s counterexample: a zero query among keys of growing norm. The gradient of
    dot-product attention grows like the square of the scale; tied L2 attention stays bounded."""
    torch.manual_seed(0)
    D, T = 8, 6
    l2, dot = L2SelfAttention(D, 2).double(), SelfAttention(D, 2, causal=False).double()
    for m in (l2, dot):
        for lin in m.modules():
            if isinstance(lin, nn.Linear):
                nn.init.zeros_(lin.bias)
    x0 = torch.randn(T, D, dtype=torch.float64)
    norms = {"l2": [], "dot": []}
    for scale in (1.0, 10.0, 100.0, 1000.0):
        x = (x0 * scale).index_fill(0, torch.tensor([0]), 0.0).requires_grad_(True)
        for name, m in (("l2", l2), ("dot", dot)):
            g, = torch.autograd.grad(m(x[None])[0, 0].sum(), x)
            norms[name].append(g.norm().item())
    assert max(norms["l2"]) < 3 * norms["l2"][0] + 1.0
    assert norms["dot"][-1] > 1e3 * norms["dot"][0]


# ------------------------------------------------------------------------ generator
def test_sln_depends_on_w_and_normalises():
    torch.manual_seed(0)
    sln = SLN(16, 8)
    h = torch.randn(2, 5, 16) * 3 + 1
    w1, w2 = torch.randn(2, 8), torch.randn(2, 8)
    out1, out2 = sln(h, w1), sln(h, w2)
    assert not torch.allclose(out1, out2)
    # (out - beta(w)) / gamma(w) is the parameter-free LayerNorm of h
    normed = (out1 - sln.beta(w1)[:, None]) / (1 + sln.gamma(w1))[:, None]
    torch.testing.assert_close(normed.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)


def test_modulated_linear_matches_per_sample_weights():
    torch.manual_seed(0)
    for demod in (True, False):
        m = ModulatedLinear(6, 5, style_dim=4, demodulate=demod).double()
        x, style = torch.randn(3, 7, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
        s = m.modulation(style)
        W = m.weight[None] * s[:, None, :]  # [N, out, in]: w'_oi = w_oi s_i
        if demod:
            W = W / (W.square().sum(-1, keepdim=True) + m.eps).sqrt()
        ref = torch.einsum("nti,noi->nto", x, W) + m.bias
        torch.testing.assert_close(m(x, style), ref)


def test_patches_to_image_inverts_patchify():
    x = torch.randn(2, 3, 12, 12)
    P, g = 4, 3
    patches = x.unfold(2, P, P).unfold(3, P, P)  # [B, C, g, g, P, P]
    patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(2, g * g, P * P, 3)
    torch.testing.assert_close(patches_to_image(patches, g), x)


def test_grid_coords_and_fourier_embedding():
    c = grid_coords(4)
    assert c.shape == (16, 2) and c.min() == -1 and c.max() == 1
    torch.testing.assert_close(c[1], torch.tensor([-1.0, -1.0 + 2 / 3]))  # row-major (y, x)
    e = FourierEmbedding(2, 32)(c)
    assert e.shape == (16, 32) and e.abs().max() <= 1
    assert torch.linalg.matrix_rank(e) > 8  # positions are distinguishable


@pytest.mark.parametrize("decoder", ["siren", "linear"])
def test_patch_decoders_shape_and_modulation(decoder):
    torch.manual_seed(0)
    dec = SirenPatchDecoder(16, 4, hidden=8) if decoder == "siren" else LinearPatchDecoder(16, 4)
    y = torch.randn(2, 9, 16)
    out = dec(y)
    assert out.shape == (2, 9, 16, 3)
    assert not torch.allclose(out[:, 0], out[:, 1])  # different embeddings -> different patches
    if decoder == "siren":  # one shared coordinate grid, the embedding alone changes the patch
        torch.testing.assert_close(dec(y[:, :1].expand(2, 9, 16))[:, 3], out[:, 0])
