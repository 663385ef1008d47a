"""The text-to-image rows of the VQ-Diffusion bench: the encoder's cost per caption next to the denoiser's."""

from __future__ import annotations

import torch

from vqtransformer.bench.vqdiffusion import text_rows


def test_text_rows_report_each_encoder_per_caption_beside_the_text_denoiser_per_step():
    rows = text_rows(torch.device("cpu"), 1, 2, 32, True, {"bench": "vqdiffusion"})
    encoders = [r for r in rows if r["name"] == "text_encoder_forward"]
    (denoiser,) = [r for r in rows if r["name"] == "denoiser_forward_text"]
    assert {r["encoder"] for r in encoders} == {"learned 2x4", "clip ViT-B/32 text (random weights)"}
    assert denoiser["ms_per_image_25_steps"] == 25 * denoiser["ms_per_image_step"] > 0
    for r in encoders:
        share = r["ms_per_caption"] / (r["ms_per_caption"] + denoiser["ms_per_image_25_steps"])
        assert r["ms_per_caption"] > 0 and r["share_of_25_step_sample"] == share and 0 < share < 1
