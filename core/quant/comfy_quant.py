"""ComfyUI's per-layer quantized weights (``comfy_quant``), decoded with plain PyTorch ops.

A ComfyUI "mixed precision" checkpoint marks each quantized Linear ``<L>`` with a tensor
``<L>.comfy_quant`` (uint8 bytes of a JSON dict such as ``{"format": "nvfp4"}``), or lists the
same dicts in the safetensors header (``__metadata__["_quantization_metadata"]`` =
``{"format_version": "1.0", "layers": {"<L>": {...}}}``; the header entry wins). Besides
``<L>.weight`` the layer carries the side tensors named in ``SIDE_TENSORS[format]``.

API (everything a loader and ``Linear.forward`` need):
- ``parse_layer_config(raw) -> LayerQuant``: the JSON (tensor, bytes, str or dict); an unknown
  format raises ValueError naming it and listing ``SUPPORTED``.
- ``SIDE_TENSORS[fmt]``: suffixes (``<L>.<suffix>``) that belong to the layer;
  ``check_side(quant, side)`` refuses a missing required one, and ``weight_correction``;
  ``check_side_shapes(quant, side, out, in)`` refuses one whose size does not fit the layer.
- ``stored_weight_shape(fmt, out, in)`` / ``logical_shape(quant, weight_shape, out, in)``:
  packed weights are ``[N, K/2]`` and nvfp4/mxfp8 pad to 16/32, so the dense ``[out, in]``
  cannot always be read off the file: pass the module's dims (they are checked).
- ``dequantize(quant, weight, side, out_features, in_features, dtype) -> [out, in]``.
- ``prepare_input(x, side)``: nvfp4's ``pre_quant_scale`` (AWQ smoothing) belongs to the layer:
  ``y = (x * pre_quant_scale) @ W.T + b``. ``linear(...)`` is that rule in one call;
  ``smoothed_weight(...)`` the one plain weight that computes the same.

The dense weight is in the original basis (ConvRot rotations undone), so any layer computes
``F.linear(prepare_input(x, side), dequantize(...), bias)``; ``input_scale`` only matters to
native quantized-activation kernels and is ignored here. In float32 every decoder gives the
bits comfy-kitchen's ``dequantize`` gives; fp8 and nvfp4 multiply in the requested dtype, as
ComfyUI does, so bf16 matches it too. Shapes depend only on input shapes, and nothing leaves
the weight's device, so the same code runs on CPU, CUDA and under ``torch.compile`` (keep
mxfp8's float8_e8m0fnu scales as uint8, a free ``.view``: inductor's CPU code cannot take them).

Not supported: asymmetric ``asym_w4a8_int8`` files (with ``weight_correction``). ComfyUI 0.30
never loads that tensor, so such a file computes wrong results there as well.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F

MARKER = "comfy_quant"  # per-layer tensor suffix holding the JSON

SUPPORTED = (
    "float8_e4m3fn",
    "float8_e5m2",
    "nvfp4",
    "mxfp8",
    "int8_tensorwise",
    "convrot_w4a4",
    "asym_w4a8_int8",
)

# Suffixes of the file tensors that belong to a quantized layer, next to ``weight`` and ``bias``.
SIDE_TENSORS: dict[str, tuple[str, ...]] = {
    "float8_e4m3fn": ("weight_scale", "input_scale"),
    "float8_e5m2": ("weight_scale", "input_scale"),
    "nvfp4": ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale"),
    "mxfp8": ("weight_scale", "input_scale"),
    "int8_tensorwise": ("weight_scale",),
    "convrot_w4a4": ("weight_scale",),
    # weight_correction is listed so that a loader collects it and check_side can refuse it.
    "asym_w4a8_int8": ("weight_s_rel", "weight_s_channel", "weight_codebook", "weight_correction"),
}

# Without these the layer cannot be decoded. fp8 has none: a missing scale means 1.
REQUIRED_SIDE: dict[str, tuple[str, ...]] = {
    "float8_e4m3fn": (),
    "float8_e5m2": (),
    "nvfp4": ("weight_scale", "weight_scale_2"),
    "mxfp8": ("weight_scale",),
    "int8_tensorwise": ("weight_scale",),
    "convrot_w4a4": ("weight_scale",),
    "asym_w4a8_int8": ("weight_s_rel", "weight_s_channel"),
}


class LayerQuant(NamedTuple):
    """One layer's ``comfy_quant`` dict, with ComfyUI's defaults filled in."""

    format: str
    convrot: bool = False  # inputs rotated in groups of convrot_groupsize (always for w4a4/w4a8)
    convrot_groupsize: int = 256
    group_size: int = 16  # asym_w4a8_int8: K elements per s_rel scale
    linear_dtype: str = "int4"  # convrot_w4a4: activation type of the native kernel only
    # The file asks for this layer to be computed on its decoded weight, as ComfyUI then does even
    # where native kernels exist: our opt-in quantized-activation matmuls skip it too.
    full_precision_matrix_mult: bool = False


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def parse_layer_config(raw) -> LayerQuant:
    """``raw``: the ``<L>.comfy_quant`` uint8 tensor, its bytes, the JSON text, or the dict."""
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().reshape(-1).to("cpu", torch.uint8).numpy().tobytes()
    if isinstance(raw, (bytes, bytearray, str)):
        raw = json.loads(raw)
    if not isinstance(raw, Mapping):
        raise ValueError(f"comfy_quant config must be a JSON object, got {type(raw).__name__}")
    fmt = raw.get("format")
    if fmt not in SUPPORTED:
        raise ValueError(f"comfy_quant format {fmt!r} is not supported; supported formats: {', '.join(SUPPORTED)}")
    # ComfyUI accepts each parameter at the top level or nested under "params"; top level wins.
    nested = raw.get("params") if isinstance(raw.get("params"), Mapping) else {}

    def get(key, default):
        return raw.get(key, nested.get(key, default))

    quant = LayerQuant(
        format=fmt,
        # ConvRot is part of the w4a4/w4a8 formats; int8 has it only when the dict says so.
        convrot=fmt in ("convrot_w4a4", "asym_w4a8_int8") or (fmt == "int8_tensorwise" and bool(get("convrot", False))),
        convrot_groupsize=int(get("convrot_groupsize", 256)),
        group_size=int(get("group_size", 16)),
        linear_dtype=str(get("linear_dtype", "int4")),
        # Top level only: ComfyUI reads this one key nowhere else.
        full_precision_matrix_mult=bool(raw.get("full_precision_matrix_mult", False)),
    )
    g = quant.convrot_groupsize
    if quant.convrot and (g < 4 or g & (g - 1) or (g.bit_length() - 1) % 2):
        raise ValueError(f"{fmt}: convrot_groupsize must be a power of 4, got {g}")
    if fmt == "asym_w4a8_int8" and quant.group_size < 1:
        raise ValueError(f"{fmt}: group_size must be positive, got {quant.group_size}")
    return quant


def check_side(quant: LayerQuant, side: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError when ``side`` (suffix -> tensor) cannot be decoded as ``quant``."""
    missing = [k for k in REQUIRED_SIDE[quant.format] if side.get(k) is None]
    if missing:
        raise ValueError(f"{quant.format} layer is missing {', '.join(missing)}")
    if side.get("weight_correction") is not None:
        raise ValueError(
            f"{quant.format} with weight_correction (asymmetric W4A8) is not supported: ComfyUI 0.30 "
            "never loads weight_correction, so the file has no working reference; only symmetric "
            "files (no weight_correction) are"
        )


def _swizzled_scale_count(fmt: str, out_features: int, in_features: int) -> int:
    """Bytes of the block scales of an nvfp4 / mxfp8 layer: one per block of the padded weight's
    rows, the scale matrix padded to whole 128x4 tiles (cuBLAS's swizzled layout)."""
    block = 16 if fmt == "nvfp4" else 32
    rows, cols = stored_weight_shape(fmt, out_features, in_features)
    cols = cols * 2 if fmt == "nvfp4" else cols  # nvfp4 packs two values per byte
    return _ceil_to(rows, 128) * _ceil_to(cols // block, 4)


def _side_sizes(quant: LayerQuant, n: int, k: int) -> dict[str, tuple[tuple[int, ...] | None, tuple[int, ...]]]:
    """suffix -> (exact shape or None, allowed element counts) for a dense ``[n, k]`` layer: what
    the decoders (and kitchen's) read. Only the element count where files differ in how they lay
    out the same values (``[N]`` or ``[N, 1]``; the swizzled scales' 2-D shape is a reshape of
    one buffer); the exact shape where kitchen checks it (w4a8's ``s_rel``)."""
    fmt = quant.format
    if fmt in ("nvfp4", "mxfp8"):
        sizes = {"weight_scale": (None, (_swizzled_scale_count(fmt, n, k),))}
        if fmt == "nvfp4":  # mxfp8's input_scale is never read
            sizes.update(weight_scale_2=(None, (1,)), input_scale=(None, (1,)), pre_quant_scale=(None, (k,)))
        return sizes
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        return {"weight_scale": (None, (1,)), "input_scale": (None, (1,))}
    if fmt in ("int8_tensorwise", "convrot_w4a4"):  # per tensor, or per output row
        return {"weight_scale": (None, (1, n))}
    return {"weight_s_rel": ((n, k // quant.group_size), ()), "weight_s_channel": (None, (n,)),
            "weight_codebook": (None, (16,))}


def check_side_shapes(quant: LayerQuant, side: Mapping[str, torch.Tensor], out_features: int,
                      in_features: int) -> None:
    """Raise ValueError when a side tensor's size does not fit a dense ``[out, in]`` layer: a file
    written in another convention (unswizzled block scales, ``s_rel`` of another group size)
    would otherwise load and fail at its first forward with a bare reshape error, or where sizes
    happen to coincide decode to wrong values."""
    for name, (shape, counts) in _side_sizes(quant, out_features, in_features).items():
        t = side.get(name)
        if t is None:
            continue
        if shape is not None and tuple(t.shape) != shape:
            want = f"shape {list(shape)}"
        elif shape is None and t.numel() not in counts:
            want = " or ".join(str(c) for c in sorted(set(counts))) + " values"
        else:
            continue
        raise ValueError(f"{name} of shape {list(t.shape)} does not fit a [{out_features}, {in_features}] "
                         f"{quant.format} layer (expected {want})")


def stored_weight_shape(fmt: str, out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of ``<L>.weight`` in the file for a dense ``[out_features, in_features]`` layer."""
    if fmt == "nvfp4":  # two e2m1 codes per byte, rows and columns zero-padded to 16
        return _ceil_to(out_features, 16), _ceil_to(in_features, 16) // 2
    if fmt == "mxfp8":  # padded to the 32-element scale block both ways
        return _ceil_to(out_features, 32), _ceil_to(in_features, 32)
    if fmt in ("convrot_w4a4", "asym_w4a8_int8"):  # two int4 per byte, no padding
        return out_features, in_features // 2
    return out_features, in_features


def logical_shape(quant: LayerQuant, weight_shape, out_features: int | None = None,
                  in_features: int | None = None) -> tuple[int, int]:
    """Dense ``[out, in]`` of a layer whose file weight has ``weight_shape``.

    With the module's dims given, they are checked against the file and returned. Without them
    the answer is exact except for nvfp4/mxfp8 layers whose dims needed padding: those get the
    padded dims (padding is zeros and leaves no trace in the file)."""
    rows, cols = (int(s) for s in weight_shape)
    if out_features is None or in_features is None:
        packed = quant.format in ("nvfp4", "convrot_w4a4", "asym_w4a8_int8")
        out_features, in_features = rows, cols * 2 if packed else cols
    expect = stored_weight_shape(quant.format, out_features, in_features)
    if (rows, cols) != expect or (quant.format in ("convrot_w4a4", "asym_w4a8_int8") and in_features % 2):
        raise ValueError(
            f"{quant.format} weight of shape {[rows, cols]} does not fit a [{out_features}, {in_features}] "
            f"layer (expected {list(expect)})"
        )
    if quant.convrot and in_features % quant.convrot_groupsize:
        raise ValueError(f"{quant.format}: in_features {in_features} is not a multiple of "
                         f"convrot_groupsize {quant.convrot_groupsize}")
    if quant.format == "asym_w4a8_int8" and in_features % quant.group_size:
        raise ValueError(f"{quant.format}: in_features {in_features} is not a multiple of group_size {quant.group_size}")
    return out_features, in_features


# ---------------------------------------------------------------- shared pieces

def unswizzle_block_scales(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """uint8 ``[rows, cols]`` block scales from cuBLAS's swizzled layout (nvfp4, mxfp8).

    The file holds the scale matrix padded to ``[128 R, 4 C]`` and cut into 128x4 tiles stored
    one after another; inside a tile, row ``32 i + j`` and column ``c`` sit at byte
    ``16 j + 4 i + c``. The stored 2-D shape is only that buffer reshaped: the bytes are
    swizzled even when the shape equals the logical one."""
    r, c = -(-rows // 128), -(-cols // 4)
    u = s.contiguous().view(torch.uint8).reshape(r, c, 32, 4, 4)  # [tile row, tile col, j, i, c]
    return u.permute(0, 3, 2, 1, 4).reshape(r * 128, c * 4)[:rows, :cols]


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _hadamard_build(g: int, device: torch.device) -> torch.Tensor:
    # ConvRot's "regular" Hadamard: Kronecker powers of H4, normalised. Symmetric and
    # orthogonal, so it is its own inverse and the same matrix undoes the rotation.
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]],
                      dtype=torch.float32, device=device)
    h = h4
    while h.shape[0] < g:
        h = torch.kron(h, h4)
    return h / g**0.5  # entries are +-2^-k: exact


@functools.lru_cache(maxsize=None)
def _hadamard_on(g: int, device: torch.device) -> torch.Tensor:
    return _hadamard_build(g, device)


@functools.lru_cache(maxsize=None)
def _e2m1_on(device: torch.device) -> torch.Tensor:
    return torch.tensor(_E2M1, dtype=torch.float32, device=device)


def hadamard(g: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 ``[g, g]`` ConvRot rotation (g a power of 4)."""
    device = torch.device(device)
    # Eager: one copy per device. Compiled: built in the graph (a constant after folding).
    return _hadamard_build(g, device) if torch.compiler.is_compiling() else _hadamard_on(g, device)


def _e2m1(device: torch.device) -> torch.Tensor:
    return torch.tensor(_E2M1, dtype=torch.float32, device=device) if torch.compiler.is_compiling() else _e2m1_on(device)


def _unrotate(w: torch.Tensor, g: int) -> torch.Tensor:
    """Original-basis fp32 weight from a ConvRot-rotated one: each group of ``g`` input
    columns times H.T (one batched matmul, as kitchen does, so the sums match bit for bit)."""
    n, k = w.shape
    return (w.reshape(n, k // g, g) @ hadamard(g, w.device).T).reshape(n, k)


def _nibbles(weight: torch.Tensor, low_first: bool) -> torch.Tensor:
    """``[N, K/2]`` bytes -> int16 ``[N, K]`` codes 0..15 (int16: room for the sign below)."""
    p = weight.view(torch.uint8).to(torch.int16)
    lo, hi = p & 0xF, p >> 4
    pair = (lo, hi) if low_first else (hi, lo)
    return torch.stack(pair, dim=-1).reshape(p.shape[0], p.shape[1] * 2)


# ---------------------------------------------------------------- formats

def _fp8(weight, side, dtype):
    w = weight.to(dtype)
    s = side.get("weight_scale")
    return w if s is None else w * s.to(w.device, dtype).reshape(())


def _nvfp4(weight, side, dtype):
    rows, cols = weight.shape[0], weight.shape[1] * 2
    # Two-level scale: a float32 per-tensor scale times one e4m3 scale per 16 elements of a row.
    # Element 2j is the HIGH nibble (kitchen's hi_first, the opposite of ModelOpt's order).
    codes = _nibbles(weight, low_first=False).to(torch.int32)
    blocks = unswizzle_block_scales(side["weight_scale"].to(weight.device), rows, cols // 16).view(torch.float8_e4m3fn)
    scale = side["weight_scale_2"].to(weight.device, dtype).reshape(()) * blocks.to(dtype)
    vals = _e2m1(weight.device).to(dtype)[codes]
    return (vals.reshape(rows, cols // 16, 16) * scale[..., None]).reshape(rows, cols)


def _mxfp8(weight, side, dtype):
    rows, cols = weight.shape
    # One E8M0 scale (a biased power-of-two exponent) per 32 elements; kitchen decodes byte 0 as
    # 0, not 2^-127 (the quantizer writes 0 for all-zero blocks).
    e = unswizzle_block_scales(side["weight_scale"].to(weight.device), rows, cols // 32).to(torch.int32)
    scale = torch.where(e == 0, 0, e << 23).view(torch.float32)
    w = weight.view(torch.float8_e4m3fn) if weight.dtype == torch.uint8 else weight
    return (w.float().reshape(rows, cols // 32, 32) * scale[..., None]).reshape(rows, cols)


def _int8(weight, side, quant):
    s = side["weight_scale"].to(weight.device, torch.float32)
    # Tensorwise: one scale. Rowwise (always with ConvRot): [N, 1], or [N] in some files.
    s = s.reshape(()) if s.numel() == 1 else s.reshape(-1, 1)
    w = weight.float() * s
    return _unrotate(w, quant.convrot_groupsize) if quant.convrot else w


def _convrot_w4a4(weight, side, quant):
    # Signed int4, element 2j in the LOW nibble; (n ^ 8) - 8 sign-extends a 4-bit value.
    q = (_nibbles(weight, low_first=True) ^ 8) - 8
    w = q.float() * side["weight_scale"].to(weight.device, torch.float32).reshape(-1, 1)
    return _unrotate(w, quant.convrot_groupsize)


def _w4a8(weight, side, quant):
    # Unsigned 4-bit codes (low nibble first) -> codebook levels (or code - 8), scaled per group
    # and snapped to the int8 grid the native kernel multiplies; then per-row scale, unrotate.
    codes = _nibbles(weight, low_first=True).to(torch.int32)
    n, k, gs = codes.shape[0], codes.shape[1], quant.group_size
    book = side.get("weight_codebook")
    lev = book.to(weight.device, torch.float32)[codes] if book is not None else codes.float() - 8.0
    s_rel = side["weight_s_rel"]
    s_rel = s_rel.view(torch.float8_e4m3fn) if s_rel.dtype == torch.uint8 else s_rel
    w8 = (lev.reshape(n, k // gs, gs) * s_rel.to(weight.device).float()[..., None]).reshape(n, k)
    w8 = w8.round().clamp(-127, 127)  # torch.round: half to even, like kitchen
    s_ch = side["weight_s_channel"].to(weight.device, torch.float32).reshape(-1, 1)
    return _unrotate(w8 * s_ch, quant.convrot_groupsize)


def dequantize(quant: LayerQuant, weight: torch.Tensor, side: Mapping[str, torch.Tensor],
               out_features: int, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[out_features, in_features]`` weight of ``dtype`` on ``weight``'s device.

    ``side`` maps suffixes (``SIDE_TENSORS``) to this layer's tensors; extra entries are ignored.
    Padding rows/columns (nvfp4, mxfp8) are cut off."""
    check_side(quant, side)
    fmt = quant.format
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        w = _fp8(weight, side, dtype)
    elif fmt == "nvfp4":
        w = _nvfp4(weight, side, dtype)
    elif fmt == "mxfp8":
        w = _mxfp8(weight, side, dtype)
    elif fmt == "int8_tensorwise":
        w = _int8(weight, side, quant)
    elif fmt == "convrot_w4a4":
        w = _convrot_w4a4(weight, side, quant)
    else:
        w = _w4a8(weight, side, quant)
    if w.shape[0] != out_features or w.shape[1] != in_features:
        w = w[:out_features, :in_features]
    return w.to(dtype)


def smoothed_weight(quant: LayerQuant, weight: torch.Tensor, side: Mapping[str, torch.Tensor],
                    out_features: int, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize`` with the input smoothing folded in, ``(x * s) @ W.T == x @ (W * s).T``: the one
    plain weight a layer decoded once (at load) computes with."""
    w = dequantize(quant, weight, side, out_features, in_features, dtype)
    s = side.get("pre_quant_scale")
    return w if s is None else w * s.to(w.device, w.dtype)


def prepare_input(x: torch.Tensor, side: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``x * pre_quant_scale`` when the layer has one (nvfp4 AWQ smoothing: the stored weight was
    divided by it along K), in ``x``'s dtype like ComfyUI; otherwise ``x`` itself."""
    s = side.get("pre_quant_scale")
    return x if s is None else x * s.to(device=x.device, dtype=x.dtype)


def linear(x: torch.Tensor, quant: LayerQuant, weight: torch.Tensor, side: Mapping[str, torch.Tensor],
           bias: torch.Tensor | None, out_features: int, in_features: int) -> torch.Tensor:
    """The layer's dense math: ``(x * pre_quant_scale) @ W.T + bias`` in ``x``'s dtype."""
    w = dequantize(quant, weight, side, out_features, in_features, x.dtype)
    if bias is not None:
        bias = bias.to(device=x.device, dtype=x.dtype)
    return F.linear(prepare_input(x, side), w.to(x.device), bias)
