"""The Speed Options node: a new handle carrying attention / fp8-matmul choices, which reach only
that model's calls while it samples (as its RunOptions; nothing is switched for the process)."""
from __future__ import annotations

import logging

import pytest
import torch

from qwenimage_pack.core.layers import attention

from qwenimage_pack.core.models import mmdit
from qwenimage_pack.core.layers.run_options import DEFAULT
from qwenimage_pack.nodes import options
from qwenimage_pack.nodes.handles import DiffusionModel


@pytest.fixture
def fake_sage(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "_load_sage", lambda: calls.append(1) or (lambda q, k, v, **kw: attention._sdpa(q, k, v, None)))
    attention.reset()
    yield calls
    attention.reset()


def _handle(fmt="fp8_e4m3fn"):
    return DiffusionModel(module=torch.nn.Linear(2, 2), name="tiny.safetensors", variant="qwen-image", weight_format=fmt)


def test_node_returns_a_new_handle():
    base = _handle()
    (out,) = options.QwenImageSpeedOptions().apply(base, "sage", "row")
    assert out.options == {"attention": "sage", "fp8_matmul": "row"}
    assert base.options == {} and out.module is base.module


def test_fp8_matmul_on_a_bf16_model_says_it_does_nothing(caplog):
    with caplog.at_level(logging.WARNING):
        options.QwenImageSpeedOptions().apply(_handle("bf16"), "sdpa", "auto")
    assert any("no effect" in r.getMessage() for r in caplog.records)


def test_bad_choices_are_named():
    with pytest.raises(ValueError, match="attention must be one of"):
        options.with_speed_options(_handle(), "xformers", "off")
    with pytest.raises(ValueError, match="fp8_matmul must be one of"):
        options.with_speed_options(_handle(), "sdpa", "on")


def test_settings_are_the_handles_run_options(fake_sage, caplog):
    model = options.with_speed_options(_handle(), "sage", "row")
    with caplog.at_level(logging.WARNING), options.speed_settings(model, torch.device("cpu")) as run:
        assert run.attention == "sage" and run.fp8_matmul == "row"
    assert any("float8 tensor cores" in r.getMessage() for r in caplog.records)  # a CPU has none
    # A handle without options runs with the defaults (the environment's fp8 default included).
    with options.speed_settings(_handle(), torch.device("cpu")) as run:
        assert run == DEFAULT and run.attention == "sdpa"
    # "off" is a choice of its own: float8 weights are expanded whatever the default.
    with options.speed_settings(options.with_speed_options(_handle(), "sdpa", "off"), torch.device("cpu")) as run:
        assert run.fp8_matmul is None


def test_a_backend_that_failed_is_not_retried(fake_sage):
    assert attention.resolve("sage") == "sage" and len(fake_sage) == 1
    assert attention.resolve("sage") == "sage" and len(fake_sage) == 1  # loaded once
    attention._fall_back("sage", "sage attention produced NaN")
    assert attention.resolve("sage") == "sdpa" and len(fake_sage) == 1
    assert attention._kernel("sage") is None and attention.failure("sage") == "sage attention produced NaN"
    model = options.with_speed_options(_handle(), "sage", "off")
    assert options.run_options(model).attention == "sdpa"


def test_the_sampler_runs_with_the_handles_options(fake_sage, monkeypatch):
    """The model's attention calls ask for the handle's backend, and only that handle's."""
    import references as refs
    from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT
    from qwenimage_pack.nodes import sampling

    torch.manual_seed(0)
    module = QwenImageMMDiT(MMDiTConfig(**{**refs.TINY_MMDIT, "num_layers": 1})).eval()
    seen = []
    real = attention.attention

    def record(q, k, v, mask=None, backend="sdpa"):
        seen.append(backend)
        return real(q, k, v, mask, backend)

    monkeypatch.setattr(mmdit, "attention", record)  # one block, one attention call per forward
    base = DiffusionModel(module=module, name="tiny.safetensors", variant="qwen-image", weight_format="float32")
    fast = options.with_speed_options(base, "sage", "off")
    positive = [[torch.randn(1, 7, 48, generator=torch.Generator().manual_seed(4)), {}]]
    latent = {"samples": torch.zeros(1, 16, 16, 16)}
    plain = sampling.sample(base, positive, latent, seed=3, steps=2, cfg=1.0, device="cpu")
    got = sampling.sample(fast, positive, latent, seed=3, steps=2, cfg=1.0, device="cpu")
    assert seen == ["sdpa", "sdpa", "sage", "sage"]
    assert torch.equal(got["samples"], plain["samples"])  # on a CPU every backend is SDPA


def test_the_cudnn_backend_is_sdpa_with_another_kernel_order():
    """It only changes which SDPA kernel runs: on a CPU (no cuDNN) the result is SDPA's."""
    q, k, v = (torch.randn(1, 2, 9, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    run = attention._load_cudnn()
    assert torch.allclose(run(q, k, v), attention._sdpa(q, k, v, None), atol=1e-6)
    assert attention.resolve("cudnn") == "cudnn"
    assert torch.equal(attention.attention(q, k, v, backend="cudnn"), attention._sdpa(q, k, v, None))
