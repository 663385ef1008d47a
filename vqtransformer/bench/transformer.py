"""GPT prior speed: training tokens/s, and sampling tokens/s with the static KV cache versus the
naive sampler (the whole sequence recomputed per step) on the same model and seed, checking that
both produce the same tokens.

Reference model: 12 layers x 8 heads x 512 wide, vocabulary 1024, fp32, untrained (sampling
speed does not depend on the weights); on the CPU sampled through ``for_cpu_inference`` (fused
query/key/value, weights in per-thread blocks: ``SplitLinear``), as the stage does. Sampling: a start token, then ``seq_len`` codes, batch 1
and 16. Targets at 256 tokens on the project's 2-core CPU: >= 200 tokens/s (batch 1) and
>= 1500 tokens/s (batch 16), of rough bounds 260 (weights streamed from memory once per
token) and 2900 (peak fp32 FLOP/s); rows report the fraction of the bound.

The naive sampler costs O(L^2) token-forwards: where a full run would take minutes it is timed
on the last ``naive_window`` steps only (given the cached sampler's first codes), its slowest
part: there ``speedup_vs_naive`` (cached full-run tokens/s over naive tokens/s) overstates the
full-run speedup, by up to ~2x when the naive cost grows linearly with the length. Rows with
``naive_window`` = ``seq_len`` are full runs of both samplers, and ``same_tokens_as_naive``
compares the tokens of those steps.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from vqtransformer.models.gpt import GPT, SplitLinear, for_cpu_inference
from vqtransformer.sampling.autoregressive import SamplingParams, make_generator, sample_cached, sample_naive

REF = {"vocab_size": 1024, "n_layer": 12, "n_head": 8, "n_embd": 512}
TARGET = {1: 200.0, 16: 1500.0}   # tokens/s at 256 tokens
BOUND = {1: 260.0, 16: 2900.0}
NAIVE_BUDGET = {False: 6e4, True: 4e4}  # token-forwards the naive sampler may cost (a full run: B L^2 / 2)


def _model(block_size: int, device: torch.device) -> GPT:
    torch.manual_seed(0)
    return GPT(block_size=block_size, cond_vocab_size=1, **REF).to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device: torch.device, reps: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_training(device: torch.device, quick: bool) -> dict:
    """Forward + backward + AdamW step on [B, 256] code sequences."""
    T, B, steps = 256, 2 if quick else 8, 2 if quick else 4
    gpt = _model(T, device).train()
    opt = torch.optim.AdamW(gpt.optimizer_groups(0.01), lr=1e-4)
    x = torch.randint(0, REF["vocab_size"], (B, T + 1), device=device)

    def step():
        loss = F.cross_entropy(gpt(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    sec, _ = _best(step, device, steps)
    return {"case": "train", "seq_len": T, "batch": B, "tokens_per_s": B * T / sec}


@torch.inference_mode()
def bench_sampling(device: torch.device, seq_len: int, batch: int, quick: bool) -> list[dict]:
    gpt = for_cpu_inference(_model(seq_len, device), batch)  # what the stage samples with
    c = torch.zeros(batch, 1, dtype=torch.long, device=device)
    params = SamplingParams(top_k=100)
    gen = lambda: make_generator(0, device)  # noqa: E731
    sample_cached(gpt, c, 8, params=params, generator=gen())  # warm-up
    reps = 1 if quick or seq_len * batch > 4096 else 2
    sec, codes = _best(lambda: sample_cached(gpt, c, seq_len, params=params, generator=gen()), device, reps)
    cached = batch * seq_len / sec
    budget = NAIVE_BUDGET[quick]
    window = seq_len if batch * seq_len**2 / 2 <= budget else max(2, min(seq_len, int(budget // (batch * seq_len))))
    prefix = codes[:, :seq_len - window]
    nsec, naive_codes = _best(lambda: sample_naive(gpt, c, window, prefix, params=params, generator=gen()), device, 1)
    cached_codes = codes if window == seq_len else sample_cached(gpt, c, window, prefix, params=params, generator=gen())
    naive = batch * window / nsec
    split = any(isinstance(m, SplitLinear) for m in gpt.modules())
    common = {"bench": "transformer", "device": str(device), "model": "12x8x512", "seq_len": seq_len, "batch": batch,
              "linear": "split-fused-qkv" if split else "aten", "load_1m": os.getloadavg()[0]}  # others' load skews CPU numbers
    row = {**common, "case": "sample_cached", "tokens_per_s": cached, "speedup_vs_naive": cached / naive,
           "same_tokens_as_naive": bool(torch.equal(naive_codes, cached_codes))}
    if seq_len == 256 and batch in TARGET:
        row.update({"target": TARGET[batch], "bound": BOUND[batch], "fraction_of_bound": cached / BOUND[batch],
                    "meets_target": cached >= TARGET[batch]})
    return [row, {**common, "case": "sample_naive", "tokens_per_s": naive, "naive_window": window}]


def run(quick: bool = False) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [{"bench": "transformer", "device": str(device), "model": "12x8x512", **bench_training(device, quick)}]
    cases = [(64, 1), (256, 1), (256, 16)] if quick else [(L, B) for L in (64, 256, 1024) for B in (1, 16)]
    for seq_len, batch in cases:
        rows += bench_sampling(device, seq_len, batch, quick)
    return rows


if __name__ == "__main__":
    import sys

    for r in run(quick="--quick" in sys.argv):
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
