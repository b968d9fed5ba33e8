"""Compiled GGUF dequantization (gguf_kernels) compiles exactly the shapes registered up front.

The weights a model dequantizes every step are known from the model: ``prepare(module)``
registers the (type, shape) of each quantized Linear weight. Nothing else is compiled, however
often it recurs (a text encoder's embedding-row gathers, one-off tensors), so such calls can
never take the compile slots the model's weights need; their results stay the exact eager ones.
The registry and the compiled functions stay bounded.

No GPU here: ``fused_dequantize`` is called directly on CPU tensors and the compile step
(``_build``) is replaced by a recorder that returns the eager kernel; gguf-py decodes the
reference values.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, quants

from qwenimage_pack.core.quant import gguf_dequant as dequant, gguf_kernels
from qwenimage_pack.core.layers.linear import Embedding, Linear


def q8_blocks(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    values = np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(quants.quantize(values, T.Q8_0)))


def reference(blocks: torch.Tensor, qtype=T.Q8_0) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(blocks.numpy(), qtype))


def quantized_linear(rows: int, cols: int, seed: int = 0, qtype=T.Q8_0) -> Linear:
    lin = Linear(cols, rows, bias=False, device="meta")
    if qtype == T.Q8_0:
        blocks = q8_blocks(rows, cols, seed)
    else:
        block, size = GGML_QUANT_SIZES[qtype]
        blocks = torch.zeros(rows, cols // block * size, dtype=torch.uint8)
    lin.set_quantized(blocks, int(qtype), (rows, cols))
    return lin


@pytest.fixture
def builds(monkeypatch):
    """Fresh state, every size worth compiling, and a stand-in compiler that records its keys."""
    gguf_kernels.reset()
    monkeypatch.setattr(gguf_kernels, "min_elements", 0)
    built = []

    def fake_build(qtype, rows, cols, dtype):
        built.append((qtype, rows, cols, dtype))
        return lambda b: dequant.dequantize(b, qtype, cols, dtype)  # eager on the CPU: exact

    monkeypatch.setattr(gguf_kernels, "_build", fake_build)
    yield built
    gguf_kernels.reset()
    gguf_kernels.disable()


def test_only_registered_shapes_compile(builds):
    model = nn.Module()
    model.a, model.b = quantized_linear(64, 256, seed=1), quantized_linear(32, 256, seed=2)
    model.emb = Embedding(500, 256, device="meta")
    model.emb.set_quantized(q8_blocks(500, 256, seed=3), int(T.Q8_0), (500, 256))
    assert gguf_kernels.prepare(model) == 2  # the two Linear weights; embedding tables are gathered from
    assert gguf_kernels.prepare(model) == 2  # idempotent

    # An embedding gather: recurring, large, unregistered: eager every time, never compiled.
    rows = model.emb.weight.index_select(0, torch.arange(40))
    for _ in range(5):
        assert torch.equal(gguf_kernels.fused_dequantize(rows, int(T.Q8_0), 256, torch.float32), reference(rows))
    assert builds == []

    # A registered weight compiles on its first call (no second sighting needed), once.
    w = model.a.weight
    for _ in range(3):
        assert torch.equal(gguf_kernels.fused_dequantize(w, int(T.Q8_0), 256, torch.float32), reference(w))
    assert builds == [(int(T.Q8_0), 64, 256, torch.float32)]


def test_state_stays_bounded(builds, monkeypatch):
    monkeypatch.setattr(gguf_kernels, "max_compiled", 4)
    big = nn.ModuleList(quantized_linear(8 * (i + 1), 256, seed=i) for i in range(10))
    assert gguf_kernels.prepare(big) == 4
    # The largest weights win the slots (most bytes dequantized per step).
    assert gguf_kernels.registered() == {(int(T.Q8_0), 8 * (i + 1), 256) for i in range(6, 10)}
    # Thousands of unregistered shapes leave no trace.
    for n in range(1, 300):
        blocks = q8_blocks(n, 32, seed=n)
        gguf_kernels.fused_dequantize(blocks, int(T.Q8_0), 32, torch.float32)
    assert builds == [] and not gguf_kernels._compiled
    for lin in big:
        gguf_kernels.fused_dequantize(lin.weight, int(T.Q8_0), 256, torch.float32)
    assert len(builds) == 4 and len(gguf_kernels._compiled) == 4

    # Another model prepared later takes the slots over; the old compiled functions are dropped.
    other = nn.ModuleList([quantized_linear(16, 512, seed=20), quantized_linear(24, 512, seed=21)])
    gguf_kernels.prepare(other)
    assert {(int(T.Q8_0), 16, 512), (int(T.Q8_0), 24, 512)} <= gguf_kernels.registered()
    assert len(gguf_kernels.registered()) <= 4 and len(gguf_kernels._compiled) <= 4
    for lin in other:
        gguf_kernels.fused_dequantize(lin.weight, int(T.Q8_0), 512, torch.float32)
    assert builds[-2:] == [(int(T.Q8_0), 16, 512, torch.float32), (int(T.Q8_0), 24, 512, torch.float32)]


def test_small_weights_are_not_registered(builds, monkeypatch):
    monkeypatch.setattr(gguf_kernels, "min_elements", 64 * 256)
    model = nn.ModuleList([quantized_linear(64, 256), quantized_linear(8, 256)])
    assert gguf_kernels.prepare(model) == 1
    assert gguf_kernels.registered() == {(int(T.Q8_0), 64, 256)}


def test_enable_still_registers_the_fused_path(builds):
    assert gguf_kernels.enable(force=True)
    assert gguf_kernels.prepare(nn.Module()) == 0


def test_a_wrong_compiled_result_or_a_compiler_failure_falls_back(builds, monkeypatch):
    """The first result of a compiled kernel is checked against gguf-py's values: a wrong one
    makes that shape eager for good; a compiler error turns compiled dequantization off."""
    a, b = quantized_linear(64, 256, seed=1), quantized_linear(32, 256, seed=2)
    gguf_kernels.prepare(nn.ModuleList([a, b]))
    monkeypatch.setattr(gguf_kernels, "_build",
                        lambda qtype, rows, cols, dtype: (lambda blocks: torch.zeros(rows, cols)))
    assert torch.equal(gguf_kernels.fused_dequantize(a.weight, int(T.Q8_0), 256, torch.float32), reference(a.weight))
    assert gguf_kernels._compiled[(int(T.Q8_0), tuple(a.weight.shape), 256, torch.float32, a.weight.device)] \
        is gguf_kernels._EAGER

    def broken(*args):
        raise RuntimeError("no triton")

    monkeypatch.setattr(gguf_kernels, "_build", broken)
    assert torch.equal(gguf_kernels.fused_dequantize(b.weight, int(T.Q8_0), 256, torch.float32), reference(b.weight))
    assert gguf_kernels._failed
