"""Real-statistics cache and the sweep comparison report."""

import csv

import numpy as np
import torch

from vqtransformer.evaluation import compare, stats_cache


def test_real_stats_are_computed_once_and_keyed(tmp_path, monkeypatch):
    monkeypatch.setenv("VQT_CACHE", str(tmp_path))
    data = {"name": "shapes", "resolution": 32, "val_size": 64, "seed": 0, "batch_size": 16, "num_workers": 2}
    key = stats_cache.stats_key(data, "val", 32, 64, "standin-v1")
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(64, 8, generator=torch.Generator().manual_seed(0))

    f1, hit1 = stats_cache.load_or_compute(key, compute)
    f2, hit2 = stats_cache.load_or_compute(key, compute)
    assert (hit1, hit2) == (False, True) and len(calls) == 1 and torch.equal(f1, f2)
    path = stats_cache.stats_path(key)
    assert path.parent == tmp_path / "fid_stats" and path.name.startswith("shapes-val-32px-standin-v1-")
    with np.load(path) as z:  # pytorch-fid style mu / sigma next to the features
        assert np.allclose(z["mu"], f1.double().mean(0).numpy())
        assert np.allclose(z["sigma"], np.cov(f1.double().numpy(), rowvar=False))
    # loader settings do not change the key; the data, the split and the network do
    assert stats_cache.stats_path(stats_cache.stats_key({**data, "batch_size": 64}, "val", 32, 64, "standin-v1")) == path
    for other in (stats_cache.stats_key({**data, "seed": 1}, "val", 32, 64, "standin-v1"),
                  stats_cache.stats_key(data, "train", 32, 64, "standin-v1"),
                  stats_cache.stats_key(data, "val", 32, 64, "inception-6726825d")):
        assert stats_cache.stats_path(other) != path


def _records():
    recs = []
    for i, (n_embed, lr) in enumerate([(256, 1e-4), (1024, 1e-4), (4096, 1e-4), (1024, 2e-4)]):
        recs.append({"run_id": f"r{i}", "run_name": f"run-{i}",
                     "params": {"codebook.n_embed": str(n_embed), "stage.lr": str(lr), "data.name": "shapes"},
                     "metrics": {"standin/rfid": 10.0 / (i + 1), "psnr": 20.0 + i, "codebook_usage": 90.0 - 10 * i}})
    return recs


def test_comparison_table_lists_varying_params_and_metrics(tmp_path):
    files = compare.write_report(_records(), tmp_path, title="sweep x")
    names = {f.name for f in files}
    assert {"comparison.csv", "comparison.md", "codebook_size.png"} <= names
    assert "transformer_depth.png" not in names  # no such param in these runs
    rows = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    assert len(rows) == 4 and "data.name" not in rows[0]  # constant params are left out
    assert rows[2]["codebook.n_embed"] == "4096" and float(rows[2]["psnr"]) == 22.0
    md = (tmp_path / "comparison.md").read_text()
    assert md.startswith("# sweep x") and "| run-3 |" in md and "standin/rfid" in md


def test_plot_matches_param_suffix_and_labelled_metric(tmp_path):
    recs = _records()
    for r in recs:
        r["params"] = {"stage.codebook.n_embed" if k == "codebook.n_embed" else k: v for k, v in r["params"].items()}
    assert compare.plot_metric_vs(recs, ["codebook.n_embed"], ["rfid"], tmp_path / "p.png") is not None
    assert compare.plot_metric_vs(recs, ["transformer.n_layer"], ["fid"], tmp_path / "q.png") is None


def test_every_scored_metric_says_which_way_is_better():
    """A sweep's table marks each metric lower/higher-is-better; a new metric without a direction would be
    shown without an arrow and left out of the best-run answer."""
    from vqtransformer.evaluation.protocol import FEATURE_METRICS

    undirected = {"is_std", "kid_std", "class_freq_min_ratio", "class_freq_max_ratio"}  # spreads / closest-to-1
    for name in set(FEATURE_METRICS) - undirected:
        assert compare.direction(f"judge/{name}") in ("lower", "higher"), name
    assert compare.direction("judge/rec_class_agreement") == "higher"
