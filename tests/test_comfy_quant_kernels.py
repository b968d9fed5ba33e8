"""Compiled decoding of ComfyUI's layer formats (core/quant/comfy_quant_kernels.py), its bookkeeping on the CPU.

No GPU here: tensors count as on a GPU (``_on_gpu``) and the compile step (``_build``) is a recorder
returning the eager decoder, so what is compiled, when, and what falls back can be checked.
tests/test_cuda_formats.py runs the real compiler on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from qwenimage_pack.core.layers.linear import Linear
from qwenimage_pack.core.quant import comfy_quant, comfy_quant_kernels as kernels

ck_tensor = pytest.importorskip("comfy_kitchen.tensor")


def _linear(out_f: int, in_f: int, seed: int = 0) -> Linear:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.02
    qt = ck_tensor.QuantizedTensor.from_float(w, "TensorWiseINT8Layout", per_channel=True)
    stored = qt.state_dict("weight")
    lin = Linear(in_f, out_f, bias=False, device="meta")
    lin.set_comfy_quant(stored["weight"], {"weight_scale": stored["weight_scale"]},
                        comfy_quant.parse_layer_config({"format": "int8_tensorwise"}), (out_f, in_f))
    return lin


@pytest.fixture
def builds(monkeypatch):
    kernels.reset()
    monkeypatch.setattr(kernels, "min_elements", 0)
    monkeypatch.setattr(kernels, "_on_gpu", lambda t: True)
    built = []

    def fake_build(quant, out_f, in_f, dtype):
        built.append((quant.format, out_f, in_f, dtype))
        return lambda weight, side: comfy_quant.dequantize(quant, weight, side, out_f, in_f, dtype)

    monkeypatch.setattr(kernels, "_build", fake_build)
    yield built
    kernels.reset()


def test_only_prepared_shapes_compile_once_and_decode_the_same(builds):
    model = torch.nn.Sequential(_linear(32, 64), _linear(32, 64, seed=1), _linear(48, 64))
    assert kernels.prepare(model) == 2  # two distinct (format, shape) keys
    x = torch.randn(3, 64)
    eager = [m(x) for m in model]
    fused = [m(x) for m in model]  # default options: fused decoding
    assert all(torch.equal(a, b) for a, b in zip(eager, fused))
    assert sorted(builds) == [("int8_tensorwise", 32, 64, torch.float32), ("int8_tensorwise", 48, 64, torch.float32)]

    other = _linear(16, 64)  # never prepared: eager, nothing compiled
    other(x)
    assert len(builds) == 2


def test_bounded_and_a_mismatch_falls_back(builds, monkeypatch):
    monkeypatch.setattr(kernels, "max_compiled", 2)
    model = torch.nn.Sequential(*[_linear(8 * (i + 1), 64, seed=i) for i in range(4)])
    assert kernels.prepare(model) == 2 and len(kernels._registered) == 2

    monkeypatch.setattr(kernels, "_build", lambda *a: (lambda weight, side: torch.zeros(a[1], a[2])))
    lin = model[3]  # the largest: registered
    ref = comfy_quant.dequantize(lin.comfy_quant, lin.weight, lin.quant_side(), 32, 64, torch.float32)
    out = lin.dense_weight(torch.float32)
    assert torch.equal(out, ref)  # the wrong compiled result was caught
    layout = kernels.layout(lin.weight, lin.quant_side())
    assert kernels._compiled[(lin.comfy_quant, 32, 64, torch.float32, lin.weight.device, layout)] is kernels._EAGER


def test_a_compiler_failure_switches_the_feature_off(builds, monkeypatch):
    lin = _linear(32, 64)
    kernels.prepare(lin)

    def broken(*a):
        raise RuntimeError("no triton")

    monkeypatch.setattr(kernels, "_build", broken)
    ref = comfy_quant.dequantize(lin.comfy_quant, lin.weight, lin.quant_side(), 32, 64, torch.float32)
    assert torch.equal(lin.dense_weight(torch.float32), ref)
    assert not kernels.available()
