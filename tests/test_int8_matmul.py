"""int8 matmuls for ComfyUI's int8 layers (core/quant/int8_matmul.py), checked on the CPU.

The reference is comfy-kitchen's ``int8_linear`` (what ComfyUI runs for these files; its eager
backend runs on the CPU) on the same stored weights, and the decoded weight's exact result.
A call uses the path only when its RunOptions ask (the Speed Options node's int8_matmul).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenimage_pack.core.layers.linear import Linear
from qwenimage_pack.core.layers.run_options import RunOptions
from qwenimage_pack.core.quant import comfy_quant, int8_matmul

ck = pytest.importorskip("comfy_kitchen")
ck_tensor = pytest.importorskip("comfy_kitchen.tensor")

CASES = {
    "tensorwise": ({"format": "int8_tensorwise"}, {}),
    "rowwise": ({"format": "int8_tensorwise"}, {"per_channel": True}),
    "convrot": ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64},
                {"per_channel": True, "convrot": True, "convrot_groupsize": 64}),
}
OUT, IN = 72, 192


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _linear(case: str) -> tuple[Linear, torch.Tensor, torch.Tensor]:
    conf, kw = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    w = torch.randn(OUT, IN, generator=g) * 0.05
    qt = ck_tensor.QuantizedTensor.from_float(w, "TensorWiseINT8Layout", **kw)
    stored = qt.state_dict("weight")
    lin = Linear(IN, OUT, device="meta")
    lin.bias = torch.nn.Parameter(torch.randn(OUT, generator=g) * 0.1, requires_grad=False)
    lin.set_comfy_quant(stored["weight"], {"weight_scale": stored["weight_scale"]}, comfy_quant.parse_layer_config(conf),
                        (OUT, IN))
    x = torch.randn(3, 11, IN, generator=g, dtype=torch.float32).to(torch.bfloat16)
    return lin, x, qt.dequantize().float()


@pytest.mark.parametrize("case", list(CASES))
def test_int8_path_is_comfyuis_and_close_to_the_decoded_weight(case):
    lin, x, dense = _linear(case)
    quant = lin.comfy_quant
    ours = lin(x, RunOptions(int8_matmul=True, int8_on_cpu=True))
    kitchen = ck.int8_linear(x, lin.weight, lin.weight_scale, lin.bias, out_dtype=torch.bfloat16,
                             convrot=quant.convrot, convrot_groupsize=quant.convrot_groupsize)
    exact = F.linear(x.float(), dense, lin.bias.float())
    assert ours.dtype == torch.bfloat16 and ours.shape == (3, 11, OUT)
    # Both quantize the activation per token to int8; kitchen scales it in bf16, we in float32, so
    # single roundings differ: the two agree to int8's own error, and ours is no further from exact.
    assert _rel(ours, kitchen) <= 1e-2
    assert _rel(ours, exact) <= _rel(kitchen, exact) * 1.05
    assert not torch.equal(ours, lin(x))  # it really took the int8 path


def test_only_when_asked_and_only_on_int8_layers():
    lin, x, dense = _linear("rowwise")
    exact = lin(x)  # default options: the decoded weight
    assert torch.equal(exact, F.linear(x, lin.dense_weight(torch.bfloat16), lin.bias.bfloat16()))
    assert torch.equal(lin(x, RunOptions(int8_matmul=True)), exact)  # CPU without int8_on_cpu: no int8 path
    plain = Linear(IN, OUT)
    assert torch.equal(plain(x.float(), RunOptions(int8_matmul=True, int8_on_cpu=True)), plain(x.float()))


def test_speed_options_node_turns_it_on(monkeypatch):
    from qwenimage_pack.nodes import options
    from qwenimage_pack.nodes.handles import DiffusionModel

    handle = DiffusionModel(module=torch.nn.Linear(2, 2), name="qwen_image_edit_2511_int8_convrot.safetensors",
                            variant="edit-2511", weight_format="int8_tensorwise")
    assert options.run_options(handle).int8_matmul is False
    (fast,) = options.QwenImageSpeedOptions().apply(handle, "sdpa", "off", "on")
    assert options.run_options(fast).int8_matmul is True
    (same,) = options.QwenImageSpeedOptions().apply(handle, "sdpa", "off")
    assert options.run_options(same).int8_matmul is False
