"""One name and one unit per metric: what validation logs (val/...) and what evaluate.py logs (eval/...)
for the same model and images agree, so that val/l1 and eval/l1 (both on [0, 1]), val/psnr and
eval/psnr, val/codebook_usage and eval/codebook_usage (both fractions) can be read side by side."""

import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import TINY, compose

SHARED = ("l1", "psnr", "codebook_usage", "perplexity")


@pytest.mark.parametrize("codebook", ["k256", "fsq_1k"])
def test_val_and_eval_metrics_have_the_same_names_and_units(codebook, one_thread):
    from vqtransformer.data.shapes import ShapesDataset
    from vqtransformer.evaluation import reconstruction
    from vqtransformer.stages.vqgan import VQGANStage

    torch.manual_seed(0)
    overrides = [o for o in TINY if not (codebook != "k256" and o.startswith("codebook.n_embed"))]
    overrides += ["codebook.levels=[4,4,4]", "codebook.n_embed=64"] if codebook == "fsq_1k" else []
    stage = VQGANStage(compose(["stage=vqgan", f"codebook={codebook}", *overrides]))
    stage.train(False)
    ds = ShapesDataset("validation", 16, 16)
    batch = next(iter(DataLoader(ds, batch_size=16)))
    with torch.no_grad():
        val = stage.validate(batch)
        val.update(stage.validation_end())
    ev, counts, _ = reconstruction.reconstruct(stage.vqgan, DataLoader(ds, batch_size=16), torch.device("cpu"),
                                               ["psnr", "l1"])
    ev.update(reconstruction.codebook_stats(counts))
    for name in SHARED:
        assert f"val/{name}" in val and name in ev, name  # the same name after the val/ or eval/ prefix
    # the same unit: eval quantises to uint8 first (the protocol), so they differ by rounding only
    assert val["val/l1"] == pytest.approx(ev["l1"], abs=2 / 255)
    assert val["val/psnr"] == pytest.approx(ev["psnr"], abs=0.3)
    assert val["val/codebook_usage"] == pytest.approx(ev["codebook_usage"], abs=1e-9) and ev["codebook_usage"] <= 1
    assert val["val/perplexity"] == pytest.approx(ev["perplexity"], rel=1e-5)


def test_standin_numbers_carry_the_network_name():
    from omegaconf import OmegaConf

    from vqtransformer.evaluation import standin_choice
    from vqtransformer.evaluation.protocol import metric_key

    ev = OmegaConf.create({"feature_network": "auto", "lpips_net": "alex", "standin": True})
    assert standin_choice(ev, OmegaConf.create({"name": "cifar10"})) == ("standin", "standin")
    assert standin_choice(ev, OmegaConf.create({"name": "shapes"})) == ("shapes_judge", "standin")  # the judge stays
    ev.standin = False
    assert standin_choice(ev, OmegaConf.create({"name": "cifar10"})) == ("auto", "alex")
    assert metric_key("rfid", "standin") == "standin/rfid" and metric_key("psnr", "standin") == "psnr"
