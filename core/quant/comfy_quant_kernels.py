"""Compiled decoding of ComfyUI's layer formats on the GPU: ``comfy_quant.dequantize`` per weight shape.

Eager decoding runs each format as several PyTorch ops (nibble split, table lookup, block-scale
unswizzle, scale products, the ConvRot rotation), each writing a full-size intermediate. Every
format traces as one graph (``fullgraph=True``), so ``torch.compile`` makes it one kernel that reads
the packed bytes once and writes the output dtype.

As for GGUF (``gguf_kernels``): the shapes are decided up front from the model (``prepare(module)``
registers each quantized Linear's format and shape, at most ``max_compiled``); only registered
shapes are compiled, on their first call, each with its own code object; the first result is
checked against eager decoding, and a mismatch (that key) or a compiler error (the whole feature)
falls back to eager with one warning. CPU tensors always take the eager path, and so does a call
traced by an enclosing ``torch.compile`` (ComfyUI's TorchCompileModel around our model): the
eager decoder then becomes part of that graph, instead of dynamo tracing this bookkeeping and the
nested compile. A key includes the layout of the stored tensors (the weight's dtype, each side
tensor's name, dtype and shape): layers of one shape whose files differ there (with or without
``pre_quant_scale``, float32 or float8 ``s_rel``, a per-tensor or per-row scale) trace different
graphs, each compiled and checked on its own.

Switch off with ``QWENIMAGE_FUSED_DEQUANT=0``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from . import comfy_quant, compiling

log = logging.getLogger(__name__)

_EAGER = compiling.EAGER  # marker: this key decodes eagerly
_registered: dict[tuple, int] = {}  # (LayerQuant, out, in) -> values decoded per forward
_compiled: dict[tuple, object] = {}  # (LayerQuant, out, in, dtype, device, layout) -> compiled fn, or _EAGER
_failed = False  # the compiler does not work in this environment
min_elements = 1 << 20
max_compiled = 48


def available() -> bool:
    if _failed or compiling.switched_off():
        return False
    return hasattr(torch, "compile")


def reset() -> None:
    """Forget registered shapes, compiled functions and failures (tests)."""
    global _failed
    _registered.clear()
    _compiled.clear()
    _failed = False


def prepare(module: nn.Module) -> int:
    """Register the ComfyUI-format Linear weights of ``module`` (format and shape) for compiled
    decoding, the most values per forward first; returns how many shapes were registered.
    Cheap and idempotent: call before running ``module`` on the GPU."""
    found: dict[tuple, int] = {}
    for m in module.modules():
        quant = getattr(m, "comfy_quant", None)
        if isinstance(m, nn.Linear) and quant is not None:
            key = (quant, *m.quant_shape)
            found[key] = found.get(key, 0) + m.quant_shape[0] * m.quant_shape[1]
    ranked = sorted((k for k, n in found.items() if k[1] * k[2] >= min_elements), key=found.get, reverse=True)
    for key in ranked[:max_compiled]:
        _registered.pop(key, None)  # re-registered: now the most recent
        _registered[key] = found[key]
    while len(_registered) > max_compiled:  # the oldest model's shapes go first
        del _registered[next(iter(_registered))]
    for key in [k for k in _compiled if k[:3] not in _registered]:
        del _compiled[key]
    return min(len(ranked), max_compiled)


def _on_gpu(t: torch.Tensor) -> bool:
    return t.device.type != "cpu"


def _build(quant: comfy_quant.LayerQuant, out_features: int, in_features: int, dtype: torch.dtype):
    def run(weight, side):
        return comfy_quant.dequantize(quant, weight, side, out_features, in_features, dtype)

    return compiling.compile_as(run, f"comfy_{quant.format}_{out_features}x{in_features}_"
                                     f"{str(dtype).replace('torch.', '')}")


def layout(weight: torch.Tensor, side: dict) -> tuple:
    """What of the stored tensors, besides the layer's format and shape, the traced graph depends on."""
    return (weight.dtype, *sorted((name, t.dtype, tuple(t.shape)) for name, t in side.items()))


def decode(quant: comfy_quant.LayerQuant, weight: torch.Tensor, side: dict, out_features: int, in_features: int,
           dtype: torch.dtype) -> torch.Tensor:
    """``comfy_quant.dequantize``, compiled where this shape was registered and the tensors are on a GPU."""
    global _failed
    if (torch.compiler.is_compiling() or not _on_gpu(weight) or not available()
            or (quant, out_features, in_features) not in _registered):
        return comfy_quant.dequantize(quant, weight, side, out_features, in_features, dtype)
    key = (quant, out_features, in_features, dtype, weight.device, layout(weight, side))
    fn = _compiled.get(key)
    if fn is _EAGER or (fn is None and len(_compiled) >= max_compiled):
        return comfy_quant.dequantize(quant, weight, side, out_features, in_features, dtype)
    if fn is not None:
        return fn(weight, side)
    ref = comfy_quant.dequantize(quant, weight, side, out_features, in_features, dtype)
    try:
        _compiled[key], out = compiling.first_use(
            lambda: _build(quant, out_features, in_features, dtype), lambda f: f(weight, side), ref, dtype, log,
            "compiled decoding of ComfyUI's quantized layers is unavailable ({error}); decoding eagerly",
            f"compiled {quant.format} decoding differs from the eager one for a {out_features}x{in_features} "
            "weight; decoding it eagerly")
    except compiling.CompilerUnavailable:
        _failed = True
        return ref
    return out
