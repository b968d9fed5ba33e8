"""Placement of our modules on a (simulated) GPU: LRU eviction, busy modules kept, residency
dropped with the module, and the entries ComfyUI's model management sees.

No GPU here: a fake device records where each module "is" and how much memory is free, so the
bookkeeping is tested without moving tensors.
"""
from __future__ import annotations

import gc

import pytest
import torch

from qwenimage_pack.model_defs.offload import module_bytes
from qwenimage_pack.nodes import placement, runtime

GPU = torch.device("cuda", 0)


class FakeGPU:
    def __init__(self, monkeypatch, capacity: int, host: list | None = None):
        self.capacity = capacity
        self.where: dict[int, torch.device] = {}
        self.sizes: dict[int, int] = {}
        self.requests: list[int] = []
        monkeypatch.setattr(placement, "_HEADROOM", 0)
        monkeypatch.setattr(placement, "_move", self.move)
        monkeypatch.setattr(placement, "_module_device", lambda m: self.where.get(id(m), torch.device("cpu")))
        monkeypatch.setattr(runtime, "free_device_memory", self.free)
        monkeypatch.setattr(runtime, "request_memory", lambda n, d: self.requests.append(n))
        monkeypatch.setattr(runtime, "_host_models", lambda: host)
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
    assert gpu.requests == [size]  # ComfyUI was asked first


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
    host: list = []
    FakeGPU(monkeypatch, capacity=1 << 30, host=host)
    m = _model()
    with placement.on_device(m, GPU):
        assert len(host) == 1 and host[0].real_model() is m
    del m
    gc.collect()
    assert host == [] and len(placement._RESIDENT) == 0


def test_comfyui_sees_and_can_evict_our_models(monkeypatch):
    """The entries follow the members of ComfyUI's LoadedModel that its free_memory uses."""
    host: list = []
    gpu = FakeGPU(monkeypatch, capacity=1 << 30, host=host)
    m = _model()
    with placement.on_device(m, GPU):
        (entry,) = host
        assert entry.device == GPU and not entry.is_dead()
        assert entry.model_memory() == module_bytes(m) and entry.model_offloaded_memory() == 0
        assert entry.model.model is m and entry.model.model.__class__.__name__ == "Linear"
        assert entry.model.is_clone(object()) is False
        entry.currently_used = True  # ComfyUI sets it; ours must never be reloaded as a ModelPatcher
        assert entry.currently_used is False
        assert entry.model_unload(memory_to_free=10) is False  # busy: refused
        assert gpu.on_gpu(m)
    assert entry.model_unload(memory_to_free=10) is True
    assert not gpu.on_gpu(m) and id(m) not in placement._RESIDENT
    host.remove(entry)  # ComfyUI pops what it unloaded
    with placement.on_device(m, GPU):  # placed again: listed again
        assert len(host) == 1 and host[0] is not entry and gpu.on_gpu(m)


def test_our_eviction_updates_comfyuis_list(monkeypatch):
    host: list = []
    a, b = _model(), _model()
    gpu = FakeGPU(monkeypatch, capacity=module_bytes(a), host=host)
    with placement.on_device(a, GPU):
        pass
    with placement.on_device(b, GPU):
        pass
    assert not gpu.on_gpu(a) and [e.real_model() for e in host] == [b]
    placement.release(b)
    assert host == [] and not gpu.on_gpu(b)


def test_cpu_placement_tracks_nothing(monkeypatch):
    host: list = []
    FakeGPU(monkeypatch, capacity=0, host=host)
    with placement.on_device(_model(), torch.device("cpu")) as how:
        assert how == "resident"
    assert host == [] and len(placement._RESIDENT) == 0


def test_text_encoder_streams_when_it_does_not_fit(monkeypatch):
    """The text encoder node asks for streaming: a bf16 7B encoder does not fit an 8-12 GB card."""
    from qwenimage_pack.model_defs.text_encoder import QwenTextEncoder, TextEncoderConfig

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


def test_comfyuis_disable_smart_memory_releases_ours_after_use(monkeypatch):
    gpu = FakeGPU(monkeypatch, capacity=1 << 30)
    monkeypatch.setattr(runtime, "host_memory_policy", lambda: "release")
    outer, inner = _model(), _model()
    with placement.on_device(outer, GPU):
        with placement.on_device(inner, GPU):
            assert gpu.on_gpu(outer) and gpu.on_gpu(inner)
        assert not gpu.on_gpu(inner) and gpu.on_gpu(outer)  # the outer one is still working
    assert not gpu.on_gpu(outer) and len(placement._RESIDENT) == 0


def test_comfyuis_novram_streams_even_what_would_fit(monkeypatch):
    FakeGPU(monkeypatch, capacity=1 << 30)
    monkeypatch.setattr(runtime, "host_memory_policy", lambda: "stream")
    seen = []
    monkeypatch.setattr(placement, "_streamed", lambda m, d, s, size: _record(seen, s))
    with placement.on_device(_model(), GPU, stream_blocks="blocks") as how:
        assert how == "streamed"
    assert seen == ["blocks"]
