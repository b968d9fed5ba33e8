"""WanVAE against diffusers' AutoencoderKLQwenImage on tiny random configs (fp32, rel. err <= 1e-5),
plus the key layouts: diffusers names convert to ours, ours are the original Wan names."""
from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderKLQwenImage
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from qwenimage_pack.core.encoders.vae import VAEConfig, WanVAE
from qwenimage_pack.core.errors import WeightFileError
from qwenimage_pack.core.keymaps.vae import (
    vae_config,
    convert_vae_keys,
    is_vae_keys,
    vae_key,
    vae_key_layout,
)

# 4 also runs, but norms over 4 channels make the random decoder ill-conditioned (fp32 round-off
# alone reaches ~5e-6 there); 8 keeps the comparison well inside 1e-5.
BASE_DIM = 8


def _reference(num_res_blocks: int) -> AutoencoderKLQwenImage:
    torch.manual_seed(num_res_blocks)
    ref = AutoencoderKLQwenImage(
        base_dim=BASE_DIM,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=num_res_blocks,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    ).eval()
    with torch.no_grad():
        # Non-trivial gammas so a swapped norm name could not go unnoticed.
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return ref


@functools.lru_cache(maxsize=None)
def _pair(num_res_blocks: int) -> tuple[AutoencoderKLQwenImage, WanVAE]:
    ref = _reference(num_res_blocks)
    ours = WanVAE(VAEConfig.from_diffusers_config(dict(ref.config))).eval()
    ours.load_state_dict(convert_vae_keys(ref.state_dict()), strict=True)
    return ref, ours


@pytest.fixture(params=[1, 2], ids=["res1", "res2"])
def pair(request):
    return _pair(request.param)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_config_inferred_from_both_layouts(pair):
    ref, ours = pair
    want = ours.config
    assert want.num_res_blocks == ref.config.num_res_blocks and want.base_dim == BASE_DIM
    for sd in (ref.state_dict(), ours.state_dict()):
        assert vae_config({k: v.shape for k, v in sd.items()}) == want
    defaults = {
        k: p.default for k, p in inspect.signature(AutoencoderKLQwenImage.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert VAEConfig() == VAEConfig.from_diffusers_config(defaults)


def test_wan_names_round_trip(pair):
    ref, ours = pair
    sd = ours.state_dict()
    assert convert_vae_keys(sd) == sd  # Wan names pass through unchanged
    again = WanVAE(ours.config)
    again.load_state_dict(sd, strict=True)
    z = torch.randn(1, 16, 3, 4)
    torch.testing.assert_close(again.decode(z), ours.decode(z), rtol=0, atol=0)


def test_names_are_the_original_wan_layout():
    # diffusers' own converter from original Wan checkpoints (written for 2 res blocks) must turn
    # our names back into exactly the diffusers model's names and shapes.
    ref = _reference(2)
    ours = WanVAE(VAEConfig(base_dim=BASE_DIM)).eval()
    converted = convert_wan_vae_to_diffusers(dict(ours.state_dict()))
    ref_sd = ref.state_dict()
    assert sorted(converted) == sorted(ref_sd)
    assert all(converted[k].shape == ref_sd[k].shape for k in ref_sd)
    assert vae_key("decoder.up_blocks.1.resnets.0.conv_shortcut.weight") == "decoder.upsamples.4.shortcut.weight"
    assert vae_key("decoder.up_blocks.2.upsamplers.0.resample.1.bias") == "decoder.upsamples.11.resample.1.bias"
    assert vae_key("encoder.mid_block.attentions.0.to_qkv.weight") == "encoder.middle.1.to_qkv.weight"


@pytest.mark.parametrize("size", [(64, 48), (40, 56)])
def test_encode_matches_diffusers(pair, size):
    ref, ours = pair
    torch.manual_seed(1)
    x = torch.rand(2, 3, *size) * 2 - 1
    with torch.no_grad():
        want = ref.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]
    got = ours.encode(x)
    assert got.shape == (2, 16, size[0] // 8, size[1] // 8)
    assert _rel(got, want) <= 1e-5
    assert _rel(ours.encode(x[:, :, None]), want) <= 1e-5


@pytest.mark.parametrize("size", [(8, 6), (5, 7)])
def test_decode_matches_diffusers(pair, size):
    ref, ours = pair
    torch.manual_seed(2)
    z = torch.randn(2, 16, *size)
    with torch.no_grad():
        want = ref.decode(z[:, :, None]).sample[:, :, 0]
    got = ours.decode(z)
    assert got.shape == (2, 3, size[0] * 8, size[1] * 8)
    assert _rel(got, want) <= 1e-5
    assert _rel(ours.decode(z[:, :, None]), want) <= 1e-5


def test_encode_pads_by_replication_and_crops(pair):
    ref, ours = pair
    torch.manual_seed(3)
    x = torch.rand(2, 3, 45, 61) * 2 - 1
    padded = F.pad(x, (0, 3, 0, 3), mode="replicate")
    with torch.no_grad():
        want = ref.encode(padded[:, :, None]).latent_dist.mode()[:, :, 0, :5, :7]
    got = ours.encode(x)
    assert got.shape == (2, 16, 5, 7)
    assert _rel(got, want) <= 1e-5


def test_half_precision_as_close_as_diffusers_and_finite():
    ref, ours = _pair(2)
    torch.manual_seed(4)
    x, z = torch.rand(1, 3, 32, 40) * 2 - 1, torch.randn(1, 16, 4, 5)
    with torch.no_grad():
        e32 = ref.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]
        d32 = ref.decode(z[:, :, None]).sample[:, :, 0]
    ref_half, m = copy.deepcopy(ref), copy.deepcopy(ours)
    for dtype in (torch.bfloat16, torch.float16):
        ref_half.to(dtype)
        m.to(dtype)
        with torch.no_grad():
            e_ref = ref_half.encode(x[:, :, None].to(dtype)).latent_dist.mode()[:, :, 0]
            d_ref = ref_half.decode(z[:, :, None].to(dtype)).sample[:, :, 0]
        e, d = m.encode(x), m.decode(z)
        assert e.dtype == d.dtype == dtype
        # Half-precision round-off of a random net is large; it must not be worse than diffusers' own.
        assert _rel(e, e32) <= 1.5 * _rel(e_ref, e32) + 1e-3
        assert _rel(d, d32) <= 1.5 * _rel(d_ref, d32) + 1e-3
    # fp16 activations far beyond 65504 are clamped, not turned into inf / NaN.
    assert torch.isfinite(m.decode(z * 1e4)).all() and torch.isfinite(m.encode(x * 1e4)).all()


def test_key_detection(pair):
    ref, ours = pair
    assert vae_key_layout(ref.state_dict()) == "diffusers"
    assert vae_key_layout(ours.state_dict()) == "wan"
    assert is_vae_keys(ref.state_dict()) and is_vae_keys(ours.state_dict())
    sd_vae = AutoencoderKL(block_out_channels=(4,), norm_num_groups=2, latent_channels=4)
    assert not is_vae_keys(sd_vae.state_dict())
    assert not is_vae_keys(["txt_norm.weight", "img_in.weight", "transformer_blocks.0.attn.to_q.weight"])


def test_a_non_vae_file_and_wrong_tensor_shapes_are_refused_by_name(pair):
    _, ours = pair
    with pytest.raises(WeightFileError, match="vae.safetensors.*encoder.conv1.weight"):
        vae_config({"txt_norm.weight": (3584,)}, path="vae.safetensors")
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        ours.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="frames"):
        ours.decode(torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="smaller"):
        ours.encode(torch.zeros(1, 3, 4, 16))
    with pytest.raises(ValueError, match="unknown diffusers VAE"):
        vae_key("encoder.mid_block.norm.weight")
    with pytest.raises(ValueError, match="Wan-2.2"):
        VAEConfig.from_diffusers_config({"is_residual": True})
