import pytest
import torch

from vqtransformer.models.vqgan import VQModel
from vqtransformer.modules.autoencoder import Decoder, Encoder


def ddconfig(ch_mult, attn, resolution):
    return dict(ch=32, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn, in_channels=3, out_ch=3,
                resolution=resolution, z_channels=32, dropout=0.0)


@pytest.mark.parametrize("ch_mult,attn,f", [([1, 2, 2], [], 4), ([1, 1, 2, 2], [8], 8), ([1, 1, 2, 2, 4], [4], 16)])
def test_encoder_decoder_shapes_for_f4_f8_f16(ch_mult, attn, f):
    res = 64
    enc, dec = Encoder(**ddconfig(ch_mult, attn, res)), Decoder(**ddconfig(ch_mult, attn, res))
    x = torch.randn(2, 3, res, res)
    z = enc(x)
    assert z.shape == (2, 32, res // f, res // f)
    assert dec(z).shape == x.shape
    assert sum(len(d.attn) for d in enc.down) == (1 if attn else 0)


def test_vqmodel_indices_round_trip_and_channels_last():
    m = VQModel(ddconfig([1, 2], [], 16), n_embed=16, embed_dim=8).eval()
    x = torch.randn(2, 3, 16, 16)
    idx = m.encode_to_indices(x)
    assert idx.shape == (2, 8, 8) and idx.dtype == torch.long
    assert torch.allclose(m.decode_indices(idx), m(x)[0], atol=1e-5)
    m_cl = m.to(memory_format=torch.channels_last)
    assert torch.allclose(m_cl(x.contiguous(memory_format=torch.channels_last))[0], m(x)[0], atol=1e-4)


def test_impossible_geometry_is_refused_with_the_sizes():
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        Encoder(**ddconfig([1, 2, 2], [], 30))
    with pytest.raises(ValueError, match=r"attn_resolutions \[5\] never occur"):
        Encoder(**ddconfig([1, 2, 2], [5], 32))
