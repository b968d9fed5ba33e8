"""Native block-scaled matmuls for ComfyUI's nvfp4 and mxfp8 layers (Blackwell tensor cores).

Both formats store the weight with one scale per small block of the reduction dimension:
nvfp4 as packed e2m1 pairs with an e4m3 scale per 16 values and one float32 scale for the tensor,
mxfp8 as e4m3 values with a power-of-two (e8m0) scale per 32. Blackwell GPUs (sm_100 and newer)
multiply such operands directly when the activation is quantized the same way, so the weight is
never expanded. This is what ComfyUI 0.30 runs for these files on those GPUs; the activation is
quantized as it does:

- nvfp4: ``x * pre_quant_scale`` (the layer's AWQ smoothing), flattened to ``[M, K]``, quantized
  with the layer's ``input_scale`` as its tensor scale, or ``amax|x| / (448 * 6)`` without one;
- mxfp8: flattened, quantized with a power-of-two scale per 32 values (``input_scale`` unused).

Both sides are padded by the quantizers to the blocks the kernels want (nvfp4: 16 x 16; mxfp8:
32 x 32) and the product is cut back to ``[M, N]``. The stored weight already has that padding,
and its block scales are already in cuBLAS's swizzled layout, so they are handed over as stored.

comfy-kitchen (shipped by ComfyUI 0.30, absent from older ComfyUI) does the quantizing and the
matmul: ``quantize_nvfp4`` / ``scaled_mm_nvfp4`` and ``quantize_mxfp8`` / ``scaled_mm_mxfp8``.
Without it, on another GPU, or for layers of other formats ``try_linear`` returns None and the
layer decodes its weight as usual (exact with respect to the stored weight). A kernel that fails
on this machine is remembered for the process and not retried (one warning).

``on_cpu``: the CPU has no such matmul, so the kernel is replaced by what it computes, in
float32: both operands decoded by comfy-kitchen's own ``dequantize_nvfp4`` / ``dequantize_mxfp8``
and multiplied. The quantization, padding, scales, slicing and bias are then the same code as
on the GPU; tests check the math there without a Blackwell card.
"""
from __future__ import annotations

import logging

import torch

from .comfy_quant import LayerQuant, prepare_input

log = logging.getLogger(__name__)

FORMATS = ("nvfp4", "mxfp8")
F4_E2M1_MAX = 6.0
F8_E4M3_MAX = 448.0
# Padding of both operands that each kernel wants: rows and reduction dimension.
BLOCK_PAD = {"nvfp4": 16, "mxfp8": 32}
# First compute capability with these instructions (comfy-kitchen's MIN_SM_VERSION for both).
MIN_CAPABILITY = (10, 0)
_KITCHEN_NAMES = ("quantize_nvfp4", "scaled_mm_nvfp4", "quantize_mxfp8", "scaled_mm_mxfp8",
                  "dequantize_nvfp4", "dequantize_mxfp8")


def _import_kitchen():
    try:
        import comfy_kitchen as ck
    except Exception:  # noqa: BLE001 - missing or broken: "not available", not a crash
        return None
    return ck if all(hasattr(ck, n) for n in _KITCHEN_NAMES) else None


# Resolved once, at import (ComfyUI 0.30 has imported it already): a compiled block that calls
# try_linear then reads a module constant instead of breaking its graph at an import.
_KITCHEN = _import_kitchen()
# (format, device, activation dtype) whose kernel raised here: decoded from then on.
_failed: set[tuple[str, str, torch.dtype]] = set()
_capable: dict[tuple[str, int | None], bool] = {}


def reset() -> None:
    """Forget kernels that failed (tests)."""
    _failed.clear()


def kitchen():
    """The comfy_kitchen module, or None when it is not installed or has no block-scaled matmul."""
    return _KITCHEN


def device_supports(device: torch.device) -> bool:
    """Block-scaled tensor cores (Blackwell: sm_100 data-centre, sm_120 RTX 50xx) and
    comfy-kitchen to drive them."""
    device = torch.device(device)
    if device.type != "cuda" or kitchen() is None:
        return False
    key = (device.type, device.index)
    ok = _capable.get(key)
    if ok is None:
        try:
            ok = torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY
        except (RuntimeError, AssertionError):
            ok = False
        _capable[key] = ok
    return ok


def applies(quant: LayerQuant | None) -> bool:
    return quant is not None and quant.format in FORMATS


def _pad_needed(fmt: str, rows: int, cols: int) -> bool:
    p = BLOCK_PAD[fmt]
    return rows % p != 0 or cols % p != 0


def quantize_activation(ck, fmt: str, x2: torch.Tensor, input_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The ``[M, K]`` activation as the kernel's ``a`` operand and its scales, keyed by the
    kernel's argument names."""
    pad = _pad_needed(fmt, *x2.shape)
    if fmt == "mxfp8":
        q, block = ck.quantize_mxfp8(x2, pad_32x=pad)
        return {"a": q, "block_scale_a": block}
    if input_scale is None:
        # ComfyUI divides in x's dtype: the quotient rounded to that dtype, then made float32.
        scale = _rounded(x2.abs().amax().float() / (F8_E4M3_MAX * F4_E2M1_MAX), x2.dtype)
    else:
        scale = input_scale.to(device=x2.device, dtype=torch.float32).reshape(())
    q, block = ck.quantize_nvfp4(x2, scale, pad_16x=pad)
    return {"a": q, "tensor_scale_a": scale, "block_scale_a": block}


def _rounded(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``v`` rounded to ``dtype`` (nearest, ties to even), kept float32. bfloat16 is done on
    the bits: torch.compile drops a ``.to(bfloat16).float()`` round trip as a no-op, and the
    compiled scale would then differ from the eager one."""
    if dtype == torch.bfloat16:
        bits = v.view(torch.int32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.view(torch.float32)
    return v.to(dtype).float()


def _as_e4m3(t: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn values stored as raw bytes (a U8 tensor in the file: ComfyUI ``.view``s them
    back at load) as what they are; kitchen's kernels accept float8_e4m3fn only. Free: a view."""
    return t.view(torch.float8_e4m3fn) if t.dtype == torch.uint8 else t


def weight_operand(fmt: str, weight: torch.Tensor, side: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored weight as the kernel's ``b`` operand and its scales (already padded and swizzled
    as the kernel wants them). mxfp8's e8m0 scales are kept as bytes: viewed back here; so are
    e4m3 values a file stored as bytes (nvfp4's block scales, an mxfp8 weight). nvfp4's weight
    stays uint8: packed e2m1 pairs are what the kernel takes."""
    if fmt == "mxfp8":
        return {"b": _as_e4m3(weight), "block_scale_b": side["weight_scale"].view(torch.float8_e8m0fnu)}
    return {"b": weight, "tensor_scale_b": side["weight_scale_2"].to(torch.float32).reshape(()),
            "block_scale_b": _as_e4m3(side["weight_scale"])}


def emulated_nvfp4_mm(ck, a, b, tensor_scale_a, tensor_scale_b, block_scale_a, block_scale_b,
                      bias=None, out_dtype=None) -> torch.Tensor:
    """What ``scaled_mm_nvfp4`` computes (exact block products, float32 sums), on any device."""
    a32 = ck.dequantize_nvfp4(a, tensor_scale_a, block_scale_a, torch.float32)
    b32 = ck.dequantize_nvfp4(b, tensor_scale_b, block_scale_b, torch.float32)
    return _finish(a32 @ b32.T, bias, out_dtype)


def emulated_mxfp8_mm(ck, a, b, block_scale_a, block_scale_b, bias=None, out_dtype=None) -> torch.Tensor:
    """What ``scaled_mm_mxfp8`` computes, on any device."""
    a32 = ck.dequantize_mxfp8(a, block_scale_a, torch.float32)
    b32 = ck.dequantize_mxfp8(b, block_scale_b, torch.float32)
    return _finish(a32 @ b32.T, bias, out_dtype)


def _finish(y: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype | None) -> torch.Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or torch.bfloat16)


def _matmul(ck, fmt: str, emulate: bool):
    if emulate:
        fn = emulated_nvfp4_mm if fmt == "nvfp4" else emulated_mxfp8_mm
        return lambda **kw: fn(ck, **kw)
    return ck.scaled_mm_nvfp4 if fmt == "nvfp4" else ck.scaled_mm_mxfp8


def try_linear(x: torch.Tensor, quant: LayerQuant, weight: torch.Tensor, side: dict[str, torch.Tensor],
               bias: torch.Tensor | None, out_features: int, on_cpu: bool = False) -> torch.Tensor | None:
    """``(x * pre_quant_scale) @ W^T + b`` on block-scaled operands, or None when this path does
    not apply here (the caller then decodes the weight)."""
    if not applies(quant) or x.dtype not in (torch.bfloat16, torch.float16):
        return None  # the kernels write bf16 / fp16 only
    fmt = quant.format
    emulate = on_cpu and x.device.type == "cpu"
    key = (fmt, str(x.device), x.dtype)
    if not (emulate or device_supports(x.device)) or key in _failed:
        return None
    ck = kitchen()
    if ck is None:
        return None
    x_in = prepare_input(x, side)
    k = x.shape[-1]
    x2 = x_in.reshape(-1, k)
    m = x2.shape[0]
    try:
        args = quantize_activation(ck, fmt, x2, side.get("input_scale"))
        args.update(weight_operand(fmt, weight, side))
        # The kernel adds the bias in its epilogue when the output needs no cutting.
        fused_bias = bias is not None and weight.shape[0] == out_features
        if fused_bias:
            args["bias"] = bias.to(device=x.device, dtype=x.dtype)
        y = _matmul(ck, fmt, emulate)(**args, out_dtype=x.dtype)
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError, AssertionError) as e:
        # kitchen's CUDA backend asserts its shape rules; "no capable backend" is a RuntimeError
        _failed.add(key)
        log.warning("%s matmul on %s for %s inputs is not available here (%s: %s); decoding %s weights instead",
                    fmt, x.device, x.dtype, type(e).__name__, e, fmt)
        return None
    y = y[:m, :out_features]
    if bias is not None and not fused_bias:
        y = y + bias.to(device=y.device, dtype=y.dtype)
    return y.reshape(*x.shape[:-1], out_features)
