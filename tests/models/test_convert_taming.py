"""Taming Net2NetTransformer checkpoints: convert, then compare logits with an independent
re-implementation of taming's minGPT forward (explicit masked softmax attention)."""

import math

import pytest
import torch
import torch.nn.functional as F

from vqtransformer.models.convert_taming import convert_net2net, convert_transformer, gpt_config
from vqtransformer.models.gpt import GPT

N_LAYER, N_HEAD, N_EMBD, BLOCK = 2, 4, 32, 12


def taming_state(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    sd = {"transformer.tok_emb.weight": r(vocab, N_EMBD), "transformer.pos_emb": r(1, BLOCK, N_EMBD),
          "transformer.ln_f.weight": 1 + r(N_EMBD), "transformer.ln_f.bias": r(N_EMBD),
          "transformer.head.weight": r(vocab, N_EMBD)}
    for i in range(N_LAYER):
        p = f"transformer.blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + r(N_EMBD), r(N_EMBD)
        for lin in ("key", "query", "value", "proj"):
            sd[p + f"attn.{lin}.weight"], sd[p + f"attn.{lin}.bias"] = r(N_EMBD, N_EMBD), r(N_EMBD)
        sd[p + "attn.mask"] = torch.tril(torch.ones(BLOCK, BLOCK)).view(1, 1, BLOCK, BLOCK)
        sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"] = r(4 * N_EMBD, N_EMBD), r(4 * N_EMBD)
        sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"] = r(N_EMBD, 4 * N_EMBD), r(N_EMBD)
    return sd


def taming_logits(sd: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """taming.modules.transformer.mingpt.GPT.forward, written out."""
    W = lambda k: sd["transformer." + k]  # noqa: E731
    B, T = idx.shape
    x = W("tok_emb.weight")[idx] + W("pos_emb")[:, :T]
    mask = torch.tril(torch.ones(T, T))
    for i in range(N_LAYER):
        p = f"blocks.{i}."
        lin = lambda h, n, p=p: h @ W(p + n + ".weight").T + W(p + n + ".bias")  # noqa: E731
        h = F.layer_norm(x, (N_EMBD,), W(p + "ln1.weight"), W(p + "ln1.bias"))
        heads = lambda t: t.view(B, T, N_HEAD, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(lin(h, "attn.query")), heads(lin(h, "attn.key")), heads(lin(h, "attn.value"))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
        att = att.masked_fill(mask == 0, float("-inf")).softmax(-1)
        x = x + lin((att @ v).transpose(1, 2).reshape(B, T, N_EMBD), "attn.proj")
        h = F.layer_norm(x, (N_EMBD,), W(p + "ln2.weight"), W(p + "ln2.bias"))
        x = x + lin(F.gelu(lin(h, "mlp.0")), "mlp.2")
    return F.layer_norm(x, (N_EMBD,), W("ln_f.weight"), W("ln_f.bias")) @ W("head.weight").T


def load(gpt_sd, n_embed):
    gpt = GPT(**gpt_config(gpt_sd, N_HEAD, n_embed)).eval()
    gpt.load_state_dict(gpt_sd)
    return gpt


@pytest.mark.parametrize("conditioning,cond_vocab", [("none", None), ("class", 5), ("segmentation", 20)])
def test_converted_logits_match_taming(conditioning, cond_vocab):
    n_embed, vocab = 16, 24  # taming's shared table is larger than the image codebook
    sd = taming_state(vocab)
    gpt_sd = convert_transformer(sd, n_embed, conditioning, cond_vocab, sos_token=3)
    gpt = load(gpt_sd, n_embed)
    assert gpt.block_size == BLOCK and gpt.n_layer == N_LAYER and gpt.head.out_features == n_embed
    Lc = 1 if conditioning in ("none", "class") else 4
    c_local = torch.randint(0, 1 if conditioning == "none" else cond_vocab, (3, Lc))
    c_taming = torch.full_like(c_local, 3) if conditioning == "none" else c_local  # taming ids share the table
    z = torch.randint(0, n_embed, (3, BLOCK - Lc))
    ours = gpt(gpt.sequence(c_local, z))
    ref = taming_logits(sd, torch.cat((c_taming, z), 1))[..., :n_embed]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    if conditioning == "class":  # a null token was appended for guidance
        assert gpt.cond_vocab_size == cond_vocab + 1


def test_convert_whole_checkpoint_splits_first_stage():
    sd = taming_state(16)
    sd["first_stage_model.quantize.embedding.weight"] = torch.randn(16, 4)
    sd["first_stage_model.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3)
    sd["first_stage_model.loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    out = convert_net2net({"state_dict": sd}, n_head=N_HEAD)
    assert out["config"]["vocab_size"] == 16 and out["config"]["cond_vocab_size"] == 1
    assert set(out["first_stage"]) == {"quantize.embedding.weight", "encoder.conv_in.weight"}
    assert out["cond_stage"] is None
    load(out["transformer"], 16)


def test_bad_checkpoints():
    with pytest.raises(KeyError, match="Net2NetTransformer"):
        convert_transformer({"model.weight": torch.zeros(1)}, 16)
    with pytest.raises(ValueError, match="codebook"):
        convert_transformer(taming_state(8), 16)
    with pytest.raises(ValueError, match="cond_vocab_size"):
        convert_transformer(taming_state(16), 16, "class", None)


def test_transformer_pretrained_key_loads_a_taming_checkpoint_into_the_stage(tmp_path):
    """transformer.pretrained=PATH: the stage's GPT reproduces taming's logits (unconditional, sos row 0)."""
    from tests.conftest import compose
    from vqtransformer.models.vqgan import VQModel
    from vqtransformer.stages.transformer import TransformerStage

    n_embed = 16
    first = VQModel(dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], in_channels=3, out_ch=3,
                         resolution=8, z_channels=32), n_embed, 4)
    sd = taming_state(n_embed + 1)
    torch.save({"state_dict": sd}, tmp_path / "net2net.ckpt")
    cfg = compose(["stage=transformer", "first_stage.ckpt=unused", "data.resolution=8",
                   f"transformer.n_layer={N_LAYER}", f"transformer.n_head={N_HEAD}", f"transformer.n_embd={N_EMBD}",
                   f"transformer.block_size={BLOCK}", f"transformer.pretrained={tmp_path / 'net2net.ckpt'}",
                   f"transformer.sos_token={n_embed}"])
    stage = TransformerStage(cfg, first_stage=first)
    idx = torch.randint(0, n_embed, (2, 6))
    taming_idx = torch.cat([torch.full((2, 1), n_embed), idx], 1)  # taming: sos token first, shared table
    expected = taming_logits(sd, taming_idx)[..., :n_embed]
    gpt = stage.gpt.eval()
    got = gpt(torch.cat([torch.full((2, 1), n_embed), idx], 1))
    got = got[0] if isinstance(got, tuple) else got
    assert torch.allclose(got[..., :n_embed], expected, atol=1e-4)
