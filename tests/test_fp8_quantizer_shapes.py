"""The compiled float8 activation quantizer is checked against the eager one for every new shape.

It is compiled once with dynamic shapes, but the compiler may still generate different code per
shape (other reduction splits, other guards), so a result that was exact for the first shape
proves nothing for the next. Each new (mode, shape, dtype, device) is compared with the eager
quantizer on its first call; a difference sends the mode back to eager for good. The record of
checked shapes is bounded.

No GPU here: the CPU is allowed to take the compiled path and ``torch.compile`` is replaced by
a stand-in that is exact except for one shape (the eager quantizer is the reference).
"""
from __future__ import annotations

import logging

import pytest
import torch

from qwenimage_pack.core.quant import fp8_matmul

GOOD, BAD = (8, 64), (24, 64)


@pytest.fixture
def fake_compiled(monkeypatch):
    """``torch.compile`` -> a quantizer that is wrong (its scales doubled) for BAD-shaped inputs;
    returns the list of shapes it was called with."""
    calls = []

    def fake_compile(fn, **kwargs):
        def compiled(x, mode):
            calls.append(tuple(x.shape))
            q, scale = fn(x, mode)
            return (q, scale * 2) if tuple(x.shape) == BAD else (q, scale)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(fp8_matmul, "_COMPILE_ON", ("cpu",))
    fp8_matmul.forget_compiled()
    yield calls
    fp8_matmul.forget_compiled()


def _x(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16) * 30


def _same(a, b):
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def test_every_new_shape_is_checked(fake_compiled, caplog):
    for seed in range(3):  # first call checks, later calls of the same shape use the compiled code
        x = _x(GOOD, seed)
        assert _same(fp8_matmul.quantize(x, "row"), fp8_matmul.quantize_activation(x, "row"))
    assert fake_compiled.count(GOOD) == 3

    with caplog.at_level(logging.WARNING):
        for seed in range(3):  # a new shape where the compiled code is wrong: never returned
            x = _x(BAD, seed)
            assert _same(fp8_matmul.quantize(x, "row"), fp8_matmul.quantize_activation(x, "row"))
    assert sum("differs" in r.getMessage() for r in caplog.records) == 1
    # One difference and the mode stays eager, for every shape.
    before = len(fake_compiled)
    x = _x(GOOD, 5)
    assert _same(fp8_matmul.quantize(x, "row"), fp8_matmul.quantize_activation(x, "row"))
    assert len(fake_compiled) == before


def test_checked_shapes_are_bounded(fake_compiled, monkeypatch):
    monkeypatch.setattr(fp8_matmul, "MAX_CHECKED_SHAPES", 4)
    for m in range(1, 12):
        fp8_matmul.quantize(_x((m, 32)), "tensor")
    assert len(fp8_matmul.checked_shapes()) == 4
    # A shape that fell out of the record is checked again (eager and compiled) on its next call.
    n = len(fake_compiled)
    fp8_matmul.quantize(_x((1, 32)), "tensor")
    assert len(fake_compiled) == n + 1 and ("tensor", (1, 32)) in {k[:2] for k in fp8_matmul.checked_shapes()}
