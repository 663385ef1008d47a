"""VQ-Diffusion speed: token sampling images/s and the denoiser's achieved matmul throughput.

Grid 16x16, K = 1024 codes (a 256 px image through an f16 VQGAN). The reference denoiser
is 12 layers x 8 heads x 512 wide; ``quick`` uses 2 x 4 x 128. Text-to-image rows: the text encoder's
cost per caption (``learned``, and CLIP ViT-B/32's text tower with random weights: no download) next to
the text-conditional denoiser's cost per image and step (77 caption tokens cross-attended), and the
encoder's share of a 25-step sample (the encoder runs once per caption, not per step). Sampling is timed for
the token part only (no first-stage decoding), standard sampler without truncation: the
weights are untrained, and their flat predictions would make truncation a full sort per
step (a trained model's peaked ones need only a top-64).
"""

from __future__ import annotations

import time
from functools import partial

import torch

from vqtransformer.models.vqdiffusion import VQDiffusionTransformer
from vqtransformer.modules.diffusion import MaskAndReplace
from vqtransformer.sampling.diffusion import sample_tokens

GRID, K = (16, 16), 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, device: torch.device, reps: int, warmup: bool = True) -> float:
    """Best of ``reps`` timings of ``fn()``, after one warm-up call if ``warmup``."""
    if warmup:
        fn()
        _sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 3) -> float:
    """GFLOP/s of ``torch.mm`` on two n x n fp32 matrices (2 n^3 FLOPs)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / _seconds(lambda: torch.mm(a, b), device, reps) / 1e9


@torch.no_grad()
def run(quick: bool = False) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_layer, n_head, n_embd = (2, 4, 128) if quick else (12, 8, 512)
    torch.manual_seed(0)
    model = VQDiffusionTransformer(K, GRID, n_layer, n_head, n_embd).to(device).eval()
    diffusion = MaskAndReplace(K, 100, 0.9, 0.1).to(device)
    common = {"bench": "vqdiffusion", "device": str(device), "model": f"{n_layer}x{n_head}x{n_embd}",
              "grid": f"{GRID[0]}x{GRID[1]}", "codes": K}
    rows = []
    for batch in (1, 16):
        gen = torch.Generator(device).manual_seed(0)
        sample_tokens(model, diffusion, batch, steps=2, generator=gen)  # warm-up
        for steps in (100, 50, 25):
            sample = partial(sample_tokens, model, diffusion, batch, steps=steps, generator=gen)
            sec = _seconds(sample, device, reps=1 if quick else 2, warmup=False)
            rows.append({**common, "name": "sample", "steps": steps, "batch": batch, "images_per_s": batch / sec})
    peak = matmul_gflops(device, reps=2 if quick else 5)
    rows.append({**common, "name": "matmul_2048_fp32", "gflops": peak})
    x_t = torch.randint(0, K + 1, (16, GRID[0] * GRID[1]), device=device)
    t = torch.randint(1, 101, (16,), device=device)
    sec = _seconds(lambda: model(x_t, t), device, reps=2 if quick else 5)
    achieved = model.flops_per_forward(16) / sec / 1e9
    rows.append({**common, "name": "denoiser_forward", "batch": 16, "gflops": achieved, "fraction_of_matmul": achieved / peak})
    rows += text_rows(device, n_layer, n_head, n_embd, quick, common)
    return rows


def text_rows(device: torch.device, n_layer: int, n_head: int, n_embd: int, quick: bool, common: dict) -> list[dict]:
    """ms per caption of each text encoder, ms per image and step of the text denoiser, the encoder's share."""
    from vqtransformer.modules.text import LearnedTextEncoder, WordTokenizer

    B, L, reps = 16, 77, 2 if quick else 5
    encoders = {"learned 2x4": LearnedTextEncoder(WordTokenizer([f"w{i}" for i in range(500)], L), 512, 2, 4,
                                                  n_embd).to(device).eval()}
    try:
        from transformers import CLIPTextConfig, CLIPTextModel

        clip = CLIPTextModel(CLIPTextConfig()).to(device).eval()  # the defaults are ViT-B/32's text tower
        encoders["clip ViT-B/32 text (random weights)"] = lambda ids: clip(input_ids=ids).last_hidden_state
    except ImportError:
        pass
    ids = torch.randint(3, 500, (B, L), device=device)
    enc_ms = {name: _seconds(lambda e=enc: e(ids), device, reps) / B * 1e3 for name, enc in encoders.items()}
    text = encoders["learned 2x4"]
    model = VQDiffusionTransformer(K, GRID, n_layer, n_head, n_embd, text_encoder=text).to(device).eval()
    x_t = torch.randint(0, K + 1, (B, GRID[0] * GRID[1]), device=device)
    t = torch.randint(1, 101, (B,), device=device)
    model(x_t, t, ids)  # the caption encoding is cached outside training, as in sampling
    step_ms = _seconds(lambda: model(x_t, t, ids), device, reps) / B * 1e3
    rows = [{**common, "name": "text_encoder_forward", "encoder": name, "batch": B, "tokens": L,
             "ms_per_caption": ms, "share_of_25_step_sample": ms / (ms + 25 * step_ms)} for name, ms in enc_ms.items()]
    rows.append({**common, "name": "denoiser_forward_text", "batch": B, "caption_tokens": L,
                 "ms_per_image_step": step_ms, "ms_per_image_25_steps": 25 * step_ms})
    return rows


if __name__ == "__main__":
    import sys

    for row in run(quick="--quick" in sys.argv):
        print(row)
