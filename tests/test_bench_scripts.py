"""The GPU benchmarks run end to end in --smoke mode (tiny shapes, CPU): proves the scripts
execute and print their table last. Also the CPU-checkable parts of the GPU fast paths they
use: the fused-dequantization wrapper (gguf_kernels) and the attention NaN guard.
"""
from __future__ import annotations

import importlib
import logging
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from qwenimage_pack.core.layers import attention
from qwenimage_pack.core.quant import compiling, gguf_dequant as dequant, gguf_kernels
from qwenimage_pack.core.layers.linear import Linear

BENCH = ROOT / "bench"
SCRIPTS = {
    "bench_gguf_forward": "MMDiT forward",
    "bench_fp8_forward": "fp8 vs bf16",
    "bench_lowvram": "Seconds per step",
    "bench_vae": "VAE decode",
    "bench_lora": "LoRA on the MMDiT",
    "bench_e2e": "End-to-end",
    "bench_formats": "Compact formats",
}


def _bench_module(name):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_bench_smoke(name, capsys):
    module = _bench_module(name)
    module.main(["--smoke"])
    out = capsys.readouterr().out
    assert out.startswith("date ") and "| GPU cpu |" in out.splitlines()[0]
    table = out[out.rindex("\n" + SCRIPTS[name]):]
    assert "smoke run" in table and "|---" in table
    # the table is the last thing printed
    assert all(line.startswith(("|", "- ")) for line in table.strip().splitlines()[1:])
    assert "out of memory" not in table and "non-finite" not in table


def test_mmdit_forward_bench_smoke(capsys):
    module = _bench_module("bench_mmdit_forward")
    module.main(["--device", "cpu", "--dtype", "fp32", "--layers", "1", "--heads", "2", "--head-dim", "32",
                 "--joint-dim", "64", "--sizes", "64", "--batches", "1", "--text-tokens", "8", "--warmup", "0",
                 "--iters", "1", "--models", "ours"])
    assert "FLOP floor" in capsys.readouterr().out


def test_gguf_templates_decode_to_sane_weights():
    common = _bench_module("common")
    from gguf import GGMLQuantizationType as T, quants

    for name in ("Q8_0", "Q4_0", "Q4_K", "Q6_K"):
        raw = common.quantized_rows(name, 300, 512, seed=1, device="cpu")
        assert raw.dtype == torch.uint8 and raw.shape[0] == 300
        values = quants.dequantize(raw.numpy(), T[name])
        assert values.shape == (300, 512) and np.isfinite(values).all()
        assert 0 < np.abs(values).max() < 1.0  # about 2 / sqrt(512)


# -- fused dequantization (gguf_kernels) ---------------------------------------------------------

def _q4k_blocks(rows=4, cols=512):
    common = _bench_module("common")
    return common.quantized_rows("Q4_K", rows, cols, seed=3, device="cpu")


def _register_q4k():
    """Register _q4k_blocks' shape for compilation, as a model with one such weight would."""
    lin = Linear(512, 4, bias=False, device="meta")
    lin.set_quantized(_q4k_blocks(), 12, (4, 512))
    assert gguf_kernels.prepare(lin) == 1


@pytest.fixture
def fresh_fused():
    gguf_kernels.reset()
    old = gguf_kernels.min_elements
    gguf_kernels.min_elements = 0
    _register_q4k()
    yield
    gguf_kernels.min_elements = old
    gguf_kernels.reset()
    gguf_kernels.disable()


def test_fused_registration_leaves_cpu_alone(fresh_fused, monkeypatch):
    calls = []
    monkeypatch.setattr(gguf_kernels, "fused_dequantize", lambda *a: calls.append(a))
    assert gguf_kernels.enable(force=True)
    raw = _q4k_blocks()
    from gguf import GGMLQuantizationType as T, quants

    out = dequant.dequantize(raw, int(T.Q4_K), 512)
    assert torch.equal(out, torch.from_numpy(quants.dequantize(raw.numpy(), T.Q4_K)))
    assert calls == []  # registered, but CPU tensors never take the fused path
    monkeypatch.setenv("QWENIMAGE_FUSED_DEQUANT", "0")
    assert not gguf_kernels.available()


def test_fused_compiles_registered_shapes_and_matches(fresh_fused):
    raw = _q4k_blocks()
    ref = gguf_kernels._eager(raw, 12, 512, torch.bfloat16)
    other = raw[:3]  # not a registered weight shape: eager, however often
    for _ in range(2):
        assert torch.equal(gguf_kernels.fused_dequantize(other, 12, 512, torch.bfloat16), ref[:3])
    assert not gguf_kernels._compiled
    second = gguf_kernels.fused_dequantize(raw, 12, 512, torch.bfloat16)  # registered: compiled
    if gguf_kernels._failed:
        pytest.skip("torch.compile does not work in this environment (the eager fallback was used)")
    assert compiling.close_enough(second, ref, torch.bfloat16)
    assert gguf_kernels._compiled  # and kept for the next call


def test_fused_falls_back_on_compiler_errors_and_mismatches(fresh_fused, monkeypatch, caplog):
    raw = _q4k_blocks()
    ref = gguf_kernels._eager(raw, 12, 512, torch.float32)

    def broken(*a):
        raise RuntimeError("no triton")

    monkeypatch.setattr(gguf_kernels, "_build", broken)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert torch.equal(gguf_kernels.fused_dequantize(raw, 12, 512, torch.float32), ref)
    assert gguf_kernels._failed and sum("unavailable" in r.message for r in caplog.records) == 1

    gguf_kernels.reset()
    _register_q4k()
    monkeypatch.setattr(gguf_kernels, "_build", lambda *a: (lambda b: torch.zeros(4, 512)))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert torch.equal(gguf_kernels.fused_dequantize(raw, 12, 512, torch.float32), ref)
    assert sum("differs" in r.message for r in caplog.records) == 1


def test_close_tolerates_reordering_not_wrong_values():
    b = torch.randn(1000) * 3
    a = b + b.abs().max() * 2e-7 * torch.randn(1000)
    assert compiling.close_enough(a, b, torch.float32)
    c = b.clone()
    c[5] += 0.01
    assert not compiling.close_enough(c, b, torch.float32)
    nan = b.clone()
    nan[0] = float("nan")
    assert not compiling.close_enough(nan, b, torch.float32)


# -- attention NaN guard -----------------------------------------------------------------------

@pytest.fixture
def sage_backend(monkeypatch):
    monkeypatch.setattr(attention, "_load_sage", lambda: (lambda *a, **k: None))
    attention.reset()
    assert attention.resolve("sage") == "sage"
    yield
    attention.reset()


def test_attention_guard_falls_back_on_nan(sage_backend, caplog):
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    good = attention._sdpa(q, k, v, None)
    bad = torch.full_like(good, float("nan"))
    with caplog.at_level(logging.WARNING):
        out = attention._guard("sage", bad, q, k, v)
    assert torch.equal(out, good)
    assert attention.resolve("sage") == "sdpa" and attention._kernel("sage") is None
    assert "NaN" in attention.failure("sage")
    assert sum("NaN" in r.message for r in caplog.records) == 1


def test_attention_guard_trusts_finite_shapes_and_blames_bad_inputs(sage_backend):
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    out = attention._sdpa(q, k, v, None)
    for _ in range(attention._CHECKS_PER_SHAPE + 1):
        assert attention._guard("sage", out, q, k, v) is out
    assert attention.resolve("sage") == "sage"
    # after the checks the shape is trusted: no sync, output passed through as is
    nan = torch.full_like(out, float("nan"))
    assert attention._guard("sage", nan, q, k, v) is nan
    # non-finite inputs: SDPA is not finite either, so the kernel is not blamed
    q2 = q[:, :, :4].clone()
    q2[0, 0, 0, 0] = float("nan")
    bad = attention._sdpa(q2, k, v, None)
    assert attention._guard("sage", bad, q2, k, v) is bad
    assert attention.resolve("sage") == "sage"
