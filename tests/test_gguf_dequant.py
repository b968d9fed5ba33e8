"""Our torch dequantization against gguf-py's numpy reference (``gguf.quants.dequantize``).

All comparisons are bit-exact in fp32: the kernels compute in fp32 in the reference's order.
fp16 / bf16 outputs equal the reference fp32 values cast once to that dtype.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, quants

from gguf_writer_util import ALL_QUANTIZED, QUANTIZABLE, random_blocks
from qwenimage_pack.core.quant import gguf_dequant as dequant
from qwenimage_pack.core.layers.linear import Embedding, Linear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def ours(raw: np.ndarray, qtype: T, cols: int, device: str = "cpu", dtype=torch.float32) -> torch.Tensor:
    return dequant.dequantize(torch.from_numpy(raw).to(device), int(qtype), cols, dtype).cpu()


def reference(raw: np.ndarray, qtype: T, cols: int) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(raw, qtype).reshape(raw.shape[0], cols))


def assert_bit_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert torch.isfinite(b).all()
    same = a.view(torch.int32) == b.view(torch.int32)
    assert same.all(), f"{(~same).sum().item()} of {a.numel()} values differ, e.g. {a[~same][:4]} vs {b[~same][:4]}"


def test_type_table_matches_gguf():
    for qtype, spec in dequant.GGML_TYPES.items():
        ref = T(qtype)
        assert spec.name == ref.name
        assert (spec.block_size, spec.type_size) == GGML_QUANT_SIZES[ref]


@pytest.mark.parametrize("qtype", ALL_QUANTIZED, ids=lambda t: t.name)
def test_a_linear_computes_with_every_supported_type(qtype):
    """Whatever GGUF type a Linear holds, its forward is the matmul with gguf-py's dense weight."""
    block, _ = GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, 12, np.random.default_rng(int(qtype)), magnitude=1.0).reshape(6, -1)
    w = reference(raw, qtype, 2 * block)
    lin = Linear(2 * block, 6, bias=False)
    lin.set_quantized(torch.from_numpy(raw), int(qtype), (6, 2 * block))
    x = torch.randn(3, 2 * block)
    torch.testing.assert_close(lin(x), F.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_by_gguf(qtype, device):
    rng = np.random.default_rng(int(qtype))
    values = (rng.standard_normal((12, 512)) * rng.uniform(0.01, 3.0, (12, 1))).astype(np.float32)
    values[3] = 0.0  # an all-zero row: scale 0
    raw = quants.quantize(values, qtype)
    assert_bit_exact(ours(raw, qtype, 512, device), reference(raw, qtype, 512))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", ALL_QUANTIZED, ids=lambda t: t.name)
def test_random_blocks_with_any_finite_scale(qtype, device):
    """Every bit of every block random except fp16 fields, which take any finite value."""
    rng = np.random.default_rng(100 + int(qtype))
    block, type_size = GGML_QUANT_SIZES[qtype]
    rows, per_row = 16, 1024 // block
    raw = random_blocks(qtype, rows * per_row, rng).reshape(rows, per_row * type_size)
    assert_bit_exact(ours(raw, qtype, per_row * block, device), reference(raw, qtype, per_row * block))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_half_outputs_are_the_fp32_values_rounded_once(qtype, dtype):
    rng = np.random.default_rng(7)
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, 8 * 2, rng, magnitude=0.5).reshape(8, 2 * type_size)
    got = ours(raw, qtype, 2 * block, dtype=dtype)
    assert got.dtype == dtype
    assert torch.equal(got, reference(raw, qtype, 2 * block).to(dtype))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_plain_types(qtype):
    rng = np.random.default_rng(3)
    values = rng.standard_normal((5, 64)).astype(np.float32)
    raw = quants.quantize(values, qtype).view(np.uint8).reshape(5, -1)
    assert_bit_exact(ours(raw, qtype, 64), reference(raw, qtype, 64))


def test_unaligned_and_gathered_blocks():
    """Blocks that start at an odd address (a sliced buffer) or come from index_select."""
    rng = np.random.default_rng(11)
    raw = random_blocks(T.Q5_K, 6, rng).reshape(6, -1)
    buf = torch.zeros(raw.size + 1, dtype=torch.uint8)
    buf[1:] = torch.from_numpy(raw.reshape(-1))
    odd = buf[1:].view(6, -1)
    assert odd.storage_offset() == 1
    ref = reference(raw, T.Q5_K, 256)
    assert_bit_exact(dequant.dequantize(odd, int(T.Q5_K), 256), ref)
    picked = torch.from_numpy(raw).index_select(0, torch.tensor([4, 1]))
    assert_bit_exact(dequant.dequantize(picked, int(T.Q5_K), 256), ref[[4, 1]])


def test_linear_and_embedding_use_the_blocks():
    rng = np.random.default_rng(5)
    values = rng.standard_normal((48, 64)).astype(np.float32)
    raw = quants.quantize(values, T.Q8_0)
    w = reference(raw, T.Q8_0, 64)

    lin = Linear(64, 48)
    lin.set_quantized(torch.from_numpy(raw), int(T.Q8_0), (48, 64))
    x = torch.randn(3, 64)
    assert torch.equal(lin(x), F.linear(x, w, lin.bias))

    emb = Embedding(48, 64)
    emb.set_quantized(torch.from_numpy(raw), int(T.Q8_0), (48, 64))
    ids = torch.tensor([[3, 0, 47], [5, 5, 1]])
    assert torch.equal(emb(ids), w[ids])


def test_unsupported_types_and_malformed_blocks_are_refused_by_name():
    raw = torch.zeros(2, 34, dtype=torch.uint8)
    with pytest.raises(ValueError, match="IQ2_XXS.*supported: .*Q4_K"):
        dequant.dequantize(raw, int(T.IQ2_XXS), 256)
    with pytest.raises(ValueError, match="unknown type id 99"):
        dequant.dequantize(raw, 99, 32)
    with pytest.raises(ValueError, match="34 bytes per row"):
        dequant.dequantize(raw[:, :33], int(T.Q8_0), 32)
    with pytest.raises(ValueError, match="uint8"):
        dequant.dequantize(raw.float(), int(T.Q8_0), 32)


def test_fused_kernel_hook_is_used_off_cpu_only():
    calls = []

    def fake(blocks, qtype, cols, dtype):
        calls.append(qtype)
        return torch.zeros(blocks.shape[0], cols, dtype=dtype, device=blocks.device)

    raw_np = quants.quantize(np.ones((2, 32), np.float32), T.Q8_0)
    raw = torch.from_numpy(raw_np)
    dequant.register_fused(int(T.Q8_0), fake)
    try:
        assert_bit_exact(dequant.dequantize(raw, int(T.Q8_0), 32), reference(raw_np, T.Q8_0, 32))
        assert calls == []
        meta = raw.to("meta")
        assert dequant.dequantize(meta, int(T.Q8_0), 32).shape == (2, 32)
        assert calls == [int(T.Q8_0)]
    finally:
        dequant.register_fused(int(T.Q8_0), None)
