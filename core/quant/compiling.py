"""What the compiled decoding kernels (GGUF: ``gguf_kernels``, ComfyUI's formats: ``comfy_quant_kernels``)
share: the switch that turns them off, how one kernel is compiled, and how its result is checked."""
from __future__ import annotations

import os
import types

import torch


def switched_off() -> bool:
    """``QWENIMAGE_FUSED_DEQUANT=0`` keeps every weight format on its plain PyTorch decoder."""
    return os.environ.get("QWENIMAGE_FUSED_DEQUANT", "1").strip().lower() in ("0", "false", "no", "off")


def compile_as(fn, tag: str):
    """``torch.compile(fn)`` for fixed shapes, under a fresh code object named ``tag``: the compiler
    caches per code object, so kernels compiled from the same function never evict one another or
    hit its recompile limit."""
    code = fn.__code__.replace(co_name=tag)
    fresh = types.FunctionType(code, fn.__globals__, tag, None, fn.__closure__)
    return torch.compile(fresh, dynamic=False, fullgraph=True)


def close_enough(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal up to what compiling can change: float32 arithmetic reordered or contracted into FMAs
    (a few float32 ulps of the largest value), and products kept in float32 where eager rounds each
    to ``dtype``, which can move the final rounding by one step. A wrong bit in a quant is far larger."""
    a, b = a.float(), b.float()
    fin = torch.isfinite(b)
    if not bool(torch.isfinite(a).eq(fin).all()):
        return False
    a, b = a[fin], b[fin]
    if b.numel() == 0:
        return True
    tol = torch.finfo(dtype).eps * b.abs() + 8 * torch.finfo(torch.float32).eps * b.abs().max()
    return bool(((a - b).abs() <= tol).all())
