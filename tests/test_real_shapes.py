"""Full-size configurations, built on the meta device, against the published checkpoint facts."""
import torch

from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT
from qwenimage_pack.core.encoders.text_encoder import QwenTextEncoder, TextEncoderConfig
from qwenimage_pack.core.encoders.vae import VAEConfig, WanVAE


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_mmdit_matches_the_published_checkpoint():
    with torch.device("meta"):
        model = QwenImageMMDiT(MMDiTConfig())
    sd = model.state_dict()
    assert len(sd) == 1933  # 13 top-level + 60 x 32
    assert abs(_count(model) - 20.43e9) < 0.01e9
    assert sd["img_in.weight"].shape == (3072, 64)
    assert sd["txt_in.weight"].shape == (3072, 3584)
    assert sd["transformer_blocks.59.img_mod.1.weight"].shape == (18432, 3072)
    assert sd["transformer_blocks.0.img_mlp.net.2.weight"].shape == (3072, 12288)
    assert sd["transformer_blocks.0.attn.norm_added_k.weight"].shape == (128,)
    assert sd["norm_out.linear.weight"].shape == (6144, 3072)
    assert sd["proj_out.weight"].shape == (64, 3072)


def test_text_encoder_matches_qwen25_vl_7b():
    with torch.device("meta"):
        model = QwenTextEncoder(TextEncoderConfig())
    sd = model.state_dict()
    assert sd["layers.0.self_attn.k_proj.bias"].shape == (512,)  # the 7B's detection key
    assert sd["layers.27.mlp.gate_proj.weight"].shape == (18944, 3584)
    assert sd["embed_tokens.weight"].shape == (152064, 3584)
    assert not any(k.startswith("lm_head") for k in sd)
    assert 7.0e9 < _count(model) < 7.2e9  # the language model without lm_head


def test_vae_matches_wan21():
    with torch.device("meta"):
        model = WanVAE(VAEConfig())
    assert abs(_count(model) - 126.9e6) < 0.1e6
