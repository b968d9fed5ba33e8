"""The one place Qwen-Image latents are normalized, packed and shaped.

LATENTs cross node boundaries in raw VAE space; the MMDiT and the sampler work on
normalized latents ``(z - mean) / std`` (per channel).
"""
from __future__ import annotations

import torch

LATENT_CHANNELS = 16
SPATIAL_FACTOR = 8

LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


def _stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, LATENT_CHANNELS) + (1,) * (z.ndim - 2)
    mean = torch.tensor(LATENTS_MEAN, dtype=z.dtype, device=z.device).view(shape)
    std = torch.tensor(LATENTS_STD, dtype=z.dtype, device=z.device).view(shape)
    return mean, std


def normalize(z: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(z)
    return (z - mean) / std


def denormalize(z: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(z)
    return z * std + mean


def to_4d(samples: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Accept ComfyUI's [B,16,h,w] and the Wan-style [B,16,1,h,w]; return 4-D and whether it was 5-D."""
    if samples.ndim == 5:
        if samples.shape[2] != 1:
            raise ValueError(
                f"expected a single-frame latent [B,16,1,h,w], got {tuple(samples.shape)} "
                "(Qwen-Image makes still images; video latents are not supported)"
            )
        return samples[:, :, 0], True
    if samples.ndim != 4:
        raise ValueError(f"expected a latent of shape [B,16,h,w] or [B,16,1,h,w], got {tuple(samples.shape)}")
    return samples, False


def has_frames(samples: torch.Tensor) -> bool:
    """A Qwen-Image-Layered latent ``[B,16,F,h,w]`` with F > 1 (frame 0 the composite, then the layers)."""
    return samples.ndim == 5 and samples.shape[2] > 1


# Which family a latent tensor belongs to, where a node of this pack knows it: True for latents
# of Qwen-Image-Layered (its RGBA VAE's encodings, its sampler outputs), False for plain Qwen-Image
# ones; absent (None) otherwise. A plain attribute on the tensor, so it survives ComfyUI nodes that
# pass the tensor on unchanged (ReferenceLatent) and vanishes with any new tensor.
LAYERED_TAG = "qwenimage_layered"


def tag_layered(samples: torch.Tensor, layered: bool) -> torch.Tensor:
    setattr(samples, LAYERED_TAG, bool(layered))
    return samples


def layered_tag(samples) -> bool | None:
    return getattr(samples, LAYERED_TAG, None)


def check_channels(samples: torch.Tensor) -> None:
    if samples.shape[1] != LATENT_CHANNELS:
        raise ValueError(
            f"this latent has {samples.shape[1]} channels; Qwen-Image latents have {LATENT_CHANNELS} "
            "(it probably came from another model's VAE or empty-latent node)"
        )


def from_4d(samples: torch.Tensor, five_d: bool) -> torch.Tensor:
    return samples[:, :, None] if five_d else samples


def pack(z: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] (H, W even) -> [B,(H/2)(W/2),4C], the MMDiT's token layout."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# Linear map from a normalized Wan-2.1 latent to rough RGB, used only for live previews
# (the per-channel colour each latent channel tends to carry; published with ComfyUI's Wan21 format).
_PREVIEW_RGB = (
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420), (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975), (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
_PREVIEW_BIAS = (-0.1835, -0.0868, -0.3360)


def preview_rgb(z_norm: torch.Tensor) -> torch.Tensor:
    """First image of a normalized latent [B,16,h,w] -> uint8 [h,w,3] on the CPU."""
    m = torch.tensor(_PREVIEW_RGB, dtype=torch.float32, device=z_norm.device)
    b = torch.tensor(_PREVIEW_BIAS, dtype=torch.float32, device=z_norm.device)
    rgb = torch.einsum("chw,cr->hwr", z_norm[0].float(), m) + b
    return ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu()
