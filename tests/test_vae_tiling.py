"""Tiled VAE encode / decode against the full pass, and the out-of-memory fallback.

Tolerances: a tile sees zero padding at its borders and the mid-block attention only sees its own
tile, so a tiled pass differs from the full one everywhere, by an amount set by the (here random)
weights rather than by our code. So
- the blending itself is checked exactly, with a pixel-local map in place of the network;
- with the real tiny network the error must not exceed diffusers' own tiled pass with the same
  tiles (+10%) nor a loose absolute bound, and there must be no seam: no row / column where the
  tiled image's neighbour differences exceed the full image's by more than 10%; hard stitching
  of the same tiles is shown to fail that check, so the check can see seams.
"""
from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage

import qwenimage_pack.core.encoders.vae as vae_mod
from qwenimage_pack.core.encoders.vae import VAEConfig, WanVAE
from qwenimage_pack.core.keymaps.vae import convert_vae_keys

TILE, OVERLAP = 12, 4  # latent px; 30x38 latents need 4x5 tiles, neither side a multiple of the stride


@functools.lru_cache(maxsize=None)
def _pair() -> tuple[AutoencoderKLQwenImage, WanVAE]:
    torch.manual_seed(0)
    ref = AutoencoderKLQwenImage(base_dim=4, num_res_blocks=1).eval()
    ours = WanVAE(VAEConfig(base_dim=4, num_res_blocks=1)).eval()
    ours.load_state_dict(convert_vae_keys(ref.state_dict()), strict=True)
    return ref, ours


def _diffusers_tiling(ref, tile_px: int, overlap_px: int) -> None:
    stride = tile_px - overlap_px
    ref.enable_tiling(
        tile_sample_min_height=tile_px, tile_sample_min_width=tile_px,
        tile_sample_stride_height=stride, tile_sample_stride_width=stride,
    )


def _seam_ratio(img: torch.Tensor, full: torch.Tensor) -> float:
    """Largest per-column / per-row mean |neighbour difference| of ``img`` relative to ``full``."""
    worst = 0.0
    for dim, keep in ((-1, 3), (-2, 2)):
        def grad(a):
            return a.diff(dim=dim).abs().mean(dim=tuple(i for i in range(4) if i != keep))
        worst = max(worst, (grad(img) / grad(full)).max().item())
    return worst


def _hard_cut_weights(starts, tile, scale):
    """Each output pixel owned by exactly one tile (cut halfway through each overlap): a seam."""
    out = []
    for i, s in enumerate(starts):
        w = torch.zeros(tile * scale)
        lo = 0 if i == 0 else ((starts[i - 1] + tile + s) // 2 - s) * scale
        hi = tile * scale if i == len(starts) - 1 else ((s + tile + starts[i + 1]) // 2 - s) * scale
        w[lo:hi] = 1
        out.append(w)
    return out


def test_blending_is_exact_for_pixel_local_maps(monkeypatch):
    _, m = _pair()

    def fake_decode(z):
        return torch.tanh(F.interpolate(z[:, :3] + 0.5 * z[:, 3:6], scale_factor=8, mode="nearest"))

    def fake_encode(x):
        return F.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16] * torch.linspace(-1, 1, 16).view(1, 16, 1, 1)

    monkeypatch.setattr(m, "_decode_raw", fake_decode)
    monkeypatch.setattr(m, "_encode_mean", fake_encode)
    torch.manual_seed(1)
    for shape, tile, overlap in (((2, 16, 30, 38), 12, 4), ((1, 16, 7, 50), 12, 5), ((1, 16, 9, 11), 64, 16)):
        z = torch.randn(shape)
        calls = []
        got = m.decode_tiled(z, tile=tile, overlap=overlap, progress=lambda i, n: calls.append((i, n)))
        torch.testing.assert_close(got, fake_decode(z), rtol=0, atol=1e-6)
        assert calls[-1][0] == calls[-1][1] == len(calls)
    for shape, tile, overlap in (((1, 3, 245, 300), 96, 32), ((2, 3, 40, 203), 64, 16)):
        x = torch.rand(shape) * 2 - 1
        got = m.encode_tiled(x, tile=tile, overlap=overlap)
        assert got.shape == (shape[0], 16, shape[2] // 8, shape[3] // 8)
        torch.testing.assert_close(got, m.encode(x), rtol=0, atol=1e-6)


def test_tiled_decode_is_close_and_seamless(monkeypatch):
    ref, m = _pair()
    torch.manual_seed(2)
    z = torch.randn(1, 16, 30, 38)
    full = m.decode(z)
    tiled = m.decode_tiled(z, tile=TILE, overlap=OVERLAP)
    _diffusers_tiling(ref, TILE * 8, OVERLAP * 8)
    with torch.no_grad():
        ref_tiled = ref.decode(z[:, :, None]).sample[:, :, 0]
    ref.disable_tiling()

    err, ref_err = (tiled - full).abs(), (ref_tiled - full).abs()
    assert tiled.shape == full.shape == (1, 3, 240, 304)
    assert err.mean() <= 0.03 and err.mean() <= 1.1 * ref_err.mean()  # measured 0.019 vs 0.024
    assert err.max() <= 0.6 and err.max() <= 1.1 * ref_err.max()  # measured 0.35 vs 0.38
    assert _seam_ratio(tiled, full) <= 1.1  # measured 1.03

    monkeypatch.setattr(vae_mod, "_axis_weights", _hard_cut_weights)
    assert _seam_ratio(m.decode_tiled(z, tile=TILE, overlap=OVERLAP), full) >= 1.3  # measured 1.68


def test_tiled_encode_is_close():
    ref, m = _pair()
    torch.manual_seed(3)
    x = torch.rand(1, 3, 245, 300) * 2 - 1  # 31x38 latents after padding, 30x37 kept
    full = m.encode(x)
    tiled = m.encode_tiled(x, tile=96, overlap=32)
    _diffusers_tiling(ref, 96, 32)
    with torch.no_grad():
        padded = F.pad(x, (0, 4, 0, 3), mode="replicate")
        ref_tiled = ref.encode(padded[:, :, None]).latent_dist.mode()[:, :, 0, :30, :37]
    ref.disable_tiling()

    err, ref_err = (tiled - full).abs(), (ref_tiled - full).abs()
    assert tiled.shape == full.shape == (1, 16, 30, 37)
    # measured: mean 0.0127 vs diffusers 0.0157 (latents average 0.125), max 0.082 vs 0.137
    assert err.mean() <= 0.15 * full.abs().mean() and err.mean() <= 1.1 * ref_err.mean()
    assert err.max() <= 1.1 * ref_err.max()


@pytest.mark.parametrize("oom", sorted({torch.OutOfMemoryError, torch.cuda.OutOfMemoryError}, key=str))
def test_out_of_memory_falls_back_to_tiles(monkeypatch, caplog, oom):
    _, m = _pair()
    torch.manual_seed(4)
    z, x = torch.randn(1, 16, 10, 13), torch.rand(1, 3, 80, 104) * 2 - 1
    freed = []
    monkeypatch.setattr(vae_mod, "_free_cache", lambda: freed.append(1))

    def no_memory(*args, **kwargs):
        raise oom("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(m, "decode", no_memory)
    monkeypatch.setattr(m, "encode", no_memory)
    with caplog.at_level(logging.WARNING, logger=vae_mod.__name__):
        torch.testing.assert_close(m.decode_auto(z, tile=8, overlap=2), m.decode_tiled(z, tile=8, overlap=2))
        torch.testing.assert_close(m.encode_auto(x, tile=64, overlap=16), m.encode_tiled(x, tile=64, overlap=16))
    assert sum("out of memory" in r.getMessage() for r in caplog.records) == 2
    assert len(freed) == 2

    # Tiles that are still too big are halved until they fit ...
    real_tiled, tiles = m.decode_tiled, []

    def tiled_needing_small_tiles(z, tile, overlap, progress=None):
        tiles.append(tile)
        if tile > 8:
            raise oom("CUDA out of memory")
        return real_tiled(z, tile=tile, overlap=overlap, progress=progress)

    monkeypatch.setattr(m, "decode_tiled", tiled_needing_small_tiles)
    torch.testing.assert_close(m.decode_auto(z, tile=32, overlap=8), real_tiled(z, tile=8, overlap=2))
    assert tiles == [32, 16, 8]
    # ... and below the smallest tile the error reaches the caller.
    monkeypatch.setattr(m, "decode_tiled", no_memory)
    with pytest.raises(oom):
        m.decode_auto(z, tile=16, overlap=4)


def test_other_errors_are_not_swallowed(monkeypatch):
    _, m = _pair()

    def broken(*args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(m, "decode", broken)
    with pytest.raises(RuntimeError, match="something else"):
        m.decode_auto(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="tile > overlap"):
        m.decode_tiled(torch.randn(1, 16, 20, 20), tile=8, overlap=8)
