"""Rectified-flow sigma schedules as pure functions (FACTS section 5).

``dynamic`` reproduces diffusers' Qwen-Image scheduler (resolution-dependent exponential
shift, stretched to a terminal sigma of 0.02; Qwen-Image-Layered's pipeline takes its exponent
from ``layered_mu`` instead of the linear ``dynamic_mu``); ``constant`` is the fixed shift the Lightning
LoRAs were distilled with (3.0, no stretch).
"""
from __future__ import annotations

import math

import torch

SHIFT_MODES = ("dynamic", "constant")

# diffusers' Qwen/Qwen-Image scheduler_config.json
BASE_SEQ_LEN = 256
MAX_SEQ_LEN = 8192
BASE_SHIFT = 0.5
MAX_SHIFT = 0.9
SHIFT_TERMINAL = 0.02


def dynamic_mu(seq_len: int) -> float:
    """The exponent of the resolution-dependent shift for ``seq_len`` packed image tokens."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return seq_len * slope + (BASE_SHIFT - slope * BASE_SEQ_LEN)


def layered_mu(seq_len: int) -> float:
    """QwenImageLayeredPipeline's exponent: ``sqrt(tokens / 256)`` for ``seq_len`` packed tokens of
    one image (640x640 -> 1600 tokens -> 2.5; 1024x1024 -> 4.0)."""
    return math.sqrt(seq_len / BASE_SEQ_LEN)


def image_seq_len(latent_h: int, latent_w: int) -> int:
    """Packed tokens of the noisy latent (reference images do not count)."""
    return ((latent_h + 1) // 2) * ((latent_w + 1) // 2)


def _exponential_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def _stretch_to_terminal(s: torch.Tensor, terminal: float) -> torch.Tensor:
    one_minus = 1.0 - s
    scale = one_minus[-1] / (1.0 - terminal)
    return 1.0 - one_minus / scale


def flow_sigmas(steps: int, shift_mode: str = "dynamic", shift: float = 3.0, seq_len: int = 4096,
                mu: float | None = None) -> torch.Tensor:
    """``steps + 1`` float32 sigmas from 1 down to 0.

    dynamic: shift exp(mu(seq_len)), then stretched so the last non-zero sigma is 0.02; ``mu``,
    when given, replaces ``dynamic_mu(seq_len)`` (Qwen-Image-Layered: ``layered_mu``).
    constant: sigma' = shift*t / (1 + (shift-1)*t), no stretch (Lightning: shift 3).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift_mode not in SHIFT_MODES:
        raise ValueError(f"shift_mode must be one of {SHIFT_MODES}, got {shift_mode!r}")
    t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    if shift_mode == "dynamic":
        s = _exponential_shift(dynamic_mu(seq_len) if mu is None else mu, t)
        # One step leaves nothing to stretch (the formula divides 0 by 0): a single
        # step from pure noise to the clean image is what the user asked for.
        if steps > 1:
            s = _stretch_to_terminal(s, SHIFT_TERMINAL)
    else:
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        s = shift * t / (1.0 + (shift - 1.0) * t)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)


def denoise_start(steps: int, denoise: float) -> int:
    """Index of the first sigma used when only ``denoise`` of the schedule runs (diffusers img2img)."""
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be within [0, 1], got {denoise}")
    return int(max(steps - min(steps * denoise, steps), 0))
