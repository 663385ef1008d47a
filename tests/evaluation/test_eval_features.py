"""Feature networks and their weights: never silently another network; real Inception when cached."""

import hashlib
from pathlib import Path

import pytest
import torch

from vqtransformer.evaluation.features import (
    INCEPTION_FILE,
    StandinFeatures,
    build_feature_network,
    build_lpips,
    hub_checkpoint_dir,
    resolve_weights,
)
from vqtransformer.evaluation.protocol import EvaluationError, to_uint8
from vqtransformer.weights import WeightsUnavailableError

REAL_HUB = hub_checkpoint_dir()


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    return tmp_path


def test_missing_inception_weights_stop_with_file_dir_and_key(empty_hub):
    with pytest.raises(WeightsUnavailableError) as e:
        build_feature_network("inception", download=False)
    msg = str(e.value)
    assert INCEPTION_FILE in msg and str(empty_hub / "torch" / "hub" / "checkpoints") in msg
    assert "eval.feature_weights" in msg


def test_missing_lpips_weights_stop_with_key(empty_hub):
    with pytest.raises(WeightsUnavailableError, match="alexnet-owt-7be5be79.pth.*eval.lpips_weights"):
        build_lpips("alex", download=False)


def test_weights_file_with_wrong_hash_is_refused(tmp_path):
    bad = tmp_path / INCEPTION_FILE
    bad.write_bytes(b"not the inception weights")
    with pytest.raises(WeightsUnavailableError, match="expected prefix 6726825d.*eval.feature_weights"):
        build_feature_network("inception", weights=str(bad))


def test_explicit_weights_path_must_exist(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="eval.feature_weights=.*no such file"):
        build_feature_network("inception", weights=str(tmp_path / "nope.pth"))


def test_resolve_weights_accepts_matching_hash(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"abc")
    prefix = hashlib.sha256(b"abc").hexdigest()[:8]
    assert resolve_weights("w.pth", "http://invalid/", prefix, str(f), "eval.x") == f


def test_unknown_feature_network_names_the_key():
    with pytest.raises(EvaluationError, match="eval.feature_network=nonsense"):
        build_feature_network("nonsense")


def test_standin_is_deterministic_and_labelled():
    a, b = StandinFeatures(), StandinFeatures()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    fa, la = a(x)
    fb, lb = b(x)
    assert torch.equal(fa, fb) and torch.equal(la, lb)
    assert fa.shape == (4, a.num_features) and la.shape == (4, a.num_logits)
    assert build_feature_network("standin").name == "standin"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_feature_network(tmp_path):
    class Net(torch.nn.Module):
        def forward(self, x):
            f = x.float().mean(dim=(2, 3))
            return f, f @ torch.ones(3, 5)

    path = tmp_path / "classifier.pt"
    torch.jit.script(Net()).save(str(path))
    net = build_feature_network(str(path))
    assert net.name == "ts-classifier" and net.num_features == 3 and net.num_logits == 5
    assert net.identity.startswith("ts-classifier-")


# -- with the real weights, when they are in the torch hub cache ---------------
needs_inception = pytest.mark.skipif(not (REAL_HUB / INCEPTION_FILE).is_file(),
                                     reason=f"Inception weights not in {REAL_HUB}")


@needs_inception
def test_real_inception_matches_torch_fidelity():
    """Our features == torch-fidelity's extractor on the same uint8 images (the protocol's resize),
    and FID of a set with itself is ~0."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from vqtransformer.evaluation.generative import fid

    net = build_feature_network("inception", download=False)
    g = torch.Generator().manual_seed(0)
    x = to_uint8(torch.rand(8, 3, 32, 32, generator=g) * 2 - 1)
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(REAL_HUB / INCEPTION_FILE))
    with torch.no_grad():
        f, logits = net(x)
        rf, rl = ref(x)
    assert torch.allclose(f, rf) and torch.allclose(logits, rl)
    assert abs(fid(f, f)) < 1e-3


@pytest.mark.skipif(not (REAL_HUB / "alexnet-owt-7be5be79.pth").is_file(), reason="AlexNet weights not cached")
def test_real_lpips_is_zero_for_identical_images():
    lp = build_lpips("alex", download=False)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert lp(x, x).abs().max() < 1e-6 and (lp(x, -x) > 0.1).all()


def test_lpips_backbone_is_loaded_from_a_local_file(tmp_path, monkeypatch):
    """The verified backbone really replaces the random one (file given by eval.lpips_weights)."""
    import torchvision

    from vqtransformer.losses import (
        perceptual as feats_mod,  # the one LPIPS stack, for training and evaluation
    )

    tv = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(tv.state_dict(), path)
    prefix = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]
    real_resolve = feats_mod.resolve_weights

    def resolve(filename, url, sha_prefix, p, key, download=True, what="", hint=""):
        assert key == "eval.lpips_weights" and sha_prefix == "7be5be79"
        return real_resolve(filename, url, prefix, p, key, download, what, hint)  # our file's hash instead

    monkeypatch.setattr(feats_mod, "resolve_weights", resolve)
    lp = build_lpips("alex", weights=str(path))
    assert torch.equal(lp.model.net.slice1[0].weight, tv.features[0].weight)
    assert torch.equal(getattr(lp.model.net.slice5, "10").weight, tv.features[10].weight)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert lp(x, x).abs().max() < 1e-6 and lp(x, x.flip(-1)).shape == (2,)


def test_lpips_standin_is_offline_deterministic_and_zero_on_identical_images():
    import torch

    from vqtransformer.evaluation.features import build_lpips

    a, b = build_lpips("standin"), build_lpips("standin")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(a(x, x), torch.zeros(2), atol=1e-6)
    assert torch.equal(a(x, y), b(x, y)) and (a(x, y) > 0).all()
