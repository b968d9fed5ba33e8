"""Real int8 matmuls for ComfyUI's int8 layers (``int8_tensorwise``, with or without ConvRot).

An int8 layer is normally decoded to the activation dtype before each matmul (exact with respect
to the stored weight). On GPUs with int8 tensor cores the matmul can instead run on int8
operands (``torch._int_mm``, int32 accumulators), as ComfyUI does for these files:

    y = (x_q * s_x) @ (w_q * s_w)^T + b

``w_q`` / ``s_w`` are the stored int8 weight and its tensor- or row-wise scale. The activation is
quantized on the fly, one scale per token (``amax / 127``). A ConvRot layer stores its weight
rotated group by group with a symmetric orthogonal Hadamard matrix ``H``; since
``x @ (w H)^T = (x H) @ w^T``, the activation is rotated instead of the weight, which also
spreads its outliers before the int8 rounding (ConvRot's point).

Whether a call uses this path is that call's choice (``RunOptions.int8_matmul``). ``try_linear``
returns None where it does not apply (no CUDA or not allowed on the CPU, another format), and the
layer then decodes the weight as usual. A kernel that raises here (cuBLASLt refuses some shapes
on some GPUs) is remembered per device and activation dtype, with one warning, and not retried.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .comfy_quant import LayerQuant, hadamard

log = logging.getLogger(__name__)

# (device, activation dtype) whose int8 matmul raised here: decoded from then on.
_failed: set[tuple[str, torch.dtype]] = set()


def reset() -> None:
    """Forget kernels that failed (tests)."""
    _failed.clear()


def device_supports(device: torch.device) -> bool:
    """int8 tensor cores through cuBLASLt: Ampere (sm_80) and newer."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def applies(quant: LayerQuant | None) -> bool:
    return quant is not None and quant.format == "int8_tensorwise"


def rotate_groups(x: torch.Tensor, g: int) -> torch.Tensor:
    """``x`` with each group of ``g`` features multiplied by ConvRot's ``H`` (in ``x``'s dtype)."""
    k = x.shape[-1]
    h = hadamard(g, x.device).to(x.dtype)
    return (x.reshape(*x.shape[:-1], k // g, g) @ h).reshape(x.shape)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``[M, K]`` and float32 ``[M, 1]`` scales with ``x ~= q * s`` (round half to even)."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / 127.0).clamp(min=1e-30)
    q = (x.float() / scale).round().clamp(-128, 127).to(torch.int8)
    return q, scale


def _padding(m: int, k: int, n: int, cuda: bool) -> tuple[int, int, int]:
    """Zero rows / columns to add to M, K, N (they add nothing to the sums). cuBLASLt wants K and N
    multiples of 8 and M > 16; on CUDA M is padded as comfy-kitchen's int8 linear pads it (to a
    multiple of 32, at least 32): unaligned M (77 or 213 text tokens) is refused on some GPUs."""
    pad_m = -(-max(m, 32) // 32) * 32 - m if cuda else 0
    return pad_m, -k % 8, -n % 8


def _int8_mm(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int32 ``a @ weight^T`` for int8 ``a`` [M, K] and the stored weight [N, K].

    The weight goes in as its transposed view, column-major [K, N], next to a row-major ``a``:
    the one layout cuBLASLt's int8 kernels take on every CUDA version (PyTorch's own test of
    ``_int_mm`` expects a contiguous [K, N] ``b`` to fail on CUDA 13), and the weight is copied
    only where it needs padding, not on every call (N x K bytes of memory traffic per layer)."""
    m, k = a.shape
    n = weight.shape[0]
    pad_m, pad_k, pad_n = _padding(m, k, n, a.is_cuda)
    if pad_m or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        weight = F.pad(weight, (0, pad_k, 0, pad_n))
    return torch._int_mm(a, weight.t())[:m, :n]


def try_linear(x: torch.Tensor, quant: LayerQuant, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, on_cpu: bool = False) -> torch.Tensor | None:
    """``x @ W^T + b`` on int8 operands, or None when this path does not apply."""
    if not applies(quant) or weight.dtype != torch.int8 or not x.is_floating_point():
        return None
    if not (device_supports(x.device) or (on_cpu and x.device.type == "cpu")):
        return None
    key = (str(x.device), x.dtype)
    if key in _failed:
        return None
    k = x.shape[-1]
    if quant.convrot and k % quant.convrot_groupsize:
        return None
    x2 = x.reshape(-1, k)
    if quant.convrot:
        x2 = rotate_groups(x2, quant.convrot_groupsize)
    xq, sx = quantize_rows(x2)
    try:
        acc = _int8_mm(xq, weight if weight.device == x.device else weight.to(x.device, non_blocking=True))
    except RuntimeError as e:  # e.g. CUBLAS_STATUS_NOT_SUPPORTED for a shape or GPU
        _failed.add(key)
        log.warning("int8 matmul on %s for %s inputs is not available here (%s); decoding int8 weights instead",
                    x.device, x.dtype, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    sw = weight_scale.to(device=x.device, dtype=torch.float32).reshape(1, -1)
    y = (acc.float() * (sx * sw)).to(x.dtype)
    if bias is not None:
        y = y + bias.to(device=y.device, dtype=y.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])
