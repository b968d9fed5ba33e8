"""QwenImageMMDiT against diffusers' QwenImageTransformer2DModel on a tiny random config (fp32).

Our model takes unpacked latents; diffusers takes tokens packed by QwenImagePipeline._pack_latents
plus ``img_shapes`` = per sample, the list of (frames, token rows, token cols) of the target and
then each reference image, in sequence order.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import references as refs

diffusers = pytest.importorskip("diffusers")
from diffusers import QwenImageTransformer2DModel  # noqa: E402
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline  # noqa: E402

from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT  # noqa: E402

TINY = refs.TINY_MMDIT
TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _build(zero_cond_t: bool = False):
    torch.manual_seed(0)
    ref = QwenImageTransformer2DModel(**TINY, zero_cond_t=zero_cond_t).eval()
    with torch.no_grad():  # norm weights start at 1: make them matter
        for name, p in ref.named_parameters():
            if name.endswith("norm_q.weight") or "norm_k" in name or "norm_added" in name or name == "txt_norm.weight":
                p.add_(0.2 * torch.randn_like(p))
    ours = QwenImageMMDiT(MMDiTConfig.from_diffusers_config(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def models():
    return _build()


@pytest.fixture(scope="module")
def models_zero_cond():
    return _build(zero_cond_t=True)


def _pack(latent: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latent.shape
    return QwenImagePipeline._pack_latents(latent, b, c, h, w)


def _diffusers(ref, x, sigma, context, mask=None, refs=()):
    b, _, h, w = x.shape
    shapes = [(1, h // 2, w // 2)] + [(1, r.shape[-2] // 2, r.shape[-1] // 2) for r in refs]
    tokens = torch.cat([_pack(x)] + [_pack(r) for r in refs], dim=1)
    with torch.no_grad():
        out = ref(
            hidden_states=tokens,
            encoder_hidden_states=context,
            encoder_hidden_states_mask=mask,
            timestep=sigma,
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0]
    out = out[:, : (h // 2) * (w // 2)]
    return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]


def _ours(ours, *args, **kwargs):
    with torch.no_grad():
        return ours(*args, **kwargs)


def _inputs(b, h, w, text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, h, w, generator=g)
    context = torch.randn(b, text_len, 48, generator=g)
    sigma = torch.rand(b, generator=g) * 0.9 + 0.05
    return x, sigma, context


def test_state_dict_keys_match(models):
    ref, ours = models
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert ours.config == MMDiTConfig(**TINY)


def test_config_from_diffusers_json():
    real = {
        "_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24,
        "num_layers": 60, "out_channels": 16, "patch_size": 2, "zero_cond_t": True,
    }
    cfg = MMDiTConfig.from_diffusers_config(real)
    assert cfg == MMDiTConfig(zero_cond_t=True) and cfg.inner_dim == 3072
    with pytest.raises(ValueError, match="guidance_embeds"):
        MMDiTConfig.from_diffusers_config({**real, "guidance_embeds": True})
    layered = MMDiTConfig.from_diffusers_config({**real, "use_additional_t_cond": True, "use_layer3d_rope": True})
    assert layered.layered and layered.use_additional_t_cond  # Qwen-Image-Layered: tests/test_layered_parity.py
    with pytest.raises(ValueError, match="axes_dims_rope"):
        MMDiTConfig(attention_head_dim=64)


@pytest.mark.parametrize("h,w", [(16, 16), (18, 14), (14, 22)], ids=["even-8x8", "odd-9x7", "odd-7x11"])
def test_single_image(models, h, w):
    ref, ours = models
    x, sigma, context = _inputs(1, h, w)
    expected = _diffusers(ref, x, sigma, context)
    got = _ours(ours, x, sigma, context)
    assert got.shape == x.shape
    assert _rel(got, expected) <= TOL


@pytest.mark.parametrize("same_sigma", [True, False], ids=["shared-sigma", "per-sample-sigma"])
def test_batch_two(models, same_sigma):
    ref, ours = models
    x, sigma, context = _inputs(2, 18, 14, seed=2)
    if same_sigma:
        sigma = sigma[:1].expand(2).clone()
    expected = _diffusers(ref, x, sigma, context)
    got = _ours(ours, x, sigma, context)
    assert _rel(got, expected) <= TOL


def test_odd_latent_is_padded_then_cropped(models):
    ref, ours = models
    x, sigma, context = _inputs(1, 17, 15, seed=3)
    padded = F.pad(x, (0, 1, 0, 1), mode="circular")  # our documented padding (ComfyUI's)
    expected = _diffusers(ref, padded, sigma, context)[:, :, :17, :15]
    got = _ours(ours, x, sigma, context)
    assert got.shape == x.shape
    assert _rel(got, expected) <= TOL


def test_padded_text_with_mask(models):
    ref, ours = models
    x, sigma, context = _inputs(2, 16, 12, text_len=9, seed=4)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 7:] = False  # every sample padded at the end: trimmed
    mask[1, 4:] = False
    context = context.masked_fill(~mask[..., None], 0.0)
    expected = _diffusers(ref, x, sigma, context, mask=mask)
    got = _ours(ours, x, sigma, context, context_mask=mask.float())
    assert _rel(got, expected) <= TOL
    # Each sample alone, unpadded, gives the same result: the mask really hides the padding.
    alone = _ours(ours, x[1:], sigma[1:], context[1:, :4])
    assert _rel(got[1:], alone) <= TOL


def test_reference_latent_frame_index(models):
    ref, ours = models
    x, sigma, context = _inputs(1, 12, 16, seed=5)
    reference = torch.randn(1, 16, 10, 8, generator=torch.Generator().manual_seed(6))
    expected = _diffusers(ref, x, sigma, context, refs=[reference])
    got = _ours(ours, x, sigma, context, ref_latents=[reference])
    assert _rel(got, expected) <= TOL
    assert _rel(got, _ours(ours, x, sigma, context)) > 1e-3  # the reference is not ignored


@pytest.mark.parametrize("batch", [1, 2])
def test_zero_cond_t_with_reference(models_zero_cond, batch):
    ref, ours = models_zero_cond
    x, sigma, context = _inputs(batch, 12, 16, seed=7)
    reference = torch.randn(batch, 16, 10, 14, generator=torch.Generator().manual_seed(8))
    expected = _diffusers(ref, x, sigma, context, refs=[reference])
    got = _ours(ours, x, sigma, context, ref_latents=[reference])
    assert _rel(got, expected) <= TOL


def test_control_hook_sees_every_block(models):
    _, ours = models
    x, sigma, context = _inputs(1, 8, 8, seed=9)
    calls = []

    def control(i, img):
        calls.append((i, tuple(img.shape)))
        return img

    base = _ours(ours, x, sigma, context)
    got = _ours(ours, x, sigma, context, control=control)
    assert calls == [(0, (1, 16, 64)), (1, (1, 16, 64))]
    assert torch.equal(got, base)


def test_wrong_input_shapes_are_refused_by_name(models):
    _, ours = models
    x, sigma, context = _inputs(1, 8, 8)
    with pytest.raises(ValueError, match="x must be"):
        ours(torch.randn(1, 4, 8, 8), sigma, context)
    with pytest.raises(ValueError, match="context must be"):
        ours(x, sigma, torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="context_mask must be"):
        ours(x, sigma, context, context_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="sigma must be"):
        ours(x, torch.rand(3), context)
    with pytest.raises(ValueError, match="reference latent"):
        ours(x, sigma, context, ref_latents=[torch.randn(1, 3, 8, 8)])


def test_attention_backend_falls_back_to_sdpa(caplog):
    from qwenimage_pack.core.layers import attention

    attention.reset()
    try:
        with caplog.at_level("WARNING"):
            used = attention.resolve("sage")
        if used == "sdpa":  # sageattention not installed here
            assert "not available" in caplog.text
        with pytest.raises(ValueError, match="unknown attention backend"):
            attention.resolve("xformers")
    finally:
        attention.reset()
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
    for backend in attention.BACKENDS:  # CPU float32: every backend is SDPA
        assert torch.allclose(attention.attention(q, k, v, backend=backend), expected, atol=1e-6)
