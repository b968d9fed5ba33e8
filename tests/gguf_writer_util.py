"""Helpers that write tiny GGUF files with the reference ``gguf`` package (gguf-py).

gguf-py can quantize Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16 and F16 but not the K-quants or the
IQ4 types; for those, valid random blocks are built byte by byte (random quant bits, finite
fp16 scales), and the values they stand for are whatever ``gguf.quants.dequantize`` says.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFEndian, GGUFWriter, quants

QUANTIZABLE = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
BYTE_BUILT = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS)
ALL_QUANTIZED = QUANTIZABLE + BYTE_BUILT

# Byte offsets of the fp16 fields (scales / mins) inside one block of each type (ggml layouts).
F16_FIELDS = {
    T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,),
}
# Largest |sub-scale x quant| each type can produce per unit of its fp16 scale: dividing a
# target magnitude by it gives weights of about that magnitude.
_SPAN = {
    T.Q8_0: 127, T.Q4_0: 8, T.Q4_1: 15, T.Q5_0: 16, T.Q5_1: 31,
    T.Q2_K: 45, T.Q3_K: 128, T.Q4_K: 945, T.Q5_K: 1953, T.Q6_K: 4096, T.IQ4_NL: 127, T.IQ4_XS: 4064,
}


def finite_f16_bytes(rng: np.random.Generator, n: int, magnitude: float | None = None) -> np.ndarray:
    """``n`` fp16 values as ``[n, 2]`` bytes: any finite bit pattern (subnormals, zeros,
    negatives, 65504) when ``magnitude`` is None, else positive values near ``magnitude``."""
    if magnitude is None:
        bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
        exp_all_ones = (bits & 0x7C00) == 0x7C00
        bits[exp_all_ones] &= 0xBFFF  # drop one exponent bit: inf/nan -> a finite value
        return bits.view(np.uint8).reshape(n, 2)
    vals = (rng.uniform(0.5, 1.0, size=n) * magnitude).astype(np.float16)
    return vals.view(np.uint8).reshape(n, 2)


def random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator, magnitude: float | None = None) -> np.ndarray:
    """``[n_blocks, type_size]`` uint8 of valid random blocks of ``qtype``.

    ``magnitude``: rough size of the decoded values (None: unrestricted fp16 scales)."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    scale = None if magnitude is None else magnitude / _SPAN[qtype]
    for off in F16_FIELDS[qtype]:
        raw[:, off : off + 2] = finite_f16_bytes(rng, n_blocks, scale)
    return raw


def encode(values: np.ndarray, qtype: T, rng: np.random.Generator) -> tuple[np.ndarray, T | None, np.ndarray]:
    """A tensor in ``qtype``: ``(data for GGUFWriter.add_tensor, raw_dtype, decoded float32)``.

    gguf-py quantizes the types it can; for the others, random blocks of the same shape and
    of about the values' magnitude are made up (the decoded array says what they hold).
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == T.F32:
        return values, None, values
    if qtype == T.F16:
        data = values.astype(np.float16)
        return data, None, data.astype(np.float32)
    if qtype == T.BF16 or qtype in QUANTIZABLE:
        data = quants.quantize(values, qtype)
    elif qtype in BYTE_BUILT:
        block, type_size = GGML_QUANT_SIZES[qtype]
        rows = values.size // values.shape[-1]
        n = values.shape[-1] // block
        magnitude = float(np.abs(values).max()) or 0.1
        data = random_blocks(qtype, rows * n, rng, magnitude).reshape(*values.shape[:-1], n * type_size)
    else:
        raise ValueError(f"no encoder for {qtype.name}")
    return data, qtype, quants.dequantize(data, qtype).reshape(values.shape)


def write_gguf(
    path,
    arch: str | None,
    tensors: Mapping[str, tuple[np.ndarray, T | None]],
    metadata: Mapping[str, Any] | None = None,
    big_endian: bool = False,
) -> Path:
    """Write ``tensors`` (name -> (data, raw_dtype) as ``encode`` returns) and ``metadata``.

    Metadata values: str, bool, int (uint32), float (float32), lists (gguf-py picks the
    element type: int -> INT32), or ``(value, GGUFValueType)`` pairs. ``arch=None`` leaves
    general.architecture out.
    """
    path = Path(path)
    endian = GGUFEndian.BIG if big_endian else GGUFEndian.LITTLE
    w = GGUFWriter(str(path), arch or "unused", endianess=endian)
    if arch is None:
        w.kv_data[0].pop("general.architecture")
    for key, value in (metadata or {}).items():
        if isinstance(value, tuple):
            w.add_key_value(key, value[0], value[1])
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, (list, tuple)):
            w.add_array(key, list(value))
        else:
            raise TypeError(f"metadata {key}: unsupported value {type(value)}")
    for name, (data, raw_dtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
