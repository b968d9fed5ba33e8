"""Real float8 matmuls for float8 Linear weights (Hopper / Ada GPUs), with proper scales.

A float8 weight is normally dequantized to the activation dtype before each matmul (exact,
but it costs a full-size bf16 copy of the weight per call). On GPUs with float8 tensor cores
the matmul can instead run on float8 operands through ``torch._scaled_mm``:

    y = (x_q * s_x) @ (w_q * s_w)^T + b

``w_q`` / ``s_w`` are the stored float8_e4m3fn weight and its per-tensor scale (1 when the file
has none). The activation is quantized on the fly with a scale computed from the data:
per row (one scale per token; more accurate when a few tokens are much larger than the rest,
as in Qwen-Image) or per tensor. ComfyUI's "fp8_e4m3fn_fast" mode casts activations to float8
with no scale at all, which clips large activations and corrupts images (FACTS 7); scaling
each row into the float8 range is what avoids that.

Activation scales are powers of two. float8 is a floating-point format, so a power-of-two
scale loses no relative precision against the exact ``amax / 448`` (at worst one binade of
headroom at the top), and dividing a bf16 / fp16 tensor by a power of two is exact: the only
rounding is the one into float8, and the division can run in the activation dtype (no float32
copy of the activation).

Whether a call uses this path is that call's choice (``RunOptions.fp8_matmul``, passed to
``Linear.forward``; the ``QWENIMAGE_FP8_MATMUL`` default is read once, in ``run_options``).
``try_linear`` returns None whenever it does not apply (no float8 tensor cores, shapes the kernel
refuses, e5m2 weights, float32 activations), and ``Linear`` then takes the exact dequantize path.
If the kernel raises for a combination, that combination is remembered for the process (a fact
about the GPU, not a setting) and falls back from then on, with one warning.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

log = logging.getLogger(__name__)

E4M3 = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0
MODES = ("row", "tensor")
_HALF = (torch.bfloat16, torch.float16)

SETTINGS = ("auto",) + MODES  # what a call may ask for: "auto" is row where the kernel accepts it, else tensor
_device_ok: dict[tuple[str, int | None], bool] = {}
_broken: set[tuple] = set()  # (device, mode, out dtype, has bias, bias in kernel) the kernel refused
_warned: set[tuple] = set()


def reset() -> None:
    """Forget the kernel refusals learnt so far (tests; after changing torch)."""
    _broken.clear()
    _warned.clear()


def device_supports(device: torch.device, allow_cpu: bool = False) -> bool:
    """Whether ``device`` has float8 tensor cores (CUDA compute capability 8.9 or newer).
    ``allow_cpu``: count the CPU in (torch._scaled_mm runs there too, slowly: tests)."""
    device = torch.device(device)
    if device.type == "cpu":
        return allow_cpu and hasattr(torch, "_scaled_mm")
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or E4M3 is None:
        return False
    key = (device.type, device.index)
    ok = _device_ok.get(key)
    if ok is None:
        try:
            ok = torch.cuda.get_device_capability(device) >= (8, 9)
        except (RuntimeError, AssertionError):
            ok = False
        _device_ok[key] = ok
    return ok


def pow2_scale(amax: torch.Tensor, tiny: float) -> torch.Tensor:
    """Smallest power of two ``s >= tiny`` with ``amax / s <= 448``, in float32.

    ``tiny`` (the activation dtype's smallest normal, itself a power of two) keeps the scale
    representable in float16 and away from zero for an all-zero row."""
    s = (amax.float() / E4M3_MAX).clamp_min(tiny)
    return torch.exp2(torch.ceil(torch.log2(s)))


def quantize_activation(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[M, K]`` -> (float8_e4m3fn ``[M, K]``, float32 scale) with ``x ~= q * scale``.

    ``mode`` "row": scale ``[M, 1]``; "tensor": scale ``[]``. Non-finite inputs stay
    non-finite (clamping them would hide an upstream problem behind a plausible image).
    """
    # max |x| in one reduction, without a full-size |x| temporary
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True) if mode == "row" else \
        torch.linalg.vector_norm(x, float("inf"))
    scale = pow2_scale(amax, torch.finfo(x.dtype).tiny)
    # Exact division by a power of two, then one rounding into float8. The clamp only catches
    # values that round up past 448 (the scale already bounds the magnitude).
    q = (x / scale.to(x.dtype)).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


# On CUDA the dozen small ops above run per Linear call; compiled they are one or two kernels.
# Compiled once per mode with dynamic shapes (token counts vary). The compiler may still emit
# different code per shape (other reduction splits, other guards), so exactness on one shape
# proves nothing for the next: every new (mode, shape, dtype, device) is compared with the eager
# result on its first call. A difference or any compiler error sends the mode back to eager for
# good. The record of checked shapes keeps the ``MAX_CHECKED_SHAPES`` most recent; a shape that
# fell out is simply checked again.
_COMPILE_ON = ("cuda",)  # device types that take the compiled path (tests add "cpu")
MAX_CHECKED_SHAPES = 256
_compiled_quantizers: dict[str, object] = {}  # mode -> compiled function, or quantize_activation
_checked: "OrderedDict[tuple, None]" = OrderedDict()  # (mode, shape, dtype, device), least recent first


def forget_compiled() -> None:
    """Drop the compiled quantizers and the record of checked shapes (tests, or after changing
    torch settings)."""
    _compiled_quantizers.clear()
    _checked.clear()


def checked_shapes() -> list[tuple]:
    """(mode, shape, dtype, device) keys the compiled quantizer was found exact on, oldest first."""
    return list(_checked)


def _compiled(mode: str):
    fn = _compiled_quantizers.get(mode)
    if fn is None:
        try:
            fn = torch.compile(quantize_activation, dynamic=True)
        except Exception as e:  # noqa: BLE001 - any compiler failure means "stay eager"
            log.info("float8 activation quantization stays eager (%s: %s)", type(e).__name__, e)
            fn = quantize_activation
        _compiled_quantizers[mode] = fn
    return fn


def _first_use_matches(fn, x: torch.Tensor, mode: str, ref: tuple[torch.Tensor, torch.Tensor]) -> bool:
    try:
        q, scale = fn(x, mode)
        return torch.equal(q.view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(scale, ref[1])
    except Exception as e:  # noqa: BLE001 - any compiler failure means "stay eager"
        log.info("float8 activation quantization stays eager (%s: %s)", type(e).__name__, e)
        return False


def quantize(x: torch.Tensor, mode: str, compiled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_activation``, through the compiled kernel where it has been checked for this
    shape (see the notes above); always the eager result otherwise. ``compiled`` False: eager
    (the caller's ``RunOptions.fp8_compile``)."""
    if not compiled or x.device.type not in _COMPILE_ON:
        return quantize_activation(x, mode)
    fn = _compiled(mode)
    if fn is quantize_activation:
        return fn(x, mode)
    key = (mode, tuple(x.shape), x.dtype, str(x.device))
    if key in _checked:
        _checked.move_to_end(key)
        return fn(x, mode)
    ref = quantize_activation(x, mode)
    if not _first_use_matches(fn, x, mode, ref):
        log.warning("compiled float8 activation quantization (%s scaling) differs from the eager one for shape %s; "
                    "using the eager one from now on", mode, tuple(x.shape))
        _compiled_quantizers[mode] = quantize_activation
        return ref
    _checked[key] = None
    while len(_checked) > MAX_CHECKED_SHAPES:
        _checked.popitem(last=False)
    return ref


def _applicable(x: torch.Tensor, w: torch.Tensor, allow_cpu: bool) -> bool:
    return (
        w.dtype == E4M3
        and x.dtype in _HALF
        and w.dim() == 2
        and w.device == x.device
        and x.shape[-1] == w.shape[1]
        and w.shape[0] % 16 == 0
        and w.shape[1] % 16 == 0
        and x.numel() > 0
        and device_supports(x.device, allow_cpu)
    )


def scaled_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
                  mode: str, bias_in_kernel: bool = True, compiled: bool = True) -> torch.Tensor:
    """The float8 matmul itself (no checks): ``x`` ``[..., K]`` half, ``w`` e4m3 ``[N, K]``."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = w.shape[0]
    q, sx = quantize(x.reshape(-1, k), mode, compiled)
    sw = torch.ones((), device=x.device) if w_scale is None else w_scale.to(device=x.device, dtype=torch.float32)
    if mode == "row":
        sw = sw.reshape(1, 1).expand(1, n).contiguous()  # row-wise scaling wants both sides row-wise
    else:
        sw = sw.reshape(())
        sx = sx.reshape(())
    # mat2 must be column-major: the transpose of the row-major [N, K] weight is exactly that.
    y = torch._scaled_mm(q, w.t(), scale_a=sx, scale_b=sw, bias=bias if bias_in_kernel else None,
                         out_dtype=x.dtype)
    if isinstance(y, tuple):  # older torch returned (out, amax)
        y = y[0]
    if bias is not None and not bias_in_kernel:
        y = y.add_(bias)
    return y.reshape(*lead, n)


def try_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
               mode: str = "auto", allow_cpu: bool = False, compiled: bool = True):
    """``F.linear`` on float8 operands when possible, else None (the caller dequantizes).

    ``mode``: "row" (per-token activation scales), "tensor" (one scale per call) or "auto" (row
    where the kernel accepts it, else tensor). ``allow_cpu`` / ``compiled``: see ``RunOptions``."""
    if mode not in SETTINGS:
        raise ValueError(f"fp8 matmul mode must be one of {', '.join(SETTINGS)}, got {mode!r}")
    if not _applicable(x, w, allow_cpu):
        return None
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device):
        bias = bias.to(device=x.device, dtype=x.dtype)
    # "auto" starts with row-wise scaling; where the kernel refuses it (older torch builds on
    # Ada, float16 output), the loop below drops to per-tensor scaling once and remembers.
    first = "row" if mode == "auto" else mode
    # Some GPU / torch / dtype combinations refuse row-wise scaling, or a bias with it: try the
    # bias as a separate add, then per-tensor scaling; dequantizing is the last resort.
    modes = (first, "tensor") if first == "row" else (first,)
    for mode in modes:
        for bias_in_kernel in ((True, False) if bias is not None else (True,)):
            key = (str(x.device), mode, x.dtype, bias is not None, bias_in_kernel)
            if key in _broken:
                continue
            try:
                return scaled_linear(x, w, w_scale, bias, mode, bias_in_kernel, compiled)
            except RuntimeError as e:  # remember, so the failing call is not retried every layer
                _broken.add(key)
                log.warning("float8 matmul (%s scaling, %s output%s) is not available here (%s); trying the next "
                            "option", mode, x.dtype, ", bias in the kernel" if bias_in_kernel and bias is not None
                            else "", str(e).splitlines()[0] if str(e) else type(e).__name__)
    if (str(x.device), x.dtype) not in _warned:
        _warned.add((str(x.device), x.dtype))
        log.warning("float8 matmul unavailable for %s inputs on %s; dequantizing float8 weights instead",
                    x.dtype, x.device)
    return None
