"""Block streaming (core/pipeline/streaming.py) on the CPU: same numbers, bounded residency,
prefetch order, compact weights moved as stored, host tensors restored.

With device "cpu" the streamer still makes a separate copy of each block for its forward, so
everything but the CUDA streams is exercised.
"""
from __future__ import annotations

import pytest
import torch

from qwenimage_pack.core.pipeline import streaming
from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT
from qwenimage_pack.core.layers.linear import Linear

LAYERS = 4


def _model(layers=LAYERS):
    torch.manual_seed(0)
    cfg = MMDiTConfig(num_layers=layers, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48,
                      axes_dims_rope=(4, 14, 14))
    return QwenImageMMDiT(cfg).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]), torch.randn(1, 5, 48, generator=g)


def _host_ptrs(model):
    return [[t.data_ptr() for t in streaming._tensors(b)] for b in model.transformer_blocks]


class _Spy:
    """A pre-hook registered after the streamer's: sees each block as its forward sees it."""

    def __init__(self, model, host_ptrs):
        self.calls, self.host_ptrs = [], host_ptrs
        self.handles = [b.register_forward_pre_hook(self) for b in model.transformer_blocks]
        self.index = {id(b): i for i, b in enumerate(model.transformer_blocks)}

    def __call__(self, block, args):
        i = self.index[id(block)]
        ptrs = [t.data_ptr() for t in streaming._tensors(block)]
        dtypes = [t.dtype for t in streaming._tensors(block)]
        self.calls.append((i, any(p in self.host_ptrs[i] for p in ptrs), dtypes))

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_same_output_and_bounded_residency(prefetch):
    model = _model()
    x, s, ctx = _inputs()
    with torch.inference_mode():
        ref = model(x, s, ctx)
    host = _host_ptrs(model)
    spy = None
    with streaming.BlockStreamer(model.transformer_blocks, "cpu", "cpu", prefetch=prefetch) as st:
        spy = _Spy(model, host)
        with torch.inference_mode():
            out1 = model(x, s, ctx)
            out2 = model(x, s, ctx)
    spy.remove()
    assert torch.equal(out1, ref) and torch.equal(out2, ref)
    # every block ran on its own device copy, never on the host tensors
    assert [c[0] for c in spy.calls] == list(range(LAYERS)) * 2
    assert not any(c[1] for c in spy.calls)
    # host tensors are back after the context
    assert _host_ptrs(model) == host
    assert st.stats.max_resident <= 1 + prefetch
    if prefetch == 0:
        assert st.stats.prefetch_hits == 0 and st.stats.uploads == 2 * LAYERS
    else:
        # the first block of the first pass is loaded on demand; with wrap-around every later
        # block (including block 0 of the second pass) was already uploaded
        assert st.stats.prefetch_hits == 2 * LAYERS - 1
        assert st.stats.order[: 1 + prefetch] == list(range(1 + prefetch))


def test_keep_leading_blocks_resident():
    model = _model()
    x, s, ctx = _inputs()
    with torch.inference_mode():
        ref = model(x, s, ctx)
    host = _host_ptrs(model)
    with streaming.BlockStreamer(model.transformer_blocks, "cpu", "cpu", keep=2) as st:
        assert st.stats.uploads == 2  # the kept ones, once
        with torch.inference_mode():
            out = model(x, s, ctx)
            out = model(x, s, ctx)
        assert all(i >= 2 for i in st.stats.order[2:])
        # kept blocks are on their device copies between forwards too
        assert not any(p in host[0] for p in _host_ptrs(model)[0])
    assert torch.equal(out, ref)
    assert _host_ptrs(model) == host


def test_compact_weights_travel_as_stored():
    model = _model(2)
    for name, m in model.transformer_blocks.named_modules():
        if isinstance(m, Linear) and name.endswith("to_q"):
            w = m.weight.detach()
            scale = w.abs().amax() / 448
            m.weight = torch.nn.Parameter((w / scale).to(torch.float8_e4m3fn), requires_grad=False)
            m.set_scale(scale)
    x, s, ctx = _inputs()
    with torch.inference_mode():
        ref = model(x, s, ctx)
    host = _host_ptrs(model)
    with streaming.BlockStreamer(model.transformer_blocks, "cpu", "cpu"):
        spy = _Spy(model, host)
        with torch.inference_mode():
            out = model(x, s, ctx)
    spy.remove()
    assert torch.equal(out, ref)
    assert all(torch.float8_e4m3fn in dtypes for _, _, dtypes in spy.calls)


def test_out_of_order_calls_and_errors_restore_the_host():
    model = _model()
    blocks = model.transformer_blocks
    host = _host_ptrs(model)
    x, s, ctx = _inputs()
    with torch.inference_mode():
        ref = model(x, s, ctx)
    with streaming.BlockStreamer(blocks, "cpu", "cpu", prefetch=1) as st:
        with torch.inference_mode():
            model(x, s, ctx)
            # a block called out of order drops the stale prefetch and loads what it needs
            with pytest.raises(TypeError):
                blocks[2]()  # the forward itself fails; the block stays installed
            assert st.stats.max_resident <= 3
    assert _host_ptrs(model) == host  # ... and exit puts every host tensor back
    with torch.inference_mode():
        assert torch.equal(model(x, s, ctx), ref)


def test_blocks_that_fit():
    model = _model()
    blocks = model.transformer_blocks
    size = streaming.block_bytes(blocks[0])
    assert streaming.blocks_that_fit(blocks, LAYERS * size) == LAYERS
    assert streaming.blocks_that_fit(blocks, 3 * size, prefetch=1) == 0
    assert streaming.blocks_that_fit(blocks, 4 * size - 1, prefetch=1) == 0
    big = _model(8).transformer_blocks
    assert streaming.blocks_that_fit(big, 5 * size, prefetch=1) == 2
    assert streaming.blocks_that_fit(big, 5 * size, prefetch=0) == 3
    with pytest.raises(ValueError):
        streaming.BlockStreamer(blocks, "cpu", "cpu", prefetch=-1)


def test_placement_streams_a_model_that_does_not_fit(monkeypatch):
    """Placement's streamed run gives the resident output and leaves every block on the host."""
    from qwenimage_pack.nodes import placement, runtime

    model = _model()
    x, s, ctx = _inputs()
    with torch.inference_mode():
        resident = model(x, s, ctx)
    host = _host_ptrs(model)
    monkeypatch.setattr(runtime, "free_device_memory", lambda device: 0)
    monkeypatch.setattr(runtime, "warn", lambda message: None)
    size = sum(t.numel() * t.element_size() for t in model.parameters())
    with placement._streamed(model, torch.device("cpu"), "transformer_blocks", size), torch.inference_mode():
        streamed = model(x, s, ctx)
    assert torch.equal(resident, streamed)
    assert _host_ptrs(model) == host


def test_pinning_is_skipped_when_it_would_crowd_system_memory(monkeypatch, caplog):
    model = _model()
    streamer = streaming.BlockStreamer(model.transformer_blocks, "cpu", "cpu")
    need = sum(streaming.block_bytes(b) for b in model.transformer_blocks)
    monkeypatch.setattr(streaming, "available_host_memory", lambda: 4 * need)
    assert streamer._room_to_pin()
    monkeypatch.setattr(streaming, "available_host_memory", lambda: None)  # unknown: pin as before
    assert streamer._room_to_pin()
    monkeypatch.setattr(streaming, "available_host_memory", lambda: need)
    with caplog.at_level("WARNING"):
        assert not streamer._room_to_pin()
    assert any("not pinning" in r.getMessage() for r in caplog.records)
