"""ComfyUI's mixed-precision layers (core/quant/comfy_quant.py) on CUDA against comfy-kitchen on the CPU.

Marked ``cuda`` and skipped without CUDA; bench/gpu_check.sh runs it with tests/test_cuda_paths.py.
Weights are quantized on the CPU with comfy-kitchen (carried to the GPU machine as its
pure-Python wheel); kitchen's CPU ``dequantize`` is the reference for our decoding on the GPU,
eager and compiled, and for a quantized Linear's forward in bf16.
``QWENIMAGE_CUDA_TESTS_ON=cpu`` runs the same checks on the CPU (debugging this file only).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from qwenimage_pack.core.layers.linear import Linear
from qwenimage_pack.core.quant import comfy_quant

STAND_IN = os.environ.get("QWENIMAGE_CUDA_TESTS_ON", "").strip().lower() == "cpu"
DEV = torch.device("cpu" if STAND_IN else "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not STAND_IN and not torch.cuda.is_available(),
                       reason="needs CUDA (bench/gpu_check.sh runs these on a GPU)"),
]

# JSON as ComfyUI writes it, kitchen layout, its arguments. Sizes as in Qwen-Image's blocks (scaled down).
FORMATS = {
    "nvfp4": ({"format": "nvfp4"}, "TensorCoreNVFP4Layout", {}),
    "mxfp8": ({"format": "mxfp8"}, "TensorCoreMXFP8Layout", {}),
    "int8_rowwise": ({"format": "int8_tensorwise"}, "TensorWiseINT8Layout", {"per_channel": True}),
    "int8_convrot": ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256},
                     "TensorWiseINT8Layout", {"per_channel": True, "convrot": True, "convrot_groupsize": 256}),
    "convrot_w4a4": ({"format": "convrot_w4a4", "convrot_groupsize": 256}, "TensorCoreConvRotW4A4Layout",
                     {"convrot_groupsize": 256}),
    "w4a8": ({"format": "asym_w4a8_int8", "group_size": 16, "convrot_groupsize": 256}, "AsymW4A8Int8Layout",
             {"group_size": 16, "convrot_groupsize": 256}),
}
OUT, IN = 384, 1024


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _layer(fmt: str):
    """(LayerQuant, stored weight, side tensors, kitchen's dense fp32 weight), all on the CPU."""
    ck = pytest.importorskip("comfy_kitchen.tensor")
    conf, layout, kw = FORMATS[fmt]
    g = torch.Generator().manual_seed(sum(map(ord, fmt)))
    w = torch.randn(OUT, IN, generator=g) * 0.02
    qt = ck.QuantizedTensor.from_float(w, layout, **kw)
    stored = {k: t.contiguous() for k, t in qt.state_dict("weight").items()}
    quant = comfy_quant.parse_layer_config(conf)
    side = {k: v.view(torch.uint8) if "e8m0" in str(v.dtype) else v
            for k, v in stored.items() if k in comfy_quant.SIDE_TENSORS[quant.format]}
    return quant, stored["weight"], side, qt.dequantize().float()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_decoding_on_the_gpu_equals_kitchen(fmt):
    quant, weight, side, ref = _layer(fmt)
    out = comfy_quant.dequantize(quant, weight.to(DEV), {k: v.to(DEV) for k, v in side.items()}, OUT, IN, torch.float32)
    assert out.device.type == DEV.type
    # Table lookups and products are exact; the ConvRot rotation is a matmul whose sums the GPU orders its own way.
    assert _rel(out, ref) <= (1e-6 if quant.convrot or quant.format == "asym_w4a8_int8" else 0.0)


@pytest.mark.parametrize("fmt", ["nvfp4", "int8_convrot"])
def test_compiled_decoding_is_as_close_to_kitchen_as_eager(fmt):
    """In bf16 the compiler keeps products in fp32 and rounds once, where eager rounds each
    product: the two may differ by a bf16 step, never by more than eager's own rounding."""
    quant, weight, side, ref = _layer(fmt)
    weight, side = weight.to(DEV), {k: v.to(DEV) for k, v in side.items()}
    eager = comfy_quant.dequantize(quant, weight, side, OUT, IN, torch.bfloat16)
    compiled = torch.compile(comfy_quant.dequantize, fullgraph=True, dynamic=False)
    assert _rel(compiled(quant, weight, side, OUT, IN, torch.bfloat16), ref) <= max(_rel(eager, ref), 2 ** -9)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_quantized_linear_in_bf16_on_the_gpu(fmt):
    quant, weight, side, ref = _layer(fmt)
    lin = Linear(IN, OUT, bias=True, device="meta")
    lin.bias = torch.nn.Parameter(torch.randn(OUT) * 0.1, requires_grad=False)
    lin.set_comfy_quant(weight, side, quant, (OUT, IN))
    lin.to(DEV)
    x = torch.randn(7, IN, generator=torch.Generator().manual_seed(3))
    expected = F.linear(x, ref, lin.bias.float().cpu())
    got = lin(x.to(DEV, torch.bfloat16))
    assert got.dtype == torch.bfloat16 and _rel(got, expected) <= 2e-2


@pytest.mark.parametrize("fmt", ["int8_rowwise", "int8_convrot"])
def test_int8_tensor_core_matmul_against_the_decoded_weight(fmt):
    """RunOptions.int8_matmul on the GPU: torch._int_mm with per-token activations, against the
    decoded weight and against the same int8 arithmetic run on the CPU."""
    from qwenimage_pack.core.layers.run_options import RunOptions

    quant, weight, side, ref = _layer(fmt)
    lin = Linear(IN, OUT, bias=False, device="meta")
    lin.set_comfy_quant(weight, side, quant, (OUT, IN))
    x = torch.randn(77, IN, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    on_cpu = lin(x, RunOptions(int8_matmul=True, int8_on_cpu=True))
    lin.to(DEV)
    got = lin(x.to(DEV), RunOptions(int8_matmul=True, int8_on_cpu=STAND_IN))
    assert _rel(got, x.float() @ ref.T) <= 2e-2
    assert _rel(got, on_cpu) <= 1e-2
    assert not torch.equal(got.cpu(), lin(x.to(DEV)).cpu())  # the int8 path ran


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_block_scaled_tensor_core_matmul_against_its_emulation(fmt):
    """RunOptions.blockscaled_matmul on a Blackwell GPU: comfy-kitchen's scaled_mm_nvfp4 /
    scaled_mm_mxfp8 against the same quantized operands multiplied on the CPU (kitchen's decoders,
    float32) and against the decoded weight. Skipped on older GPUs (an H200 has no such cores)."""
    from qwenimage_pack.core.layers.run_options import RunOptions
    from qwenimage_pack.core.quant import blockscaled_matmul

    if not STAND_IN and not blockscaled_matmul.device_supports(DEV):
        pytest.skip("needs block-scaled tensor cores (sm_100 / sm_120) and comfy-kitchen")
    quant, weight, side, ref = _layer(fmt)
    lin = Linear(IN, OUT, bias=True, device="meta")
    lin.bias = torch.nn.Parameter(torch.randn(OUT, generator=torch.Generator().manual_seed(5)) * 0.1,
                                  requires_grad=False)
    lin.set_comfy_quant(weight, side, quant, (OUT, IN))
    x = torch.randn(77, IN, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    on_cpu = lin(x, RunOptions(blockscaled_matmul=True, blockscaled_on_cpu=True))
    lin.to(DEV)
    blockscaled_matmul.reset()
    got = lin(x.to(DEV), RunOptions(blockscaled_matmul=True, blockscaled_on_cpu=STAND_IN))
    assert not blockscaled_matmul._failed  # the kernel ran, no fallback
    assert _rel(got, F.linear(x.float(), ref, lin.bias.float().cpu())) <= (0.12 if fmt == "nvfp4" else 0.04)
    # The same quantized operands: only the order of the float32 sums and a last bf16 rounding differ.
    assert _rel(got, on_cpu) <= 5e-3
    assert not torch.equal(got.cpu(), lin(x.to(DEV)).cpu())  # the quantized-activation path ran


@pytest.mark.parametrize("fmt", ["nvfp4", "int8_convrot"])
def test_prepared_layers_decode_through_the_compiler(fmt):
    """comfy_quant_kernels: a prepared layer's weight is decoded by its compiled kernel on the GPU,
    checked against eager on its first call and kept (not dropped as different, no compiler failure)."""
    from qwenimage_pack.core.quant import comfy_quant_kernels as kernels

    quant, weight, side, ref = _layer(fmt)
    lin = Linear(IN, OUT, bias=False, device="meta")
    lin.set_comfy_quant(weight, side, quant, (OUT, IN))
    lin.to(DEV)
    kernels.reset()
    old = kernels.min_elements
    kernels.min_elements = 0
    try:
        assert kernels.prepare(lin) == 1
        if STAND_IN:
            pytest.skip("the compiled path runs on GPU tensors only")
        w = lin.dense_weight(torch.bfloat16, DEV)
        key = (quant, OUT, IN, torch.bfloat16, w.device)
        assert not kernels._failed and kernels._compiled.get(key) not in (None, kernels._EAGER)
        assert _rel(w, ref) <= 2 ** -8
    finally:
        kernels.min_elements = old
        kernels.reset()
