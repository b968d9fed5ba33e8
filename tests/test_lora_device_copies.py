"""LoRA copies made on a compute device are counted, freed on request, and freed when the model
leaves the device through host_memory.move (the path placement's eviction takes).

No GPU here: the "meta" device stands in for one. A forward with meta inputs makes the LoRA
layers build their per-device copies there, with real sizes and no data.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qwenimage_pack.core.layers import host_memory
from qwenimage_pack.core.layers.linear import Linear
from qwenimage_pack.core.layers.lora_patch import apply_loras, device_copy_bytes, release_device_copies
from qwenimage_pack.core.loading.lora import parse_lora

META = torch.device("meta")


def _patched_model():
    """Three Linears: a rank-4 LoRA with a bias delta, a LoHa (a dense delta per device), and
    one layer the LoRA does not touch."""
    torch.manual_seed(0)
    model = nn.Module()
    model.a, model.b, model.c = Linear(32, 24), Linear(16, 40), Linear(8, 8)
    g = torch.Generator().manual_seed(1)
    sd = {
        "a.lora_down.weight": torch.randn(4, 32, generator=g, dtype=torch.bfloat16),
        "a.lora_up.weight": torch.randn(24, 4, generator=g, dtype=torch.bfloat16),
        "a.diff_b": torch.randn(24, generator=g),
        "b.hada_w1_a": torch.randn(40, 2, generator=g), "b.hada_w1_b": torch.randn(2, 16, generator=g),
        "b.hada_w2_a": torch.randn(40, 2, generator=g), "b.hada_w2_b": torch.randn(2, 16, generator=g),
    }
    apply_loras(model, [(parse_lora(sd, model, "mem"), 0.8)])
    return model


def _expected_bytes(dtype: torch.dtype) -> int:
    """What one device holds for one input dtype: layer a's factors and bias delta, layer b's
    dense [40, 16] LoHa product, all cast to ``dtype``."""
    size = torch.tensor([], dtype=dtype).element_size()
    return (4 * 32 + 24 * 4 + 24 + 40 * 16) * size


def _run_on(model, device, dtype):
    with torch.no_grad():
        model.a(torch.zeros(3, 32, device=device, dtype=dtype))
        model.b(torch.zeros(3, 16, device=device, dtype=dtype))


def test_device_copies_are_counted_and_released():
    model = _patched_model()
    assert device_copy_bytes(model) == 0  # nothing is copied before first use
    _run_on(model, "cpu", torch.float32)
    assert device_copy_bytes(model) == 0  # host copies are not device memory
    _run_on(model, META, torch.float16)
    _run_on(model, META, torch.float32)
    want = _expected_bytes(torch.float16) + _expected_bytes(torch.float32)
    assert device_copy_bytes(model) == want
    assert device_copy_bytes(model.a) == (4 * 32 + 24 * 4 + 24) * (2 + 4)  # per submodule too

    release_device_copies(model)
    assert device_copy_bytes(model) == 0
    release_device_copies(model)  # idempotent
    assert device_copy_bytes(model) == 0
    _run_on(model, META, torch.float16)  # rebuilt on next use
    assert device_copy_bytes(model) == _expected_bytes(torch.float16)


def test_release_keeps_results_exact():
    model = _patched_model()
    x = torch.randn(5, 32)
    with torch.no_grad():
        before = model.a(x)
        release_device_copies(model)
        assert torch.equal(model.a(x), before)


def test_moving_a_model_to_the_cpu_frees_its_lora_device_copies():
    """Eviction (placement -> host_memory.move) frees them without knowing about LoRAs."""
    model = _patched_model()
    _run_on(model, META, torch.bfloat16)
    assert device_copy_bytes(model) == _expected_bytes(torch.bfloat16)
    host_memory.move(model, "cpu")
    assert device_copy_bytes(model) == 0
