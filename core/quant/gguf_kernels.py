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
- Which shapes are compiled is decided up front, from the model: ``prepare(module)`` registers
  the (type, shape) of each quantized Linear weight of at least ``min_elements`` values, the
  ones with the most values per forward first, at most ``max_compiled`` (the most recently
  prepared model's shapes win when there are more). Only registered shapes are compiled, on
  their first call; everything else (embedding-row gathers of varying length, one-off tensors)
  stays eager however often it recurs, so it can neither cost seconds of compilation nor take
  a slot a weight needs. Registry and compiled functions are bounded by ``max_compiled``.
- The first result of each compiled function is checked against the eager kernel; a
  mismatch, or any compiler error (no Triton, unsupported GPU), switches that key (or, for
  errors, the whole feature) back to eager with one warning. Nothing here can break a run.

Switch off with ``QWENIMAGE_FUSED_DEQUANT=0``.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn as nn

from . import compiling, gguf_dequant as dequant

log = logging.getLogger(__name__)

_EAGER = compiling.EAGER  # marker: this key runs the eager kernel
# (type, rows, cols) -> values dequantized per forward; least recently prepared first
_registered: "OrderedDict[tuple[int, int, int], int]" = OrderedDict()
_compiled: dict[tuple, object] = {}  # (type, blocks shape, cols, dtype, device) -> compiled fn, or _EAGER
_failed = False  # the compiler does not work in this environment
min_elements = 1 << 20
max_compiled = 48


def available() -> bool:
    """Whether fused dequantization may be used at all (CUDA present, compiler not known broken,
    not switched off by the environment)."""
    if _failed or compiling.switched_off():
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
    """Forget registered shapes, compiled functions and failures (tests, or after changing torch
    settings)."""
    global _failed
    _registered.clear()
    _compiled.clear()
    _failed = False


def _weight_shapes(module: nn.Module) -> dict[tuple[int, int, int], int]:
    """(type, rows, cols) of ``module``'s quantized Linear weights -> values per forward."""
    found: dict[tuple[int, int, int], int] = {}
    for m in module.modules():
        if isinstance(m, nn.Linear) and getattr(m, "quant_type", None) is not None:
            rows = int(m.weight.shape[0])
            cols = 1
            for n in m.quant_shape[1:]:
                cols *= n
            key = (m.quant_type, rows, cols)
            found[key] = found.get(key, 0) + rows * cols
    return found


def prepare(module: nn.Module) -> int:
    """Register the quantized Linear weight shapes of ``module`` for compiled dequantization;
    returns how many of its shapes are registered. Call before running ``module`` on the GPU
    (cheap, idempotent). Shapes below ``min_elements`` values are left eager (not worth a
    compile); of the rest, the ones with the most values per forward come first, at most
    ``max_compiled``. They become the most recent entries; older models' shapes beyond
    ``max_compiled`` are forgotten, with their compiled functions."""
    shapes = {k: v for k, v in _weight_shapes(module).items() if k[1] * k[2] >= min_elements}
    ranked = sorted(shapes, key=shapes.get, reverse=True)[:max_compiled]
    for key in reversed(ranked):  # the largest end up most recent: trimmed last
        _registered[key] = shapes[key]
        _registered.move_to_end(key)
    while len(_registered) > max_compiled:
        _registered.popitem(last=False)
    for key in [k for k in _compiled if (k[0], k[1][0], k[2]) not in _registered]:
        del _compiled[key]
    return len(ranked)


def registered() -> set[tuple[int, int, int]]:
    """The (GGUF type, rows, cols) shapes that are compiled when dequantized on the GPU."""
    return set(_registered)


def _eager(blocks: torch.Tensor, qtype: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    spec = dequant.GGML_TYPES[qtype]
    out = dequant.decode_blocks(blocks.reshape(-1, spec.type_size), qtype)
    return out.reshape(blocks.shape[0], cols).to(dtype)


def _build(qtype: int, rows: int, cols: int, dtype: torch.dtype):
    spec = dequant.GGML_TYPES[qtype]
    type_size = spec.type_size

    def run(blocks):
        return dequant.decode_blocks(blocks.reshape(-1, type_size), qtype).reshape(rows, cols).to(dtype)

    return compiling.compile_as(run, f"gguf_{spec.name}_{rows}x{cols}_{str(dtype).replace('torch.', '')}")


def fused_dequantize(blocks: torch.Tensor, qtype: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Same contract as ``dequant.dequantize`` for one quantized type (checked there)."""
    global _failed
    key = (int(qtype), tuple(blocks.shape), cols, dtype, blocks.device)
    fn = _compiled.get(key)
    if fn is None:
        wanted = (int(qtype), blocks.shape[0], cols) in _registered
        if _failed or not wanted or len(_compiled) >= max_compiled:
            return _eager(blocks, qtype, cols, dtype)
        ref = _eager(blocks, qtype, cols, dtype)
        try:
            _compiled[key], out = compiling.first_use(
                lambda: _build(int(qtype), blocks.shape[0], cols, dtype), lambda f: f(blocks), ref, dtype, log,
                "fused GGUF dequantization is unavailable ({error}); using the PyTorch kernels",
                f"compiled {dequant.type_name(qtype)} dequantization differs from the reference for shape "
                f"{tuple(blocks.shape)}; using the PyTorch kernel for it")
        except compiling.CompilerUnavailable:
            _failed = True
            return ref
        return out
    if fn is _EAGER:
        return _eager(blocks, qtype, cols, dtype)
    return fn(blocks)
