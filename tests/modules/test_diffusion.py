"""Mask-and-replace math against dense transition matrices and Monte-Carlo chains."""

import pytest
import torch

from vqtransformer.modules.diffusion import MaskAndReplace, log_onehot, sample_categorical

K, T = 5, 12
PRESETS = {"paper": (0.9, 0.1), "released": (0.99999, 1e-6)}


def step_matrix(d: MaskAndReplace, s: int, t: int) -> torch.Tensor:
    """Dense (K+1)x(K+1) matrix Q_{s->t}[from, to] of one mask-and-replace jump (float64)."""
    a = d.alpha_bar[t] / d.alpha_bar[s]
    g = 1 - d.keep_bar[t] / d.keep_bar[s]
    b = (1 - a - g) / d.K
    Q = torch.zeros(d.K + 1, d.K + 1, dtype=torch.float64)
    Q[: d.K, : d.K] = b + a * torch.eye(d.K, dtype=torch.float64)
    Q[: d.K, d.K] = g
    Q[d.K, d.K] = 1.0
    return Q


def cumulative(d: MaskAndReplace, s: int, t: int) -> torch.Tensor:
    Q = torch.eye(d.K + 1, dtype=torch.float64)
    for u in range(s + 1, t + 1):
        Q = Q @ step_matrix(d, u - 1, u)
    return Q


def vec(n, v):
    return torch.full((n,), v, dtype=torch.long)


@pytest.mark.parametrize("preset", PRESETS)
def test_closed_form_equals_product_of_single_steps(preset):
    d = MaskAndReplace(K, T, *PRESETS[preset])
    states = torch.arange(K + 1).view(K + 1, 1)  # every start state, one token each
    for s, t in [(0, 1), (0, 7), (0, T), (3, 9), (5, 6)]:
        got = d.q_pred(log_onehot(states, K + 1), vec(K + 1, s), vec(K + 1, t)).exp().squeeze(1)
        torch.testing.assert_close(got.double(), cumulative(d, s, t), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.sum(-1), torch.ones(K + 1), atol=1e-5, rtol=0)
    if preset == "paper":  # abar_T = 0: x_T forgets x_0
        q_T = cumulative(d, 0, T)[:K]
        torch.testing.assert_close(q_T, q_T[:1].expand(K, -1))


def test_monte_carlo_single_steps_match_closed_form():
    d = MaskAndReplace(K, T, 0.6, 0.3)
    g = torch.Generator().manual_seed(0)
    n, t_end = 40000, 7
    x0 = torch.randint(0, K, (1, n), generator=g)
    x = x0.clone()
    for t in range(1, t_end + 1):  # t single steps, each sampled from q(x_t | x_{t-1})
        log_p = d.q_pred(log_onehot(x, K + 1), vec(1, t - 1), vec(1, t))
        x = sample_categorical(log_p, g)
    direct = d.q_sample(x0, vec(1, t_end), g)
    closed = d.q_pred(log_onehot(x0, K + 1), vec(1, 0), vec(1, t_end)).exp()[0]  # [n, K+1]
    # state frequencies relative to x_0: stays, became another code, masked
    for sample in (x, direct):
        same = (sample == x0).float().mean()
        masked = (sample == K).float().mean()
        assert abs(same - closed[torch.arange(n), x0[0]].mean()) < 0.01
        assert abs(masked - closed[:, K].mean()) < 0.01
        for k in range(K + 1):  # per-state marginals
            assert abs((sample == k).float().mean() - closed[:, k].mean()) < 0.01


def true_posterior_dense(d, x0: int, xt: int, s: int, t: int) -> torch.Tensor:
    """q(x_s | x_t, x_0) by Bayes from dense matrices: [K+1]."""
    num = step_matrix(d, s, t)[:, xt] * cumulative(d, 0, s)[x0]
    return num / cumulative(d, 0, t)[x0, xt]


@pytest.mark.parametrize("preset", PRESETS)
def test_posterior_is_distribution_and_matches_bayes(preset):
    d = MaskAndReplace(K, T, *PRESETS[preset])
    g = torch.Generator().manual_seed(1)
    B, N = 6, 8
    x_t = torch.randint(0, K + 1, (B, N), generator=g)
    t = torch.tensor([1, 2, 5, 9, 12, 12])
    s = torch.tensor([0, 1, 2, 8, 0, 11])
    log_x0 = torch.randn(B, N, K, generator=g).mul(2).log_softmax(-1)
    post = d.posterior(log_x0, x_t, t, s).exp().double()
    assert (post >= 0).all()
    torch.testing.assert_close(post.sum(-1), torch.ones(B, N, dtype=torch.float64), atol=1e-5, rtol=0)
    p_x0 = log_x0.exp().double()
    for b in range(B):
        for i in range(N):
            want = sum(p_x0[b, i, k] * true_posterior_dense(d, k, int(x_t[b, i]), int(s[b]), int(t[b]))
                       for k in range(K))
            torch.testing.assert_close(post[b, i], want, atol=2e-5, rtol=1e-4)
            if x_t[b, i] < K:  # [MASK] is never the past of a code
                assert post[b, i, K] <= 1e-29


@pytest.mark.parametrize("preset", PRESETS)
def test_chained_single_steps_equal_strided_jump(preset):
    d = MaskAndReplace(K, T, *PRESETS[preset])
    states = torch.arange(K + 1).view(K + 1, 1)

    def matrix(x0: int, t: int, s: int) -> torch.Tensor:
        """M[x_t, x_s] = q(x_s | x_t, x_0) for every x_t state."""
        log_x0 = log_onehot(torch.full((K + 1, 1), x0), K)
        return d.posterior(log_x0, states, vec(K + 1, t), vec(K + 1, s)).exp().squeeze(1).double()

    for x0 in range(K):
        for t, k in [(T, 4), (9, 9), (5, 2)]:
            chained = torch.eye(K + 1, dtype=torch.float64)
            for u in range(t, t - k, -1):
                chained = chained @ matrix(x0, u, u - 1)
            reachable = cumulative(d, 0, t)[x0] > 1e-12  # rows of impossible x_t are arbitrary
            torch.testing.assert_close(chained[reachable], matrix(x0, t, t - k)[reachable], atol=1e-5, rtol=1e-4)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="diffusion.replace_final"):
        MaskAndReplace(K, T, 0.95, 0.1)
    with pytest.raises(ValueError, match="diffusion.replace_final"):
        MaskAndReplace(K, T, 1.0, 0.0)
