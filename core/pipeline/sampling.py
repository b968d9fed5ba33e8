"""Rectified-flow sampling as pure functions: noise, true CFG, the Euler loop, masks.

Everything here works on *normalized* latents ``[B,16,h,w]`` (Qwen-Image-Layered: ``[B,16,F,h,w]``,
F frames denoised together); the caller converts from and to
raw VAE space with ``latent_format``. The model is reached only through ``velocity_fn(x, sigma)``
so the same loop serves every model format, LoRA, ControlNet and offload strategy.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .latent_format import pack

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def initial_noise(seed: int, batch: int, height: int, width: int, channels: int = 16,
                  frames: int | None = None) -> torch.Tensor:
    """The noise diffusers' QwenImagePipeline draws for ``seed``.

    diffusers samples ``randn((B, 1, C, h, w))`` from a CPU generator seeded with ``seed``; drawing
    the same shape in the same order gives bit-identical noise, so seeds reproduce across both.
    With ``frames`` (Qwen-Image-Layered) it is QwenImageLayeredPipeline's ``randn((B, F, C, h, w))``,
    returned as ``[B, C, F, h, w]``.
    """
    gen = torch.Generator("cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    noise = torch.randn((batch, frames or 1, channels, height, width), generator=gen, dtype=torch.float32)
    return noise[:, 0] if frames is None else noise.permute(0, 2, 1, 3, 4).contiguous()


def _packed_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norm over the 64 packed channels (2x2 patch x 16 channels), shaped like ``v``
    (``[B,C,h,w]``, or ``[B,C,F,h,w]``: per frame)."""
    if v.ndim == 5:
        b, c, f, h, w = v.shape
        n = _packed_norm(v.transpose(1, 2).reshape(b * f, c, h, w))
        return n.view(b, f, 1, h, w).transpose(1, 2)
    b, c, h, w = v.shape
    ph, pw = h % 2, w % 2
    vp = F.pad(v, (0, pw, 0, ph)) if (ph or pw) else v
    n = pack(vp).norm(dim=-1)  # [B, tokens]
    hh, ww = vp.shape[2] // 2, vp.shape[3] // 2
    n = n.view(b, 1, hh, 1, ww, 1).expand(b, 1, hh, 2, ww, 2).reshape(b, 1, hh * 2, ww * 2)
    return n[:, :, :h, :w]


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: bool = True) -> torch.Tensor:
    """``uncond + scale*(cond - uncond)``, rescaled per token to the conditional prediction's norm
    as diffusers' Qwen-Image pipelines do (keeps high guidance from over-saturating)."""
    comb = uncond + scale * (cond - uncond)
    if not rescale:
        return comb
    return comb * (_packed_norm(cond) / _packed_norm(comb))


def add_noise(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    return sigma * noise + (1.0 - sigma) * clean


def latent_mask(mask: torch.Tensor, batch: int, h: int, w: int) -> torch.Tensor:
    """A ComfyUI noise_mask ([h,w], [B,h,w] or [B,1,h,w], any resolution; 1 = regenerate)
    resized to the latent grid as [B,1,h,w]."""
    m = mask.to(torch.float32)
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    elif m.ndim == 5:
        m = m[:, :, 0]
    if m.ndim != 4:
        raise ValueError(f"noise_mask must be [H,W], [B,H,W] or [B,1,H,W]; got {tuple(mask.shape)}")
    m = m[:, :1]
    mh, mw = m.shape[-2:]
    # A mask drawn for another image would be stretched silently; allow the rounding of a
    # pixel-space mask onto the latent grid (up to one latent pixel), nothing more.
    if abs(mh * w / mw - h) > 1.0 and abs(mw * h / mh - w) > 1.0:
        raise ValueError(
            f"the noise_mask is {mw}x{mh} but the latent is {w}x{h} ({w * 8}x{h * 8} pixels): "
            "the mask must have the image's proportions (make it from the same image)"
        )
    if m.shape[-2:] != (h, w):
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    if m.shape[0] != batch:
        if batch % m.shape[0]:
            raise ValueError(f"noise_mask batch {m.shape[0]} does not divide the latent batch {batch}")
        m = m.repeat(batch // m.shape[0], 1, 1, 1)
    return m.clamp(0.0, 1.0)


def euler_sample(
    velocity_fn: VelocityFn,
    clean: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    mask: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps, in float32.

    ``clean`` is the starting image latent (zeros for text-to-image); the start is
    ``sigmas[0]*noise + (1-sigmas[0])*clean``. With ``mask`` (1 = regenerate), after every step
    the area outside the mask is replaced by ``clean`` re-noised to the next sigma, as diffusers'
    inpaint pipeline does, so it ends exactly at ``clean``.
    """
    sigmas = sigmas.to(torch.float32)
    x = add_noise(clean.float(), noise.float(), float(sigmas[0]))
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, sigma.expand(x.shape[0]).to(x.device)).float()
        x = x + (sigma_next - sigma) * v
        if mask is not None:
            keep = add_noise(clean.float(), noise.float(), float(sigma_next)) if i < total - 1 else clean.float()
            x = (1.0 - mask) * keep + mask * x
        if callback is not None:
            callback(i, total, x, x - float(sigma_next) * v)
    return x
