"""What the compiled decoding kernels (GGUF: ``gguf_kernels``, ComfyUI's formats: ``comfy_quant_kernels``)
share: the switch that turns them off, how one kernel is compiled, and how its first result is checked."""
from __future__ import annotations

import logging
import os
import types

import torch

from ..errors import PackError


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


EAGER = object()  # a registry entry: this key's compiled result differed, it decodes eagerly


class CompilerUnavailable(PackError, RuntimeError):
    """Compiling or running a kernel failed: the caller turns its compiled kernels off."""


def first_use(build, run, ref: torch.Tensor, dtype: torch.dtype, log: logging.Logger,
              unavailable: str, differs: str) -> tuple[object, torch.Tensor]:
    """Compile a kernel (``build()``) and check its first result (``run(kernel)``) against the
    eager one, ``ref``. Returns what the registry keeps and what this call returns: the kernel and
    its result when they agree (``close_enough``), else ``EAGER`` and ``ref`` (``differs`` logged).
    A compiler or runtime error raises ``CompilerUnavailable`` (``unavailable`` logged, its
    ``{error}`` filled in)."""
    try:
        fn = build()
        out = run(fn)
    except Exception as e:  # noqa: BLE001 - any compiler failure means "use eager"
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning(unavailable.format(error=error))
        raise CompilerUnavailable from None
    if not close_enough(out, ref, dtype):
        log.warning(differs)
        return EAGER, ref
    return fn, out
