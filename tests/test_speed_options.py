"""The Speed Options node: a new handle carrying attention / fp8-matmul choices, applied only
while that model samples and restored afterwards."""
from __future__ import annotations

import logging

import pytest
import torch

from qwenimage_pack.model_defs import attention, fp8_matmul
from qwenimage_pack.nodes import options
from qwenimage_pack.nodes.handles import DiffusionModel


@pytest.fixture
def fake_sage(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "_load_sage", lambda: calls.append(1) or (lambda q, k, v, **kw: attention._sdpa(q, k, v, None)))
    attention._failed.clear()
    yield calls
    attention.set_backend("sdpa")
    attention._failed.clear()
    attention._checked.clear()


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


def test_settings_hold_only_inside_the_run(fake_sage, caplog):
    model = options.with_speed_options(_handle(), "sage", "row")
    assert attention.get_backend() == "sdpa" and not fp8_matmul.is_enabled()
    with caplog.at_level(logging.WARNING), options.speed_settings(model, torch.device("cpu")):
        assert attention.get_backend() == "sage" and fp8_matmul.is_enabled()
    assert attention.get_backend() == "sdpa" and not fp8_matmul.is_enabled()
    assert any("float8 tensor cores" in r.getMessage() for r in caplog.records)  # a CPU has none
    # A handle without options leaves the session's settings alone.
    fp8_matmul.set_enabled(True)
    try:
        with options.speed_settings(_handle(), torch.device("cpu")):
            assert fp8_matmul.is_enabled() and attention.get_backend() == "sdpa"
    finally:
        fp8_matmul.set_enabled(False)


def test_a_backend_that_failed_is_not_retried(fake_sage):
    assert attention.set_backend("sage") == "sage" and len(fake_sage) == 1
    attention._fall_back("sage attention produced NaN")
    assert attention.set_backend("sage") == "sdpa" and len(fake_sage) == 1


def test_the_sampler_runs_with_the_handles_options(fake_sage):
    """Inside the model's forward the chosen backend is active; before and after it is not."""
    import references as refs
    from qwenimage_pack.model_defs.mmdit import MMDiTConfig, QwenImageMMDiT
    from qwenimage_pack.nodes import sampling

    torch.manual_seed(0)
    module = QwenImageMMDiT(MMDiTConfig(**{**refs.TINY_MMDIT, "num_layers": 1})).eval()
    seen = []
    module.register_forward_pre_hook(lambda *_: seen.append(attention.get_backend()))
    base = DiffusionModel(module=module, name="tiny.safetensors", variant="qwen-image", weight_format="float32")
    fast = options.with_speed_options(base, "sage", "off")
    positive = [[torch.randn(1, 7, 48, generator=torch.Generator().manual_seed(4)), {}]]
    latent = {"samples": torch.zeros(1, 16, 16, 16)}
    plain = sampling.sample(base, positive, latent, seed=3, steps=2, cfg=1.0, device="cpu")
    got = sampling.sample(fast, positive, latent, seed=3, steps=2, cfg=1.0, device="cpu")
    assert seen == ["sdpa", "sdpa", "sage", "sage"] and attention.get_backend() == "sdpa"
    assert torch.equal(got["samples"], plain["samples"])  # on a CPU every backend is SDPA


def test_the_cudnn_backend_is_sdpa_with_another_kernel_order():
    """It only changes which SDPA kernel runs: on a CPU (no cuDNN) the result is SDPA's."""
    q, k, v = (torch.randn(1, 2, 9, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    run = attention._load_cudnn()
    assert torch.allclose(run(q, k, v), attention._sdpa(q, k, v, None), atol=1e-6)
    with attention.using("cudnn") as chosen:
        assert chosen == "cudnn"
    assert attention.get_backend() == "sdpa"
