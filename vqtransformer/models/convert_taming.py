"""Convert a taming-transformers ``Net2NetTransformer`` checkpoint to this project's layout.

Taming's checkpoint (Lightning, ``state_dict``) holds ``transformer.*`` (minGPT: ``tok_emb.weight``
[vocab, C], ``pos_emb`` [1, block, C], ``blocks.N.{ln1, ln2, attn.{key, query, value, proj}, mlp.{0, 2}}``,
``ln_f``, ``head.weight`` [vocab, C]), ``first_stage_model.*`` (a VQModel) and, for spatial
conditions, ``cond_stage_model.*``. Transformer weights map one to one, except the vocabulary:
taming shares one table between image codes and condition ids (class y is row y, a
segmentation code k is row k, the start token is row ``sos_token``); ours keeps image codes in
rows ``[0, n_embed)`` and condition tokens after them. So:

* ``tok_emb`` = taming rows ``[0, n_embed)``, then the condition rows (``[sos_token]`` for
  ``none``; ``[0, cond_vocab_size)`` otherwise), then, for ``class``, a null-token row (the
  mean class row: taming models had no label dropout, so classifier-free guidance stays off);
* ``head`` = taming rows ``[0, n_embed)``: the logits of ids that are no image code are dropped
  (taming's sampler could in principle draw them; a trained model gives them ~0 mass).

The attention ``mask`` buffers are dropped (we use SDPA's causal mode). Only the identity
permuter (raster order) is supported. ``n_head`` is not stored in the weights: pass it (taming's
``transformer_config.params.n_head``).

CLI: ``python -m vqtransformer.models.convert_taming last.ckpt out.pt --n-head 16 --conditioning none``.
"""

from __future__ import annotations

import argparse
import re

import torch

_BLOCK = re.compile(r"blocks\.(\d+)\.(ln1|ln2|attn\.key|attn\.query|attn\.value|attn\.proj|mlp\.0|mlp\.2)\.(weight|bias)$")


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def convert_transformer(state: dict[str, torch.Tensor], n_embed: int, conditioning: str = "none",
                        cond_vocab_size: int | None = None, sos_token: int = 0) -> dict[str, torch.Tensor]:
    """Taming ``transformer.*`` weights -> :class:`~vqtransformer.models.gpt.GPT` state dict.

    ``n_embed``: image codebook size; ``cond_vocab_size``: condition codebook size or number of
    classes (ignored for ``none``).
    """
    tr = _prefixed(state, "transformer.")
    for k in ("tok_emb.weight", "pos_emb", "ln_f.weight", "ln_f.bias", "head.weight"):
        if k not in tr:
            raise KeyError(f"not a taming Net2NetTransformer checkpoint: 'transformer.{k}' is missing")
    tok, head = tr["tok_emb.weight"], tr["head.weight"]
    vocab = tok.shape[0]
    if n_embed > vocab:
        raise ValueError(f"first-stage codebook has {n_embed} codes but the transformer vocabulary only {vocab}")
    if conditioning == "none":
        cond_rows = tok[[sos_token]]
    else:
        if not cond_vocab_size or cond_vocab_size > vocab:
            raise ValueError(f"cond_vocab_size={cond_vocab_size} must be in [1, {vocab}] for conditioning={conditioning}")
        cond_rows = tok[:cond_vocab_size]
        if conditioning == "class":  # null token for the (untrained) unconditional case
            cond_rows = torch.cat((cond_rows, cond_rows.mean(0, keepdim=True)))
    out = {"tok_emb.weight": torch.cat((tok[:n_embed], cond_rows)).clone(), "pos_emb": tr["pos_emb"].clone(),
           "ln_f.weight": tr["ln_f.weight"], "ln_f.bias": tr["ln_f.bias"], "head.weight": head[:n_embed].clone()}
    for k, v in tr.items():
        if _BLOCK.match(k):
            out[k] = v
        elif not (k in out or k.endswith("attn.mask") or k in ("tok_emb.weight", "head.weight")):
            raise KeyError(f"unexpected taming transformer weight 'transformer.{k}'")
    return out


def gpt_config(gpt_state: dict[str, torch.Tensor], n_head: int, n_embed: int) -> dict[str, int]:
    """GPT constructor arguments implied by a converted state dict."""
    n_layer = 1 + max((int(m.group(1)) for k in gpt_state if (m := _BLOCK.match(k))), default=-1)
    block_size, n_embd = gpt_state["pos_emb"].shape[1:]
    return {"vocab_size": n_embed, "cond_vocab_size": gpt_state["tok_emb.weight"].shape[0] - n_embed,
            "block_size": block_size, "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd}


def convert_net2net(ckpt: dict, n_head: int, conditioning: str = "none", cond_vocab_size: int | None = None,
                    sos_token: int = 0, n_embed: int | None = None) -> dict:
    """A whole Net2NetTransformer checkpoint -> ``{"transformer", "first_stage", "cond_stage", "config"}``.

    ``n_embed`` defaults to the first stage's codebook rows; ``cond_vocab_size`` to the cond
    stage's codebook rows when there is one.
    """
    state = ckpt.get("state_dict", ckpt)
    first = _prefixed(state, "first_stage_model.")
    cond = _prefixed(state, "cond_stage_model.")
    if n_embed is None:
        if "quantize.embedding.weight" not in first:
            raise KeyError("no 'first_stage_model.quantize.embedding.weight'; pass n_embed")
        n_embed = first["quantize.embedding.weight"].shape[0]
    if cond_vocab_size is None and "quantize.embedding.weight" in cond:
        cond_vocab_size = cond["quantize.embedding.weight"].shape[0]
    gpt = convert_transformer(state, n_embed, conditioning, cond_vocab_size, sos_token)
    first_sd = cond_sd = None
    if first:
        from vqtransformer.models.vqgan import split_taming_state_dict

        first_sd = split_taming_state_dict(first)[0]
        cond_sd = split_taming_state_dict(cond)[0] if any(k.startswith("encoder.") for k in cond) else None
    return {"transformer": gpt, "first_stage": first_sd, "cond_stage": cond_sd,
            "config": {**gpt_config(gpt, n_head, n_embed), "conditioning": conditioning}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--n-head", type=int, required=True, help="taming transformer_config.params.n_head")
    p.add_argument("--conditioning", default="none", choices=["none", "class", "segmentation", "depth", "coord",
                                                                "lowres"])
    p.add_argument("--cond-vocab-size", type=int, default=None, help="classes or condition codebook size")
    p.add_argument("--sos-token", type=int, default=0)
    a = p.parse_args(argv)
    from vqtransformer.training.checkpoint import load

    ckpt = load(a.ckpt)  # weights_only=True
    out = convert_net2net(ckpt, a.n_head, a.conditioning, a.cond_vocab_size, a.sos_token)
    torch.save(out, a.out)
    print(f"wrote {a.out}: {out['config']}")


if __name__ == "__main__":
    main()
