"""GPT prior: causality, cached == full forward, vocabulary ranges, optimiser groups, bad inputs."""

import pytest
import torch
import torch.nn as nn

from vqtransformer.models.gpt import GPT


def small_gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    args = dict(vocab_size=32, block_size=24, cond_vocab_size=5, n_layer=2, n_head=2, n_embd=32)
    args.update(kw)
    gpt = GPT(**args).eval()
    with torch.no_grad():  # taming initialises pos_emb at zero; make positions matter
        gpt.pos_emb.normal_(0, 0.5)
    return gpt


def test_causal_masking_later_tokens_never_change_earlier_logits():
    gpt = small_gpt()
    c = torch.randint(0, 5, (3, 4))
    z = torch.randint(0, 32, (3, 16))
    x = gpt.sequence(c, z)
    ref = gpt(x)
    for t in (0, 5, 12, x.shape[1] - 1):
        y = x.clone()
        y[:, t:] = torch.randint(0, 32, y[:, t:].shape)
        out = gpt(y)
        torch.testing.assert_close(out[:, :t], ref[:, :t], rtol=0, atol=0)
        if t < x.shape[1] - 1:  # and the change is visible afterwards
            assert not torch.allclose(out[:, t:], ref[:, t:])


def test_cached_forward_matches_full_forward():
    gpt = small_gpt()
    x = gpt.sequence(torch.randint(0, 5, (2, 3)), torch.randint(0, 32, (2, 12)))
    full = gpt(x)
    cache = gpt.new_cache(2, x.shape[1])
    parts = [gpt(x[:, :5], cache)] + [gpt(x[:, t:t + 1], cache) for t in range(5, x.shape[1])]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == x.shape[1]
    cache.reset()
    torch.testing.assert_close(gpt(x[:, :7], cache, last_only=True), full[:, 6], rtol=1e-5, atol=1e-5)


def test_condition_tokens_have_their_own_vocabulary_range():
    gpt = small_gpt()
    assert gpt.tok_emb.num_embeddings == 32 + 5 and gpt.head.out_features == 32
    x = gpt.sequence(torch.tensor([[0, 4]]), torch.tensor([[0, 31]]))
    assert x.tolist() == [[32, 36, 0, 31]]
    # condition id 0 and image code 0 are different tokens
    assert not torch.equal(gpt(gpt.sequence(torch.tensor([[0]]))), gpt(torch.tensor([[0]])))


def test_optimizer_groups_decay_linear_weights_only():
    gpt = small_gpt()
    decay, no_decay = gpt.optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in decay["params"]}
    assert ids == {id(m.weight) for m in gpt.modules() if isinstance(m, nn.Linear)}
    others = {id(p) for p in no_decay["params"]}
    assert id(gpt.pos_emb) in others and id(gpt.tok_emb.weight) in others and id(gpt.ln_f.weight) in others
    assert len(ids | others) == len(list(gpt.parameters())) and not ids & others


def test_sequence_longer_than_block_size_is_refused():
    gpt = small_gpt()
    with pytest.raises(ValueError, match="block_size"):
        gpt(torch.zeros(1, 25, dtype=torch.long))
    cache = gpt.new_cache(1, 30)
    gpt(torch.zeros(1, 24, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="block_size"):
        gpt(torch.zeros(1, 1, dtype=torch.long), cache)
