"""A LATENT's ``batch_index`` picks each item's noise, as ComfyUI's KSampler does.

ComfyUI's ``prepare_noise(latent, seed, batch_index)`` gives item i the noise that item
``batch_index[i]`` of a full batch gets (Latent From Batch, Repeat Latent Batch set the key), so
one image of a batch can be re-run or refined alone. tests/integration/bridge_probe.py compares
``batch_noise`` with ComfyUI's own ``prepare_noise``.
"""
from __future__ import annotations

import pytest
import torch

from qwenimage_pack.core.pipeline import sampling as fm
from qwenimage_pack.nodes import sampling
from qwenimage_pack.nodes.handles import DiffusionModel


class _PerItem(torch.nn.Module):
    """Stands in for the MMDiT: each item's velocity depends on that item alone."""

    def __init__(self, layered: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.config = type("config", (), {"joint_attention_dim": 8, "layered": layered})()

    def forward(self, x, sigma, context, **kw):
        return torch.tanh(x) * 0.5 + context.mean() * self.w


def _sample(latent: dict, seed: int = 5, layered: bool = False):
    handle = DiffusionModel(module=_PerItem(layered), name="per-item", variant="qwen-image", weight_format="float32")
    positive = [[torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(1)), {}]]
    return sampling.sample(handle, positive, latent, seed, 3, 1.0, device="cpu")["samples"]


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    # elementwise math on batches of different sizes may round differently in the last bit
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_item_noise_does_not_depend_on_the_batch_size():
    full = fm.initial_noise(5, 4, 6, 8)
    assert torch.equal(fm.initial_noise(5, 3, 6, 8)[2], full[2])
    layered = fm.initial_noise(5, 4, 6, 8, frames=3)
    assert torch.equal(fm.initial_noise(5, 3, 6, 8, frames=3)[2], layered[2])


def test_batch_noise_picks_by_index():
    full = fm.initial_noise(5, 4, 6, 8)
    assert torch.equal(sampling.batch_noise(5, 4, 6, 8), full)
    assert torch.equal(sampling.batch_noise(5, 3, 6, 8, batch_index=[2, 0, 2]), full[[2, 0, 2]])
    frames = fm.initial_noise(5, 4, 6, 8, frames=3)
    assert torch.equal(sampling.batch_noise(5, 1, 6, 8, frames=3, batch_index=[3]), frames[[3]])


@pytest.mark.parametrize("index", [[0, 1], [-1], [0, 1, 2]])
def test_a_batch_index_that_does_not_fit_is_named(index):
    with pytest.raises(ValueError, match="batch_index"):
        sampling.batch_noise(5, 2 if len(index) != 2 else 3, 6, 8, batch_index=index)


def test_latent_from_batch_item_samples_like_the_full_batch():
    # batch 4 -> Latent From Batch (index 2, length 1) -> sampler: item 2's image, not item 0's
    full = _sample({"samples": torch.zeros(4, 16, 6, 8)})
    one = _sample({"samples": torch.zeros(1, 16, 6, 8), "batch_index": [2]})
    _same(one[0], full[2])
    assert float((one[0] - full[0]).abs().max()) > 0.1
    # repeated and reordered indices (Repeat Latent Batch) each take their own item's noise
    picked = _sample({"samples": torch.zeros(3, 16, 6, 8), "batch_index": [3, 1, 3]})
    _same(picked, full[[3, 1, 3]])


def test_layered_latent_follows_batch_index_too():
    full = _sample({"samples": torch.zeros(3, 16, 2, 6, 8)}, layered=True)
    one = _sample({"samples": torch.zeros(1, 16, 2, 6, 8), "batch_index": [1]}, layered=True)
    _same(one[0], full[1])


def test_batch_index_is_kept_on_the_output():
    latent = {"samples": torch.zeros(1, 16, 6, 8), "batch_index": [2]}
    handle = DiffusionModel(module=_PerItem(), name="per-item", variant="qwen-image", weight_format="float32")
    out = sampling.sample(handle, [[torch.randn(1, 3, 8), {}]], latent, 5, 2, 1.0, device="cpu")
    assert out["batch_index"] == [2]
