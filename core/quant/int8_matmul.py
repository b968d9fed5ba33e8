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
returns None where it does not apply (no CUDA or not allowed on the CPU, another format, shapes
the kernel refuses), and the layer then decodes the weight as usual.
"""
from __future__ import annotations

import torch

from .comfy_quant import LayerQuant, hadamard


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


def _int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int32 ``a @ b`` for int8 ``a`` [M, K] and ``b`` [K, N]. cuBLASLt wants M > 16 and K, N
    multiples of 8: pad with zero rows / columns, which add nothing to the sums."""
    m, k = a.shape
    n = b.shape[1]
    pad_m = (32 - m) if a.is_cuda and m < 32 else 0
    pad_k, pad_n = -k % 8, -n % 8
    if pad_m or pad_k:
        a = torch.nn.functional.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = torch.nn.functional.pad(b, (0, pad_n, 0, pad_k))
    return torch._int_mm(a, b)[:m, :n]


def try_linear(x: torch.Tensor, quant: LayerQuant, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, on_cpu: bool = False) -> torch.Tensor | None:
    """``x @ W^T + b`` on int8 operands, or None when this path does not apply."""
    if not applies(quant) or weight.dtype != torch.int8 or not x.is_floating_point():
        return None
    if not (device_supports(x.device) or (on_cpu and x.device.type == "cpu")):
        return None
    k = x.shape[-1]
    if quant.convrot and k % quant.convrot_groupsize:
        return None
    x2 = x.reshape(-1, k)
    if quant.convrot:
        x2 = rotate_groups(x2, quant.convrot_groupsize)
    xq, sx = quantize_rows(x2)
    acc = _int8_mm(xq, weight.t().contiguous())
    sw = weight_scale.to(device=x.device, dtype=torch.float32).reshape(1, -1)
    y = (acc.float() * (sx * sw)).to(x.dtype)
    if bias is not None:
        y = y + bias.to(device=y.device, dtype=y.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])
