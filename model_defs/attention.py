"""Attention backends for the models in this pack.

``attention(q, k, v, mask)`` takes ``[B, heads, L, D]`` tensors (any strides whose last dim is
contiguous; the MMDiT passes transposed views of ``[B, L, heads, D]`` so nothing is copied)
and returns ``[B, heads, L, D]``. PyTorch SDPA is the default: SageAttention is known to give
NaN/black images on Ampere (FACTS 7), so the faster kernels are opt-in via ``set_backend``.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash", "sage")

_backend = "sdpa"
_kernel: Callable | None = None  # the optional package's function, when _backend != "sdpa"


def _load_flash() -> Callable:
    try:  # FlashAttention 3 (Hopper) first, then 2; both take [B, L, heads, D].
        from flash_attn_interface import flash_attn_func
    except ImportError:
        from flash_attn import flash_attn_func
    return flash_attn_func


def _load_sage() -> Callable:
    from sageattention import sageattn

    return sageattn


def set_backend(name: str) -> str:
    """Select ``"sdpa"``, ``"flash"`` or ``"sage"``; returns the backend actually in use.

    A backend whose package is not installed falls back to SDPA with a warning, so a workflow
    saved on one machine still runs on another.
    """
    global _backend, _kernel
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "sdpa":
        _backend, _kernel = "sdpa", None
        return _backend
    try:
        kernel = _load_flash() if name == "flash" else _load_sage()
    except ImportError as e:
        log.warning("attention backend %r is not available (%s); using PyTorch SDPA", name, e)
        _backend, _kernel = "sdpa", None
        return _backend
    _backend, _kernel = name, kernel
    return _backend


def get_backend() -> str:
    return _backend


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(D) over ``[B, heads, L, D]``.

    ``mask`` is a boolean tensor broadcastable to ``[B, heads, Lq, Lk]`` (True = attend).
    The optional kernels take no mask, only CUDA half tensors: other calls go to SDPA.
    """
    kernel = _kernel
    if kernel is None or mask is not None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return _sdpa(q, k, v, mask)
    if _backend == "flash":
        out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if isinstance(out, tuple):  # FlashAttention 3 also returns the softmax LSE
            out = out[0]
        return out.transpose(1, 2)
    return kernel(q, k, v, tensor_layout="HND", is_causal=False)
