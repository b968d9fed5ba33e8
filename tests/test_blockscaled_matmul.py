"""Block-scaled matmuls for ComfyUI's nvfp4 / mxfp8 layers (core/quant/blockscaled_matmul.py), on the CPU.

The hardware kernels (Blackwell only) cannot run here, so both sides replace them by what they
compute: the operands decoded by comfy-kitchen's own ``dequantize_nvfp4`` / ``dequantize_mxfp8``
and multiplied in float32. The reference is what ComfyUI 0.30 does on a Blackwell GPU: the
activation quantized by kitchen's layout (``QuantizedTensor.from_float`` with the layer's
``input_scale``) and ``F.linear`` dispatched through kitchen's quantized-tensor handlers, which
call ``comfy_kitchen.scaled_mm_*`` (replaced by the emulation for this test). Our path must give
the same numbers; on a Blackwell GPU tests/test_cuda_formats.py checks the real kernels.
"""
from __future__ import annotations

import inspect
import logging

import pytest
import torch
import torch.nn.functional as F

from qwenimage_pack.core.layers.linear import Linear
from qwenimage_pack.core.layers.run_options import RunOptions
from qwenimage_pack.core.quant import blockscaled_matmul as bm
from qwenimage_pack.core.quant import comfy_quant

ck = pytest.importorskip("comfy_kitchen")
ck_tensor = pytest.importorskip("comfy_kitchen.tensor")

LAYOUTS = {"nvfp4": "TensorCoreNVFP4Layout", "mxfp8": "TensorCoreMXFP8Layout"}
ON = RunOptions(blockscaled_matmul=True, blockscaled_on_cpu=True)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True)
def _fresh():
    bm.reset()
    yield
    bm.reset()


def _layer(fmt: str, out: int, inp: int, extras: tuple = ()):
    """(our Linear, kitchen's weight QuantizedTensor, bias, side tensors) for a random layer in bf16."""
    g = torch.Generator().manual_seed(out * 7 + inp + len(extras))
    w = (torch.randn(out, inp, generator=g) * 0.05).to(torch.bfloat16)
    qw = ck_tensor.QuantizedTensor.from_float(w, LAYOUTS[fmt])
    stored = qw.state_dict("weight")
    side = {k: v.view(torch.uint8) if "e8m0" in str(v.dtype) else v for k, v in stored.items() if k != "weight"}
    if "pre_quant_scale" in extras:
        side["pre_quant_scale"] = (torch.rand(inp, generator=g) + 0.5).to(torch.bfloat16)
    if "input_scale" in extras:
        side["input_scale"] = torch.tensor(3.0 / (448 * 6))  # a calibrated scale: |x| <= 3
    bias = (torch.randn(out, generator=g) * 0.1).to(torch.bfloat16)
    lin = Linear(inp, out, device="meta")
    lin.bias = torch.nn.Parameter(bias, requires_grad=False)
    lin.set_comfy_quant(stored["weight"], side, comfy_quant.parse_layer_config({"format": fmt}), (out, inp))
    return lin, qw, bias, side


def _comfyui(fmt: str, x: torch.Tensor, qw, bias, side) -> torch.Tensor:
    """ComfyUI 0.30's MixedPrecisionOps.Linear forward for a layer that quantizes its input. Under
    inference mode, as ComfyUI runs nodes: F.linear then reaches kitchen's linear handler whole
    (with autograd on, it is split into ops kitchen has no nvfp4 handler for)."""
    with torch.inference_mode():
        return _comfyui_forward(fmt, x, qw, bias, side).clone()


def _comfyui_forward(fmt, x, qw, bias, side):
    pqs = side.get("pre_quant_scale")
    if pqs is not None:
        x = x * pqs.to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    qx = ck_tensor.QuantizedTensor.from_float(x2, LAYOUTS[fmt], scale=side.get("input_scale"))
    return F.linear(qx, qw, bias).reshape(*x.shape[:-1], -1)


@pytest.fixture
def emulated_kitchen(monkeypatch):
    """kitchen's matmul entry points replaced by the emulation; records the calls."""
    calls = []

    def nvfp4(a, b, tensor_scale_a, tensor_scale_b, block_scale_a, block_scale_b, bias=None, out_dtype=None,
              alpha=None):
        calls.append("nvfp4")
        return bm.emulated_nvfp4_mm(ck, a, b, tensor_scale_a, tensor_scale_b, block_scale_a, block_scale_b,
                                    bias, out_dtype)

    def mxfp8(a, b, block_scale_a, block_scale_b, bias=None, out_dtype=None):
        calls.append("mxfp8")
        return bm.emulated_mxfp8_mm(ck, a, b, block_scale_a, block_scale_b, bias, out_dtype)

    monkeypatch.setattr(ck, "scaled_mm_nvfp4", nvfp4)
    monkeypatch.setattr(ck, "scaled_mm_mxfp8", mxfp8)
    return calls


CASES = [  # Qwen-Image's layers: every dimension a multiple of 128, all with a bias
    ("nvfp4", 96, 256, ()),
    ("nvfp4", 96, 256, ("pre_quant_scale",)),
    ("nvfp4", 96, 256, ("pre_quant_scale", "input_scale")),
    ("mxfp8", 96, 256, ()),
]


@pytest.mark.parametrize("fmt,out,inp,extras", CASES, ids=lambda c: str(c))
def test_the_block_scaled_path_computes_what_comfyui_does(fmt, out, inp, extras, emulated_kitchen):
    lin, qw, bias, side = _layer(fmt, out, inp, extras)
    x = (torch.randn(3, 11, inp, generator=torch.Generator().manual_seed(5)) * 0.7).to(torch.bfloat16)
    ours = lin(x, ON)
    comfy = _comfyui(fmt, x, qw, bias, side)
    assert emulated_kitchen == [fmt]  # ComfyUI's side went through kitchen's kernel entry point
    assert ours.dtype == torch.bfloat16 and ours.shape == (3, 11, out)
    assert torch.equal(ours, comfy)
    decoded = lin(x)
    assert not torch.equal(ours, decoded)  # it really took the quantized-activation path
    # The activation's own rounding (4 bits with a 16-value scale, or 8 bits) is the only new error.
    assert _rel(ours, decoded) <= (0.12 if fmt == "nvfp4" else 0.04)


@pytest.mark.parametrize("fmt", list(LAYOUTS))
def test_padded_layers_are_cut_back(fmt, emulated_kitchen):
    """72 x 200 pads to 80 x 208 (nvfp4) / 96 x 224 (mxfp8). ComfyUI's kernel call takes no bias
    then (it would not fit the padded output), so compare without one; ours adds it after cutting."""
    lin, qw, bias, side = _layer(fmt, 72, 200)
    x = torch.randn(2, 9, 200, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    with_bias = lin(x, ON)
    lin.bias = None
    ours = lin(x, ON)
    assert torch.equal(ours, _comfyui(fmt, x, qw, None, side))
    assert emulated_kitchen == [fmt]  # ComfyUI called the kernel (ours emulates it directly on the CPU)
    assert torch.equal(with_bias, ours + bias)


@pytest.mark.parametrize("fmt", list(LAYOUTS))
def test_the_gpu_call_binds_to_kitchens_signature(fmt):
    """On a GPU the same arguments go to comfy_kitchen.scaled_mm_* by name: they must fit them."""
    lin, _, _, side = _layer(fmt, 96, 256, ("input_scale",) if fmt == "nvfp4" else ())
    x2 = torch.randn(16, 256).to(torch.bfloat16)
    args = bm.quantize_activation(ck, fmt, x2, side.get("input_scale"))
    args.update(bm.weight_operand(fmt, lin.weight, lin.quant_side()))
    kernel = ck.scaled_mm_nvfp4 if fmt == "nvfp4" else ck.scaled_mm_mxfp8
    inspect.signature(kernel).bind(**args, bias=None, out_dtype=torch.bfloat16)


@pytest.mark.parametrize("fmt", list(LAYOUTS))
def test_compiled_whole_and_to_the_same_bits(fmt):
    """The Torch Compile node traces the blocks with their Linears: the path must trace without a
    graph break (fullgraph) and give eager's bits (inductor on the CPU; kitchen's ops are opaque
    custom ops, our part around them is compiled), the dynamic nvfp4 scale included."""
    lin, _, _, _ = _layer(fmt, 96, 256, ("pre_quant_scale",) if fmt == "nvfp4" else ())
    x = torch.randn(2, 20, 256, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x_: lin(x_, ON), fullgraph=True)
    assert torch.equal(compiled(x), lin(x, ON))


def test_only_when_asked_on_nvfp4_mxfp8_layers_with_kitchen(monkeypatch):
    lin, _, _, _ = _layer("nvfp4", 96, 256)
    x = torch.randn(5, 256).to(torch.bfloat16)
    decoded = lin(x)
    assert torch.equal(decoded, F.linear(x, lin.dense_weight(torch.bfloat16), lin.bias))
    assert torch.equal(lin(x, RunOptions(blockscaled_matmul=True)), decoded)  # CPU, no emulation: decoded
    assert not torch.equal(lin(x, ON), decoded)
    assert torch.equal(lin(x.float(), ON), lin(x.float()))  # the kernels write bf16 / fp16 only: decoded
    int8 = Linear(256, 96, bias=False, device="meta")
    w8 = torch.randint(-127, 128, (96, 256), dtype=torch.int8)
    int8.set_comfy_quant(w8, {"weight_scale": torch.tensor(0.01)},
                         comfy_quant.parse_layer_config({"format": "int8_tensorwise"}), (96, 256))
    assert torch.equal(int8(x, ON), int8(x))  # another format: decoded
    plain = Linear(256, 96)
    assert torch.equal(plain(x.float(), ON), plain(x.float()))
    monkeypatch.setattr(bm, "kitchen", lambda: None)  # ComfyUI 0.3.64: no comfy-kitchen
    assert torch.equal(lin(x, ON), decoded)


def test_a_failing_kernel_is_dropped_once_for_the_process(monkeypatch, caplog):
    lin, _, _, _ = _layer("nvfp4", 96, 256)
    x = torch.randn(5, 256).to(torch.bfloat16)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(bm, "emulated_nvfp4_mm", broken)
    with caplog.at_level(logging.WARNING, logger=bm.__name__):
        first = lin(x, ON)
        second = lin(x, ON)
    assert torch.equal(first, lin(x)) and torch.equal(second, first)  # decoded, as without the option
    assert len(calls) == 1  # not retried for every layer
    assert sum("nvfp4 matmul" in r.getMessage() for r in caplog.records) == 1


def test_speed_options_node_turns_it_on(monkeypatch):
    from qwenimage_pack.nodes import options
    from qwenimage_pack.nodes.handles import DiffusionModel

    warnings = []
    monkeypatch.setattr(options.runtime, "warn", warnings.append)
    handle = DiffusionModel(module=torch.nn.Linear(2, 2), name="qwen_image_2512_nvfp4.safetensors",
                            variant="qwen-image", weight_format="nvfp4")
    assert options.run_options(handle).blockscaled_matmul is False
    (fast,) = options.QwenImageSpeedOptions().apply(handle, "sdpa", "off", "off", "on")
    assert options.run_options(fast).blockscaled_matmul is True and warnings == []
    (same,) = options.QwenImageSpeedOptions().apply(fast, "sdpa", "off", "off", "off")
    assert options.run_options(same).blockscaled_matmul is False
    bf16 = DiffusionModel(module=torch.nn.Linear(2, 2), name="qwen_image_bf16.safetensors",
                          variant="qwen-image", weight_format="bfloat16")
    options.QwenImageSpeedOptions().apply(bf16, "sdpa", "off", "off", "on")
    assert len(warnings) == 1 and "no effect" in warnings[0]
    with pytest.raises(ValueError, match="blockscaled_matmul"):
        options.QwenImageSpeedOptions().apply(handle, "sdpa", "off", "off", "yes")
