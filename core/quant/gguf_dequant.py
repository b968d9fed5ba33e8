"""GGUF block formats decoded with plain PyTorch ops.

Every kernel takes the raw blocks of one type as uint8 ``[n_blocks, type_size]`` and returns
float32 ``[n_blocks, block_size]``. The arithmetic follows ggml's reference decoder step by step
(same fp32 products in the same order), so on CPU the result is bit-identical to
``gguf.quants.dequantize``; the cast to the requested dtype happens once, at the end.

All shapes depend only on the input shape (no data-dependent indexing), and everything runs on
whatever device the blocks live on, so the same code serves CPU, CUDA and ``torch.compile``.
A fused GPU kernel can take over a type through ``register_fused``; the torch path stays the
reference it must match.

"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch


QK_K = 256


class GGMLType(NamedTuple):
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block


# Every type id the GGUF format defines (names are needed for error messages even when the
# type cannot be decoded here). Ids 4 and 5 were retired upstream.
GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4),
    1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 18),
    3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22),
    7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34),
    9: GGMLType("Q8_1", 32, 40),
    10: GGMLType("Q2_K", QK_K, 84),
    11: GGMLType("Q3_K", QK_K, 110),
    12: GGMLType("Q4_K", QK_K, 144),
    13: GGMLType("Q5_K", QK_K, 176),
    14: GGMLType("Q6_K", QK_K, 210),
    15: GGMLType("Q8_K", QK_K, 292),
    16: GGMLType("IQ2_XXS", QK_K, 66),
    17: GGMLType("IQ2_XS", QK_K, 74),
    18: GGMLType("IQ3_XXS", QK_K, 98),
    19: GGMLType("IQ1_S", QK_K, 50),
    20: GGMLType("IQ4_NL", 32, 18),
    21: GGMLType("IQ3_S", QK_K, 110),
    22: GGMLType("IQ2_S", QK_K, 82),
    23: GGMLType("IQ4_XS", QK_K, 136),
    24: GGMLType("I8", 1, 1),
    25: GGMLType("I16", 1, 2),
    26: GGMLType("I32", 1, 4),
    27: GGMLType("I64", 1, 8),
    28: GGMLType("F64", 1, 8),
    29: GGMLType("IQ1_M", QK_K, 56),
    30: GGMLType("BF16", 1, 2),
    34: GGMLType("TQ1_0", QK_K, 54),
    35: GGMLType("TQ2_0", QK_K, 66),
    39: GGMLType("MXFP4", 32, 17),
}

# Types stored as ordinary tensors (one element per "block"): the reader hands them out as
# plain torch tensors, never as QuantizedTensor.
PLAIN_TYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.float16,
    30: torch.bfloat16,
    28: torch.float64,
    24: torch.int8,
    25: torch.int16,
    26: torch.int32,
    27: torch.int64,
}

Kernel = Callable[[torch.Tensor], torch.Tensor]
FusedKernel = Callable[[torch.Tensor, int, int, torch.dtype], torch.Tensor]

# qtype -> fused implementation for non-CPU tensors, same signature as ``dequantize`` (without
# ``fused``). What this process has available (gguf_kernels registers it where CUDA and the
# compiler work), not a per-run switch: a call that wants the torch kernels passes fused=False.
_FUSED: dict[int, FusedKernel] = {}


def type_name(qtype: int) -> str:
    t = GGML_TYPES.get(int(qtype))
    return t.name if t is not None else f"unknown type id {int(qtype)}"


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two little-endian bytes per row -> fp32 column ``[n, 1]``."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _shifts(b: torch.Tensor, step: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    # arange builds the shift amounts on the device itself: no host copy per call.
    s = torch.arange(0, step * count, step, device=b.device, dtype=b.dtype)
    return b >> s.reshape(shape)


_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@functools.lru_cache(maxsize=None)
def _iq4_table_on(device: torch.device) -> torch.Tensor:
    return torch.tensor(_IQ4_VALUES, dtype=torch.float32, device=device)


def _iq4_table(device: torch.device) -> torch.Tensor:
    # Eager: one copy per device, not a host-to-device copy per call. Compiled: a graph constant.
    if torch.compiler.is_compiling():
        return torch.tensor(_IQ4_VALUES, dtype=torch.float32, device=device)
    return _iq4_table_on(device)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    d = _f16(x[:, :2])
    return x[:, 2:].view(torch.int8).to(torch.float32) * d


def _low_high(qs: torch.Tensor) -> torch.Tensor:
    """``[n, 16]`` bytes of a 32-element block -> ``[n, 32]``: low nibbles first, then high."""
    n = qs.shape[0]
    return (_shifts(qs.reshape(n, 1, 16), 4, 2, (1, 2, 1)) & 0x0F).reshape(n, 32)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """``[n, 4]`` bytes of a little-endian uint32 -> its 32 bits as ``[n, 32]`` (bit j at j)."""
    n = qh.shape[0]
    return (_shifts(qh.reshape(n, 4, 1), 1, 8, (1, 1, 8)) & 1).reshape(n, 32)


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    d = _f16(x[:, :2])
    return d * (_low_high(x[:, 2:]).to(torch.float32) - 8)


def _q4_1(x: torch.Tensor) -> torch.Tensor:
    d, m = _f16(x[:, :2]), _f16(x[:, 2:4])
    return d * _low_high(x[:, 4:]).to(torch.float32) + m


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    d = _f16(x[:, :2])
    q = _low_high(x[:, 6:]) | (_bits32(x[:, 2:6]) << 4)
    return d * (q.to(torch.float32) - 16)


def _q5_1(x: torch.Tensor) -> torch.Tensor:
    d, m = _f16(x[:, :2]), _f16(x[:, 2:4])
    q = _low_high(x[:, 8:]) | (_bits32(x[:, 4:8]) << 4)
    return d * q.to(torch.float32) + m


def _q2_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sc, qs = x[:, :16], x[:, 16:80]
    d, dmin = _f16(x[:, 80:82]), _f16(x[:, 82:84])
    dl = (d * (sc & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _shifts(qs.reshape(n, 2, 1, 32), 2, 4, (1, 1, 4, 1)) & 3
    return (dl * q.reshape(n, 16, 16).to(torch.float32) - ml).reshape(n, QK_K)


def _q3_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    hmask, qs, sc = x[:, :32], x[:, 32:96], x[:, 96:108]
    d = _f16(x[:, 108:110])
    # 16 six-bit scales: low 4 bits in bytes 0-7 (two per byte), high 2 bits in bytes 8-11.
    low = (_shifts(sc[:, :8].reshape(n, 1, 8), 4, 2, (1, 2, 1)) & 0x0F).reshape(n, 16)
    high = (_shifts(sc[:, 8:].reshape(n, 1, 4), 2, 4, (1, 4, 1)) & 3).reshape(n, 16)
    scale = (low | (high << 4)).to(torch.float32) - 32
    dl = (d * scale).reshape(n, 16, 1)
    ql = (_shifts(qs.reshape(n, 2, 1, 32), 2, 4, (1, 1, 4, 1)) & 3).reshape(n, 16, 16)
    qh = (_shifts(hmask.reshape(n, 1, 1, 32), 1, 8, (1, 1, 8, 1)) & 1).reshape(n, 16, 16)
    # A clear hmask bit subtracts 4: ql - 4 * (1 - qh) == (ql | qh << 2) - 4.
    q = (ql | (qh << 2)).to(torch.float32) - 4
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12-byte packing of eight 6-bit scales and eight 6-bit mins (Q4_K / Q5_K)."""
    a, b, c = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = torch.cat((a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)), dim=-1)
    mins = torch.cat((b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)), dim=-1)
    return scale.to(torch.float32), mins.to(torch.float32)


def _nibbles_k(qs: torch.Tensor) -> torch.Tensor:
    """``[n, 128]`` bytes -> ``[n, 8, 32]``: each 32-byte run gives its low then its high nibbles."""
    n = qs.shape[0]
    return (_shifts(qs.reshape(n, 4, 1, 32), 4, 2, (1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)


def _k_sub_scales(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K header: per 32-value sub-block scale and min, ``[n, 8, 1]`` each."""
    n = x.shape[0]
    d, dmin = _f16(x[:, :2]), _f16(x[:, 2:4])
    scale, mins = _k_scale_min(x[:, 4:16])
    return (d * scale).reshape(n, 8, 1), (dmin * mins).reshape(n, 8, 1)


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    dl, ml = _k_sub_scales(x)
    q = _nibbles_k(x[:, 16:144]).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    dl, ml = _k_sub_scales(x)
    qh = (_shifts(x[:, 16:48].reshape(n, 1, 1, 32), 1, 8, (1, 1, 8, 1)) & 1).reshape(n, 8, 32)
    q = (_nibbles_k(x[:, 48:176]) | (qh << 4)).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    ql, qh, sc = x[:, :128], x[:, 128:192], x[:, 192:208]
    d = _f16(x[:, 208:210])
    dl = (d * sc.view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    low = (_shifts(ql.reshape(n, 2, 1, 64), 4, 2, (1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    high = (_shifts(qh.reshape(n, 2, 1, 32), 2, 4, (1, 1, 4, 1)) & 3).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.float32) - 32
    return (dl * q.reshape(n, 16, 16)).reshape(n, QK_K)


def _iq4_nl(x: torch.Tensor) -> torch.Tensor:
    d = _f16(x[:, :2])
    return d * _iq4_table(x.device)[_low_high(x[:, 2:]).long()]


def _iq4_xs(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    d = _f16(x[:, :2])
    # Eight 6-bit scales: low 4 bits from bytes 4-7, high 2 bits from the uint16 in bytes 2-3.
    sh = x[:, 2].to(torch.int32) | (x[:, 3].to(torch.int32) << 8)
    high = _shifts(sh.reshape(n, 1), 2, 8, (1, 8)) & 3
    low = (_shifts(x[:, 4:8].reshape(n, 4, 1), 4, 2, (1, 1, 2)) & 0x0F).reshape(n, 8)
    scale = (low.to(torch.int32) | (high << 4)).to(torch.float32) - 32
    dl = (d * scale).reshape(n, 8, 1)
    idx = (_shifts(x[:, 8:].reshape(n, 8, 1, 16), 4, 2, (1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    return (dl * _iq4_table(x.device)[idx.long()]).reshape(n, QK_K)


_KERNELS: dict[int, Kernel] = {
    8: _q8_0,
    2: _q4_0,
    3: _q4_1,
    6: _q5_0,
    7: _q5_1,
    10: _q2_k,
    11: _q3_k,
    12: _q4_k,
    13: _q5_k,
    14: _q6_k,
    20: _iq4_nl,
    23: _iq4_xs,
}

QUANTIZED_TYPES: frozenset[int] = frozenset(_KERNELS)
SUPPORTED_TYPES: frozenset[int] = frozenset(_KERNELS) | frozenset(PLAIN_TYPES)


def supported_type_names() -> str:
    return ", ".join(GGML_TYPES[t].name for t in sorted(SUPPORTED_TYPES))


def register_fused(qtype: int, fn: FusedKernel | None) -> None:
    """Route ``qtype`` on non-CPU devices to ``fn(blocks, qtype, cols, dtype)`` (None removes it).

    The fused kernel must reproduce the torch path; CPU always uses the torch path."""
    if fn is None:
        _FUSED.pop(int(qtype), None)
    else:
        _FUSED[int(qtype)] = fn


def decode_blocks(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """The plain torch kernel of ``qtype``: uint8 ``[n_blocks, type_size]`` -> float32
    ``[n_blocks, block_size]``, no checks (what compiled kernels trace)."""
    return _KERNELS[int(qtype)](blocks)


def dequantize(blocks: torch.Tensor, qtype: int, cols: int, dtype: torch.dtype = torch.float32,
               fused: bool = True) -> torch.Tensor:
    """uint8 ``[rows, bytes_per_row]`` blocks of ``qtype`` -> ``[rows, cols]`` of ``dtype``.

    ``fused`` False: the torch kernels even where a fused kernel is registered (the caller's
    ``RunOptions.fused_dequant``: torch.compile'd blocks trace these and let the compiler fuse)."""
    qtype = int(qtype)
    spec = GGML_TYPES.get(qtype)
    if spec is None or qtype not in SUPPORTED_TYPES:
        raise ValueError(
            f"cannot dequantize GGUF type {type_name(qtype)}; supported: {supported_type_names()}"
        )
    if blocks.dim() != 2 or blocks.dtype != torch.uint8:
        raise ValueError(
            f"{spec.name} blocks must be a uint8 [rows, bytes] tensor, got {blocks.dtype} {tuple(blocks.shape)}"
        )
    row_bytes = cols // spec.block_size * spec.type_size
    if cols % spec.block_size or blocks.shape[1] != row_bytes:
        raise ValueError(
            f"{spec.name} rows of {cols} values need {spec.block_size}-value blocks of {spec.type_size} bytes "
            f"({row_bytes} bytes per row); got {blocks.shape[1]} bytes per row"
        )
    rows = blocks.shape[0]
    plain = PLAIN_TYPES.get(qtype)
    if plain is not None:
        return blocks.contiguous().view(plain).reshape(rows, cols).to(dtype)
    kernel = _FUSED.get(qtype) if fused and blocks.device.type != "cpu" else None
    if kernel is not None:
        return kernel(blocks, qtype, cols, dtype)
    out = _KERNELS[qtype](blocks.reshape(-1, spec.type_size))
    return out.reshape(rows, cols).to(dtype)

