"""The float8 matmul path: activation scaling, the scaled product, and when Linear uses it.

torch._scaled_mm runs on the CPU too, so the real kernel is exercised here; its result is
checked against the product written out in float64 from the float8 operands (numbers the
kernel did not compute), and against the dense bf16 result for accuracy.
"""
from __future__ import annotations

import logging

import pytest
import torch

import references as refs

from qwenimage_pack.core.quant import fp8_matmul
from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT
from qwenimage_pack.core.layers.run_options import RunOptions
from qwenimage_pack.core.layers.linear import Linear

E4M3 = torch.float8_e4m3fn
pytestmark = pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="torch without _scaled_mm")


OFF = RunOptions(fp8_matmul=None)


def _on(mode="auto", cpu=True) -> RunOptions:
    """The float8 path as a call asks for it; ``cpu``: let the CPU run torch._scaled_mm."""
    return RunOptions(fp8_matmul=mode, fp8_on_cpu=cpu)


@pytest.fixture(autouse=True)
def _forget_refusals():
    fp8_matmul.reset()
    yield
    fp8_matmul.reset()


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _fp8_weight(out_f, in_f, seed=0):
    """An e4m3 weight with a per-tensor scale, quantized the way the loader does (amax / 448)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * in_f**-0.5
    scale = w.abs().amax() / 448
    return (w / scale).to(E4M3), scale, w


def _linear(out_f=48, in_f=64, bias=True, dtype=torch.bfloat16, seed=0):
    wq, scale, _ = _fp8_weight(out_f, in_f, seed)
    lin = Linear(in_f, out_f, bias=bias, dtype=dtype)
    lin.weight = torch.nn.Parameter(wq, requires_grad=False)
    lin.set_scale(scale)
    if bias:
        with torch.no_grad():
            lin.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return lin


@pytest.mark.parametrize("mode", fp8_matmul.MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_activation_quantization(mode, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 64, generator=g) * torch.logspace(-1, 3, 6)[:, None]).to(dtype)
    q, s = fp8_matmul.quantize_activation(x, mode)
    assert q.dtype == E4M3 and s.dtype == torch.float32
    assert s.shape == ((6, 1) if mode == "row" else ())
    # scales are powers of two, and the largest value lands in the top binade of float8
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    amax = x.float().abs().amax(dim=-1, keepdim=True) if mode == "row" else x.float().abs().amax()
    assert bool(((amax / s) <= 448).all()) and bool(((amax / s) > 224).all())
    # q is x / s rounded once to float8 (the division by a power of two is exact)
    expected = (x.double() / s.double()).to(E4M3)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))


def test_activation_scale_edge_cases():
    zero = torch.zeros(2, 32, dtype=torch.bfloat16)
    q, s = fp8_matmul.quantize_activation(zero, "row")
    assert torch.equal(q.float(), zero.float()) and bool(torch.isfinite(s).all())
    tiny = torch.full((1, 32), 1e-6, dtype=torch.float16)  # amax / 448 is below float16's range
    q, s = fp8_matmul.quantize_activation(tiny, "tensor")
    assert float(s) > 0 and bool(torch.isfinite(q.float()).all())
    assert abs(float(q.float()[0, 0] * s) - 1e-6) < 1e-7
    bad = torch.tensor([[1.0, float("nan")] + [0.0] * 30], dtype=torch.bfloat16)
    q, _ = fp8_matmul.quantize_activation(bad, "row")
    assert not bool(torch.isfinite(q.float()).all())  # a NaN is not hidden


@pytest.mark.parametrize("mode", fp8_matmul.MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_scaled_linear_matches_float64_product(mode, bias):
    wq, sw, w = _fp8_weight(48, 64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(48, generator=g).to(torch.bfloat16) if bias else None
    y = fp8_matmul.scaled_linear(x, wq, sw, b, mode)
    assert y.shape == (3, 5, 48) and y.dtype == torch.bfloat16

    q, sx = fp8_matmul.quantize_activation(x.reshape(-1, 64), mode)
    ref = (q.double() * sx.double()) @ (wq.double() * sw.double()).t()
    if bias:
        ref = ref + b.double()
    # the kernel accumulates in float32 and rounds once to bf16
    assert _rel(y.reshape(-1, 48), ref) < 4e-3
    # and it is an accurate stand-in for the dense product on the original weights
    dense = x.double() @ w.double().t() + (b.double() if bias else 0)
    assert _rel(y, dense) < 0.06


def test_row_scaling_survives_outlier_tokens():
    """One token 1e6 times larger than the rest (Qwen-Image has such tokens): per-row scales
    keep the small tokens accurate; a per-tensor scale flushes them; no scale at all (a plain
    cast, as fp8 'fast' modes do) clips the large one."""
    wq, sw, w = _fp8_weight(32, 64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, generator=g)
    x[0] *= 1e6
    x = x.to(torch.bfloat16)
    dense = x.double() @ (wq.double() * sw.double()).t()
    row = fp8_matmul.scaled_linear(x, wq, sw, None, "row")
    tensor = fp8_matmul.scaled_linear(x, wq, sw, None, "tensor")
    assert _rel(row[1:], dense[1:]) < 0.06
    assert _rel(tensor[1:], dense[1:]) > 0.2
    unscaled = torch._scaled_mm(x.clamp(-448, 448).to(E4M3), wq.t(), scale_a=torch.tensor(1.0),
                                scale_b=sw.float(), out_dtype=torch.bfloat16)
    assert _rel(unscaled[:1], dense[:1]) > 0.5
    assert _rel(row[:1], dense[:1]) < 0.06


def test_float8_matmul_runs_only_when_asked_and_possible_otherwise_exact_dequantize():
    lin = _linear()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    exact = torch.nn.functional.linear(x, lin.dense_weight(torch.bfloat16), lin.bias)

    assert torch.equal(lin(x, OFF), exact)  # off: the dequantize path, bit for bit
    assert torch.equal(lin(x), exact)  # no options: the defaults, which never run float8 on a CPU

    assert torch.equal(lin(x, _on(cpu=False)), exact)  # asked for, but the CPU has no float8 tensor cores
    assert not fp8_matmul.device_supports(torch.device("cpu"))

    on = _on("row")
    y = lin(x, on)
    assert torch.equal(y, fp8_matmul.scaled_linear(x, lin.weight, lin.weight_scale, lin.bias, "row"))
    assert not torch.equal(y, exact) and _rel(y, exact) < 0.06
    assert torch.equal(lin(x, OFF), exact)  # the next call without it is exact again: nothing stayed switched

    # what the kernel cannot take goes the exact way
    assert torch.equal(lin(x.float(), on),
                       torch.nn.functional.linear(x.float(), lin.dense_weight(torch.float32), lin.bias.float()))
    odd = _linear(out_f=40, in_f=56)  # not multiples of 16
    xo = x[:, :56].contiguous()
    assert torch.equal(odd(xo, on), torch.nn.functional.linear(xo, odd.dense_weight(torch.bfloat16), odd.bias))
    e5 = _linear()
    e5.weight = torch.nn.Parameter(lin.weight.float().to(torch.float8_e5m2), requires_grad=False)
    assert torch.equal(e5(x, on), torch.nn.functional.linear(x, e5.dense_weight(torch.bfloat16), e5.bias))
    plain = Linear(64, 48, dtype=torch.bfloat16)
    assert torch.equal(plain(x, on), torch.nn.functional.linear(x, plain.weight, plain.bias))


def test_lora_patches_still_apply_on_the_fp8_path():
    lin = _linear()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    base = lin(x, _on())
    lin.add_patch("test", lambda inp, y: y + 1.0)
    assert torch.equal(lin(x, _on()), base + 1.0)


def test_refused_kernel_falls_back_once(monkeypatch, caplog):
    lin = _linear()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    exact = torch.nn.functional.linear(x, lin.dense_weight(torch.bfloat16), lin.bias)
    calls = []
    real = torch._scaled_mm

    def refuse_rowwise(a, b, scale_a, scale_b, **kw):
        calls.append(scale_a.numel())
        if scale_a.numel() > 1:
            raise RuntimeError("row-wise scaling is not supported on this device")
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", refuse_rowwise)
    with caplog.at_level(logging.WARNING):
        y1 = lin(x, _on())
        y2 = lin(x, _on())
    assert torch.equal(y1, fp8_matmul.scaled_linear(x, lin.weight, lin.weight_scale, lin.bias, "tensor"))
    assert torch.equal(y1, y2)
    # row (bias fused), row (bias added), then per-tensor; the second call goes straight there
    assert calls[:4] == [4, 4, 1, 1]
    assert sum("row scaling" in r.message for r in caplog.records) == 2

    def refuse_all(*a, **kw):
        raise RuntimeError("no float8 here")

    monkeypatch.setattr(torch, "_scaled_mm", refuse_all)
    fp8_matmul.reset()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert torch.equal(lin(x, _on()), exact)
        assert torch.equal(lin(x, _on()), exact)
    assert sum("dequantizing" in r.message for r in caplog.records) == 1


def test_bias_added_outside_the_kernel_matches():
    wq, sw, _ = _fp8_weight(48, 64)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    b = torch.randn(48).to(torch.bfloat16)
    fused = fp8_matmul.scaled_linear(x, wq, sw, b, "row", bias_in_kernel=True)
    added = fp8_matmul.scaled_linear(x, wq, sw, b, "row", bias_in_kernel=False)
    assert _rel(added, fused) < 8e-3  # one extra bf16 rounding


def test_bad_mode():
    with pytest.raises(ValueError, match="auto, row, tensor"):
        RunOptions(fp8_matmul="fast")
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="auto, row, tensor"):
        fp8_matmul.try_linear(x, _linear().weight, None, None, "fast")


def test_tiny_mmdit_fp8_matmul_close_to_dequantized():
    """A whole (tiny) MMDiT with float8 block weights: the float8 matmul path stays close to
    the dequantize path on the same weights."""
    torch.manual_seed(0)
    cfg = MMDiTConfig(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48,
                      axes_dims_rope=(4, 14, 14))
    model = refs.fp8_block_weights(QwenImageMMDiT(cfg).eval())
    model.compute_dtype = torch.bfloat16
    x = torch.randn(1, 16, 8, 8)
    ctx = torch.randn(1, 5, 48)
    with torch.inference_mode():
        ref = model(x, torch.tensor([0.7]), ctx, options=OFF)
        out = model(x, torch.tensor([0.7]), ctx, options=_on())
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 0.08
