"""No page-locked host memory outlives a streamed run.

The block streamer pins each streamed block's host tensors for fast uploads. Pinned memory
cannot be paged out, so it must not stay once the run is over: tensors read unchanged from a
file go back to their file mapping, the others to ordinary memory. ``host_memory.move`` to the
CPU does the same for any pinned tensor it meets.

No GPU here: pinning needs CUDA, so the streamer is given a stand-in ``pin_copy`` (a plain
copy whose address is recorded), and for ``move`` ``Tensor.is_pinned`` answers from that record.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from qwenimage_pack.core.layers import file_views, host_memory

from qwenimage_pack.core.pipeline import streaming
from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT
from qwenimage_pack.core.layers.linear import Linear


class FakePins:
    """Stand-in for ``Tensor.pin_memory``: a copy, remembered (and kept alive, so its address
    cannot be reused by an unrelated tensor while the test looks)."""

    def __init__(self):
        self.copies: list[torch.Tensor] = []

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        c = t.clone()
        self.copies.append(c)
        return c

    def ptrs(self) -> set[int]:
        return {c.data_ptr() for c in self.copies}


def _model_with_file_views(tmp_path):
    """A tiny MMDiT whose block Linear weights are views of a safetensors file (as the loader
    leaves weights read unchanged); biases and norms are ordinary memory."""
    torch.manual_seed(0)
    cfg = MMDiTConfig(num_layers=3, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48,
                      axes_dims_rope=(4, 14, 14))
    model = QwenImageMMDiT(cfg).eval().requires_grad_(False)
    linears = {n: m for n, m in model.transformer_blocks.named_modules() if isinstance(m, Linear)}
    path = tmp_path / "blocks.safetensors"
    save_file({n: m.weight.detach().contiguous() for n, m in linears.items()}, str(path))
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for n, m in linears.items():
            m.weight = nn.Parameter(f.get_tensor(n), requires_grad=False)
            file_views.keep_file_view(m, "weight")
    return model, linears


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]), torch.randn(1, 5, 48, generator=g)


def test_streamer_leaves_no_pinned_copy_behind(tmp_path):
    model, linears = _model_with_file_views(tmp_path)
    x, s, ctx = _inputs()
    with torch.inference_mode():
        ref = model(x, s, ctx)
    pins = FakePins()
    for _ in range(2):  # a second run pins afresh and unpins again
        before = len(pins.copies)
        with streaming.BlockStreamer(model.transformer_blocks, "cpu", "cpu", pin_copy=pins), torch.inference_mode():
            out = model(x, s, ctx)
        assert torch.equal(out, ref)
        pinned = pins.ptrs()
        tensors = [t for b in model.transformer_blocks for t in streaming._tensors(b)]
        assert len(pins.copies) - before == len(tensors)  # everything was pinned during the run
        assert not [t for t in tensors if t.data_ptr() in pinned]
        for m in linears.values():  # read unchanged from the file: back on the mapping
            assert m.weight.data_ptr() == file_views.file_view(m, "weight").data_ptr()
        for t in tensors:
            assert t.device.type == "cpu"
    with torch.inference_mode():
        assert torch.equal(model(x, s, ctx), ref)


@pytest.fixture
def fake_pinned(monkeypatch):
    """``Tensor.is_pinned`` answers True for the addresses in the returned set."""
    ptrs: set[int] = set()
    original = torch.Tensor.is_pinned
    monkeypatch.setattr(torch.Tensor, "is_pinned",
                        lambda self, *a, **k: self.device.type == "cpu" and self.data_ptr() in ptrs or original(self, *a, **k))
    return ptrs


def test_move_to_cpu_unpins(tmp_path, fake_pinned):
    model, linears = _model_with_file_views(tmp_path)
    block = model.transformer_blocks[0]
    lin = block.attn.to_q
    view = file_views.file_view(lin, "weight")
    lin.weight.data = lin.weight.data.clone()  # a "pinned" copy of a file-backed weight
    bias_before = lin.bias.detach().clone()
    fake_pinned.update({lin.weight.data_ptr(), lin.bias.data_ptr()})  # and of an ordinary one

    host_memory.move(block, "cpu")
    assert lin.weight.data_ptr() == view.data_ptr()  # back on the file mapping
    assert not lin.bias.is_pinned() and torch.equal(lin.bias, bias_before)  # an ordinary copy
