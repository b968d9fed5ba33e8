"""float16 compute stays finite and close to float32 where activations leave the fp16 range.

Qwen-Image's residual stream reaches ~1e7 (FACTS 7: fp16 gives black images). The tiny model
here gets weights scaled so that its residual stream and its attention / MLP outputs exceed
65504; diffusers in float16 (which clips the residual stream) is visibly wrong on it, ours
must match diffusers in float32.
"""
from __future__ import annotations

import pytest
import torch

import references as refs

pytest.importorskip("diffusers")
from diffusers import QwenImageTransformer2DModel  # noqa: E402
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline  # noqa: E402

from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT  # noqa: E402

TINY = refs.TINY_MMDIT


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _big_activation_model():
    torch.manual_seed(0)
    ref = QwenImageTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.startswith(("img_in", "txt_in")):
                p.mul_(1e5)  # residual streams start past 65504
            elif name.endswith(("to_out.0.weight", "to_add_out.weight", "net.2.weight")):
                p.mul_(1e5)  # block outputs themselves overflow fp16
            elif "_mod." in name:
                p.mul_(20)  # modulated inputs of the projections reach the hundreds
    return ref


def _diffusers(ref, x, sigma, context):
    b, c, h, w = x.shape
    tokens = QwenImagePipeline._pack_latents(x, b, c, h, w)
    with torch.no_grad():
        out = ref(
            hidden_states=tokens,
            encoder_hidden_states=context,
            timestep=sigma,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
    return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]


def test_fp16_stays_finite_and_close_to_fp32():
    ref = _big_activation_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 12, 10, generator=g)
    context = torch.randn(2, 6, 48, generator=g)
    # Exact in fp16: the model rounds sigma to its compute dtype, as diffusers does.
    sigma = torch.tensor([0.75, 0.3125])

    expected = _diffusers(ref, x, sigma, context)
    # Make sure the weights really push past fp16: the stream must exceed its range.
    with torch.no_grad():
        assert float(ref.img_in(QwenImagePipeline._pack_latents(x, 2, 16, 12, 10)).abs().max()) > 65504

    ours = QwenImageMMDiT(MMDiTConfig(**TINY))
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours = ours.half()
    assert ours.compute_dtype == torch.float16
    with torch.no_grad():
        got = ours(x.half(), sigma, context.half())

    assert got.dtype == torch.float16
    assert torch.isfinite(got).all()
    err = _rel(got, expected)
    assert err < 1e-2, err

    # Without care (diffusers' clip-only fp16), this model goes wrong: the test has teeth.
    try:
        naive = _diffusers(ref.half(), x.half(), sigma.half(), context.half())
    except RuntimeError as e:  # some fp16 CPU kernels may be missing on old torch builds
        pytest.skip(f"diffusers fp16 on CPU unavailable: {e}")
    assert not torch.isfinite(naive).all() or _rel(naive, expected) > 10 * err


def test_fp16_compute_with_fp32_weights_matches():
    """compute_dtype can be set independently of the stored weights."""
    ref = _big_activation_model()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 8, 8, generator=g)
    context = torch.randn(1, 5, 48, generator=g)
    sigma = torch.tensor([0.5625])
    expected = _diffusers(ref, x, sigma, context)

    ours = QwenImageMMDiT(MMDiTConfig(**TINY))
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.compute_dtype = torch.float16
    with torch.no_grad():
        got = ours(x, sigma, context)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert _rel(got, expected) < 1e-2

    # The fp32 residual stream alone is not enough here: the projections' own outputs overflow
    # unless their inputs are down-scaled.
    for block in ours.transformer_blocks:
        block.fp16_scales = (1.0, 1.0)
    with torch.no_grad():
        assert not torch.isfinite(ours(x, sigma, context)).all()
