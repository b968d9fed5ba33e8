"""Fused GGUF dequantization on the GPU: the torch kernels of ``dequant`` compiled per weight shape.

Eager dequantization runs each block format as a dozen small PyTorch ops, each reading and
writing a full-size intermediate (ComfyUI-GGUF's Q4_K costs ~6.5 ms per MMDiT block on an H100
against 2.5 ms of bf16 matmul, FACTS 7). ``torch.compile`` turns the same code into one kernel
that reads the block bytes once and writes the output dtype directly.

How it is wired:
- ``enable()`` registers ``fused_dequantize`` for every quantized type with
  ``dequant.register_fused``; ``dequant.dequantize`` only routes non-CPU tensors there, so CPU
  results never change.
- One compiled function per (type, shape, dtype, device), ``dynamic=False``, each with its own
  code object so the compiler's per-function recompile limit is never hit; model weights repeat
  the same few shapes every step.
- Only calls that recur (second time a key is seen) and are large (``min_elements``) are
  compiled: embedding-row lookups of varying length and one-off tensors stay eager instead of
  paying seconds of compilation each. At most ``max_compiled`` functions are built.
- The first result of each compiled function is checked against the eager kernel; a
  mismatch, or any compiler error (no Triton, unsupported GPU), switches that key (or, for
  errors, the whole feature) back to eager with one warning. Nothing here can break a run.

Switch off with ``QWENIMAGE_FUSED_DEQUANT=0``.
"""
from __future__ import annotations

import logging
import os
import types

import torch

from . import dequant

log = logging.getLogger(__name__)

_EAGER = object()  # marker: this key runs the eager kernel
_compiled: dict[tuple, object] = {}  # key -> compiled fn, or _EAGER
_seen: set[tuple] = set()
_failed = False  # the compiler does not work in this environment
min_elements = 1 << 20
max_compiled = 48


def available() -> bool:
    """Whether fused dequantization may be used at all (CUDA present, compiler not known broken,
    not switched off by the environment)."""
    if _failed or os.environ.get("QWENIMAGE_FUSED_DEQUANT", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return torch.cuda.is_available() and hasattr(torch, "compile")


def enable(force: bool = False) -> bool:
    """Register the fused path for every quantized GGUF type; returns whether it is active.

    ``force``: register even without CUDA (the registration is then unused: ``dequantize``
    keeps CPU tensors on the eager path)."""
    if not (force or available()):
        return False
    for qtype in dequant.QUANTIZED_TYPES:
        dequant.register_fused(qtype, fused_dequantize)
    return True


def disable() -> None:
    for qtype in dequant.QUANTIZED_TYPES:
        dequant.register_fused(qtype, None)


def reset() -> None:
    """Forget compiled functions and failures (tests, or after changing torch settings)."""
    global _failed
    _compiled.clear()
    _seen.clear()
    _failed = False


def _eager(blocks: torch.Tensor, qtype: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    spec = dequant.GGML_TYPES[qtype]
    out = dequant._KERNELS[qtype](blocks.reshape(-1, spec.type_size))
    return out.reshape(blocks.shape[0], cols).to(dtype)


def _build(qtype: int, rows: int, cols: int, dtype: torch.dtype):
    spec = dequant.GGML_TYPES[qtype]
    kernel = dequant._KERNELS[qtype]
    type_size = spec.type_size

    def run(blocks):
        return kernel(blocks.reshape(-1, type_size)).reshape(rows, cols).to(dtype)

    # A fresh code object per key: the compiler caches per code object, so keys never evict
    # one another or hit its recompile limit.
    tag = f"gguf_{spec.name}_{rows}x{cols}_{str(dtype).replace('torch.', '')}"
    code = run.__code__.replace(co_name=tag)
    fn = types.FunctionType(code, run.__globals__, tag, None, run.__closure__)
    return torch.compile(fn, dynamic=False, fullgraph=True)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal up to what reordering float32 arithmetic can change: the compiler may contract
    ``d * q - m`` into one FMA (a few float32 ulps of the largest value), which can then flip
    the final rounding to ``dtype`` by one step. A wrong bit in a quant is far larger."""
    a, b = a.float(), b.float()
    fin = torch.isfinite(b)
    if not bool(torch.isfinite(a).eq(fin).all()):
        return False
    a, b = a[fin], b[fin]
    if b.numel() == 0:
        return True
    tol = torch.finfo(dtype).eps * b.abs() + 8 * torch.finfo(torch.float32).eps * b.abs().max()
    return bool(((a - b).abs() <= tol).all())


def fused_dequantize(blocks: torch.Tensor, qtype: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Same contract as ``dequant.dequantize`` for one quantized type (checked there)."""
    global _failed
    key = (int(qtype), tuple(blocks.shape), cols, dtype, blocks.device)
    fn = _compiled.get(key)
    if fn is None:
        if _failed or blocks.shape[0] * cols < min_elements or key not in _seen or len(_compiled) >= max_compiled:
            _seen.add(key)
            return _eager(blocks, qtype, cols, dtype)
        ref = _eager(blocks, qtype, cols, dtype)
        try:
            fn = _build(int(qtype), blocks.shape[0], cols, dtype)
            out = fn(blocks)
        except Exception as e:  # noqa: BLE001 - any compiler failure means "use eager"
            _failed = True
            log.warning("fused GGUF dequantization is unavailable (%s: %s); using the PyTorch kernels",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return ref
        if not _close(out, ref, dtype):
            log.warning("compiled %s dequantization differs from the reference for shape %s; using the PyTorch "
                        "kernel for it", dequant.type_name(qtype), tuple(blocks.shape))
            _compiled[key] = _EAGER
            return ref
        _compiled[key] = fn
        return out
    if fn is _EAGER:
        return _eager(blocks, qtype, cols, dtype)
    return fn(blocks)
