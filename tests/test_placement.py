"""Placement of our modules on a (simulated) GPU in plain Python (scripts, benchmarks): LRU
eviction, busy modules kept, residency dropped with the module, streaming when nothing fits.

Inside ComfyUI the same calls go through ComfyUI's own load_models_gpu with genuine
ModelPatchers; tests/integration/memory_probe.py drives that against a real ComfyUI.

No GPU here: a fake device records where each module "is" and how much memory is free, so the
bookkeeping is tested without moving tensors.
"""
from __future__ import annotations

import gc

import pytest
import torch

from qwenimage_pack.core.layers.host_memory import module_bytes
from qwenimage_pack.nodes import placement, runtime

GPU = torch.device("cuda", 0)


class FakeGPU:
    def __init__(self, monkeypatch, capacity: int):
        self.capacity = capacity
        self.where: dict[int, torch.device] = {}
        self.sizes: dict[int, int] = {}
        monkeypatch.setattr(placement, "_HEADROOM", 0)
        monkeypatch.setattr(placement, "_move", self.move)
        monkeypatch.setattr(placement, "_module_device", lambda m: self.where.get(id(m), torch.device("cpu")))
        monkeypatch.setattr(runtime, "free_device_memory", self.free)
        monkeypatch.setattr(placement, "_RESIDENT", type(placement._RESIDENT)())

    def move(self, module, device):
        self.where[id(module)] = torch.device(device)
        self.sizes[id(module)] = module_bytes(module)

    def free(self, device):
        used = sum(self.sizes[k] for k, d in self.where.items() if d == device)
        return self.capacity - used

    def on_gpu(self, module) -> bool:
        return self.where.get(id(module)) == GPU


def _model(n: int = 64) -> torch.nn.Module:
    return torch.nn.Linear(n, n, bias=False)  # 4 n^2 bytes


def test_least_recently_used_is_evicted_first(monkeypatch):
    a, b, c = _model(), _model(), _model()
    size = module_bytes(a)
    gpu = FakeGPU(monkeypatch, capacity=2 * size)
    for m in (a, b):
        with placement.on_device(m, GPU) as how:
            assert how == "resident"
    with placement.on_device(a, GPU):  # a is now the most recently used
        pass
    with placement.on_device(c, GPU):
        pass
    assert gpu.on_gpu(a) and gpu.on_gpu(c) and not gpu.on_gpu(b)


def test_a_module_in_use_is_never_evicted(monkeypatch):
    a, b = _model(), _model()
    gpu = FakeGPU(monkeypatch, capacity=module_bytes(a))
    with placement.on_device(a, GPU), placement.on_device(b, GPU):
        assert gpu.on_gpu(a) and gpu.on_gpu(b)  # over capacity, but a is working
    with placement.on_device(a, GPU):
        pass
    entry = placement._RESIDENT[id(a)]
    assert entry.busy == 0


def test_residency_ends_with_the_module(monkeypatch):
    FakeGPU(monkeypatch, capacity=1 << 30)
    m = _model()
    with placement.on_device(m, GPU):
        assert len(placement._RESIDENT) == 1
    del m
    gc.collect()
    assert len(placement._RESIDENT) == 0


def test_modules_placed_together_are_all_kept(monkeypatch):
    """The edit encoder needs the text encoder and the vision tower at once: loading the second
    must not evict the first."""
    a, b = _model(), _model()
    gpu = FakeGPU(monkeypatch, capacity=module_bytes(a))
    with placement.on_devices(GPU, (a, None), (b, None)) as how:
        assert how == ["resident", "resident"] and gpu.on_gpu(a) and gpu.on_gpu(b)


def test_release_forgets_and_moves(monkeypatch):
    a = _model()
    gpu = FakeGPU(monkeypatch, capacity=1 << 30)
    with placement.on_device(a, GPU):
        pass
    placement.release(a)
    assert not gpu.on_gpu(a) and len(placement._RESIDENT) == 0


def test_cpu_placement_tracks_nothing(monkeypatch):
    FakeGPU(monkeypatch, capacity=0)
    with placement.on_device(_model(), torch.device("cpu")) as how:
        assert how == "resident"
    assert len(placement._RESIDENT) == 0


def test_a_big_model_streams_its_blocks(monkeypatch):
    FakeGPU(monkeypatch, capacity=16)
    seen = []
    monkeypatch.setattr(placement, "_streamed", lambda m, d, s, size: _record(seen, s))
    with placement.on_device(_model(), GPU, stream_blocks="blocks") as how:
        assert how == "streamed"
    assert seen == ["blocks"]


def test_text_encoder_streams_when_it_does_not_fit(monkeypatch):
    """The text encoder node asks for streaming: a bf16 7B encoder does not fit an 8-12 GB card."""
    from qwenimage_pack.core.encoders.text_encoder import QwenTextEncoder, TextEncoderConfig

    model = QwenTextEncoder(TextEncoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                                              num_kv_heads=1, head_dim=16, intermediate_size=64,
                                              mrope_section=(2, 3, 3)))
    seen = []
    monkeypatch.setattr(placement, "_streamed", lambda m, d, s, size: _record(seen, s))
    FakeGPU(monkeypatch, capacity=module_bytes(model) // 2)
    from qwenimage_pack.nodes import conditioning

    class _Tok:  # the node only needs the encoder to be placed; stop before tokenizing
        def __getattr__(self, name):
            raise RuntimeError("stop")

    handle = type("H", (), {"module": model, "tokenizer": _Tok()})()
    monkeypatch.setattr(runtime, "compute_device", lambda: GPU)
    with pytest.raises(Exception):
        conditioning.QwenImageTextEncode().encode(handle, "a cat")
    assert seen == ["layers"]


def _record(seen, stream_blocks):
    import contextlib

    seen.append(stream_blocks)
    return contextlib.nullcontext("streamed")
