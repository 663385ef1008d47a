"""The shapes judge: trains to >= 0.95 held-out accuracy, is cached by data config, and scores
class-conditional and unconditional samples (judge/class_accuracy, class frequency ratios)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from vqtransformer.evaluation import judge as J
from vqtransformer.evaluation import judge_classes, rec_class_agreement
from vqtransformer.evaluation.features import build_feature_network, default_feature_network
from vqtransformer.evaluation.protocol import EvaluationError, metric_key

# single large objects on a plain background: the judge's easiest config, trained on a test budget
EASY = {"name": "shapes", "resolution": 32, "background": "plain", "object_scale": [0.3, 0.45], "max_objects": 1,
        "seed": 0}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VQT_CACHE", str(tmp_path))
    monkeypatch.setattr(J, "TRAIN_SIZE", 8000)
    monkeypatch.setattr(J, "TEST_SIZE", 600)
    monkeypatch.setattr(J, "EPOCHS", 8)
    return tmp_path


def test_judge_trains_to_095_is_cached_and_retrained_for_another_config(cache, monkeypatch):
    cfg = OmegaConf.create(EASY)
    judge = load = J.load_or_train_judge(cfg)
    assert judge.accuracy >= J.MIN_ACCURACY, judge.accuracy
    assert judge.path.is_file() and judge.path.parent == cache / "judges"
    # the cached copy is reused: training again would fail here
    monkeypatch.setattr(J, "train_judge", lambda *a, **k: pytest.fail("retrained a cached judge"))
    again = J.load_or_train_judge(cfg)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(again(x)[1], load(x)[1]) and again.identity == load.identity
    # another data config is another judge
    other = OmegaConf.create({**EASY, "background": "textured"})
    assert J.judge_path(J.judge_key(other)) != judge.path
    with pytest.raises(pytest.fail.Exception, match="retrained"):
        J.load_or_train_judge(other)


def test_default_judge_trains_deterministically(cache):
    key = J.judge_key(OmegaConf.create(EASY))
    J.TRAIN_SIZE, J.EPOCHS = 512, 1  # (monkeypatched back by the fixture)
    a, sa = J.train_judge(key, progress=False)
    b, sb = J.train_judge(key, progress=False)
    assert sa == sb
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_weak_judge_is_refused(cache, monkeypatch):
    monkeypatch.setattr(J, "train_judge", lambda key, progress=True: (
        J.ShapesJudge(key["resolution"]), {"accuracy": 0.5, "accuracy_all": 0.5, "clear_fraction": 1.0}))
    with pytest.raises(EvaluationError, match="0.500 held-out accuracy"):
        J.load_or_train_judge(OmegaConf.create(EASY))


def test_auto_feature_network_is_the_judge_on_shapes_only():
    assert default_feature_network(OmegaConf.create(EASY)) == "shapes_judge"
    assert default_feature_network(OmegaConf.create({**EASY, "target": "segmentation"})) == "inception"
    assert default_feature_network(OmegaConf.create({"name": "cifar10"})) == "inception"
    with pytest.raises(EvaluationError, match="needs data=shapes"):
        build_feature_network("shapes_judge", data_cfg=OmegaConf.create({"name": "cifar10", "resolution": 32}))
    assert metric_key("class_accuracy", "judge") == "judge/class_accuracy"
    assert metric_key("fid", "judge") == "judge/fid"


class _Fixed:
    """A stand-in judge whose 'features' are the class ids themselves."""

    num_logits = 6

    def classify(self, feats):
        return feats[:, 0].long()


def test_class_accuracy_and_frequency_ratios(tmp_path):
    n, k = 60, 6
    labels = torch.arange(n) % k  # what generate_uint8 requests, class-balanced
    pred = labels.clone()
    pred[labels == 2] = 3  # class 2 is always drawn as class 3
    real = torch.arange(120)[:, None] % k
    out, plot = judge_classes(_Fixed(), real.float(), pred[:, None].float(), k, n, tmp_path)
    assert out["class_accuracy"] == pytest.approx(5 / 6)
    assert out["class_accuracy_2"] == 0.0 and out["class_accuracy_3"] == 1.0
    assert out["class_freq_min_ratio"] == 0.0 and out["class_freq_max_ratio"] == pytest.approx(2.0)
    assert plot.is_file()
    unconditional, _ = judge_classes(_Fixed(), real.float(), real[:60].float(), None, 60, tmp_path)
    assert "class_accuracy" not in unconditional and unconditional["class_freq_max_ratio"] == pytest.approx(1.0)


def test_reconstruction_class_agreement_compares_each_reconstruction_with_its_original():
    real = (torch.arange(40) % 6)[:, None].float()
    rec = real.clone()
    rec[:10] = (rec[:10] + 1) % 6  # the first 10 reconstructions lost their class
    assert rec_class_agreement(_Fixed(), real, rec) == pytest.approx(0.75)
    assert rec_class_agreement(_Fixed(), real, real.flip(0)) < 1.0  # pairs, not histograms
    assert metric_key("rec_class_agreement", "judge") == "judge/rec_class_agreement"
