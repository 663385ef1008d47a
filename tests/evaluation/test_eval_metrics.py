"""FID / IS / KID / PSNR / SSIM correctness, offline, with the stand-in feature network."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from vqtransformer.evaluation import generative as G
from vqtransformer.evaluation.features import StandinFeatures, extract_features
from vqtransformer.evaluation.protocol import (
    EvaluationError,
    check_covariance_rank,
    metrics_for_stage,
    to_uint8,
)
from vqtransformer.evaluation.reconstruction import PixelMetrics, codebook_stats
from vqtransformer.stages import stage_class

CPU = torch.device("cpu")


def smooth_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Structured images in [-1, 1]: upsampled 4x4 colour fields."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=size, mode="bilinear", align_corners=False)


def feats(x: torch.Tensor):
    return extract_features(StandinFeatures(), [to_uint8(x[i:i + 128]) for i in range(0, len(x), 128)], CPU)


@pytest.fixture(scope="module")
def base():
    x = smooth_images(256, 0)
    f, logits = feats(x)
    return x, f, logits


def frechet_scipy(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_of_a_set_with_itself_is_zero(base):
    _, f, _ = base
    scale = G.fid(f, feats(smooth_images(256, 1))[0])
    assert abs(G.fid(f, f)) < 1e-8 * max(scale, 1)


def test_fid_grows_with_noise(base):
    x, f, _ = base
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    values = [G.fid(f, feats(x + s * noise)[0]) for s in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)]
    assert all(b > a for a, b in zip(values, values[1:])), values


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fid_equals_scipy_frechet_distance(base):
    _, f, _ = base
    f2 = feats(smooth_images(256, 2) * 0.8)[0]
    ours = G.fid(f, f2)
    ref = frechet_scipy(f.double().numpy(), f2.double().numpy())
    assert ours == pytest.approx(ref, rel=1e-4)


def test_inception_score_of_one_repeated_image_is_one(base):
    x, _, logits = base
    _, same = feats(x[:1].repeat(100, 1, 1, 1))
    mean, std = G.inception_score(same, splits=10, seed=0)
    assert mean == pytest.approx(1.0, abs=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    assert G.inception_score(logits, splits=4, seed=0)[0] > 1.05  # varied images score above 1


def test_kid_of_identical_sets_is_near_zero(base):
    x, f, _ = base
    same, _ = G.kid(f, f, subsets=20, subset_size=128, seed=0)
    noisy, _ = G.kid(f, feats(x + 0.4 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3)))[0],
                     subsets=20, subset_size=128, seed=0)
    assert noisy > 0 and abs(same) < 0.05 * noisy


def test_metric_seeds_make_kid_and_is_deterministic(base):
    _, f, logits = base
    f2 = f + 0.1
    assert G.kid(f, f2, 10, 64, seed=5) == G.kid(f, f2, 10, 64, seed=5)
    assert G.inception_score(logits, 4, seed=5) == G.inception_score(logits, 4, seed=5)


def test_psnr_ssim_l1_match_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    a = to_uint8(smooth_images(6, 4, size=48) + 0.2 * torch.randn(6, 3, 48, 48, generator=g))
    b = (a.float() + torch.randn(a.shape, generator=g) * 12).clamp(0, 255).to(torch.uint8)
    pm = PixelMetrics(48, ["psnr", "ssim", "l1"], CPU)
    pm.update(a[:4], b[:4])
    pm.update(a[4:], b[4:])
    out = pm.compute()
    A, B = a.double().numpy() / 255, b.double().numpy() / 255
    psnr = np.mean([skm.peak_signal_noise_ratio(A[i], B[i], data_range=1.0) for i in range(6)])
    ssim = np.mean([skm.structural_similarity(A[i], B[i], data_range=1.0, channel_axis=0, gaussian_weights=True,
                                              sigma=1.5, use_sample_covariance=False) for i in range(6)])
    assert out["psnr"] == pytest.approx(psnr, rel=1e-5)
    assert out["ssim"] == pytest.approx(ssim, rel=1e-5)
    assert out["l1"] == pytest.approx(np.abs(A - B).mean(), rel=1e-9)


def test_ms_ssim_only_where_size_allows():
    assert "ms_ssim" not in PixelMetrics(64, ["ms_ssim"], CPU).m
    assert "ms_ssim" in PixelMetrics(192, ["ms_ssim"], CPU).m


def test_codebook_stats():
    counts = torch.tensor([4, 4, 0, 0, 8, 0, 0, 0])
    s = codebook_stats(counts)
    p = np.array([0.25, 0.25, 0.5])
    assert s["codebook_usage"] == pytest.approx(0.375)  # a fraction, as val/codebook_usage
    assert s["dead_codes"] == 5 and s["codebook_size"] == 8
    assert s["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.999, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 255, 255, 255]


def test_class_balanced_labels():
    labels = G.class_balanced_labels(103, 10)
    counts = torch.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 103


def test_generator_metric_on_a_first_stage_is_refused():
    with pytest.raises(EvaluationError, match="'is'.*first stage"):
        metrics_for_stage(stage_class("vqgan"), ["psnr", "is"])
    with pytest.raises(EvaluationError, match="'psnr'.*generator"):
        metrics_for_stage(stage_class("vitgan"), ["psnr"])
    assert metrics_for_stage(stage_class("transformer"), None) == ["fid", "is", "kid", "nll"]
    assert metrics_for_stage(stage_class("vqdiffusion"), None) == ["fid", "is", "kid"]  # no likelihood declared


def test_small_sample_count_names_the_number_needed():
    with pytest.raises(EvaluationError, match="at least 2049"):
        check_covariance_rank(1000, 2048, "generated samples", "error", "Set eval.num_samples>=2049.")
    assert "2049" in check_covariance_rank(1000, 2048, "generated samples", "warn", "")
    assert check_covariance_rank(2049, 2048, "x", "error", "") is None


class _ClassNLL:
    """A class-conditional stand-in: nll 1 per token under the image's own class (``own``), 3 under any other."""

    condition_type, num_classes, T = "class", 4, 5

    def __init__(self, uses_class: bool = True):
        self.uses_class = uses_class

    def nll(self, batch):
        right = (batch["class_label"] == batch["own"]).double()[:, None].expand(-1, self.T)
        return 3.0 - 2.0 * right if self.uses_class else torch.full(right.shape, 2.0, dtype=torch.float64)


def _class_batches():
    own = torch.arange(8) % 4
    return [{"class_label": own[:4].clone(), "own": own[:4]}, {"class_label": own[4:].clone(), "own": own[4:]}]


def test_class_information_is_the_nll_gain_of_the_true_class_per_image():
    out = G.transformer_nll(_ClassNLL(), _class_batches(), torch.device("cpu"), num_pixels=4)
    assert out["nll"] == pytest.approx(1.0)
    assert out["class_information"] == pytest.approx(2.0 * _ClassNLL.T)  # every wrong class costs 2 nats per token
    ignored = G.transformer_nll(_ClassNLL(uses_class=False), _class_batches(), torch.device("cpu"), num_pixels=4)
    assert ignored["class_information"] == pytest.approx(0.0)


def test_class_information_only_for_class_conditional_stages():
    stage = _ClassNLL(uses_class=False)
    stage.condition_type = "none"
    assert "class_information" not in G.transformer_nll(stage, _class_batches(), torch.device("cpu"), num_pixels=4)
