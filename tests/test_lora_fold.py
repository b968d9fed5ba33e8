"""LoRAs folded into dense GPU weights (core/layers/fold.py) give what diffusers' fuse_lora gives, and
come out exactly when the LoRA changes, is removed, or the model leaves the GPU.

No GPU here: each weight gets a copy in fresh memory standing in for its GPU copy, next to the
file view it came from (as the loader leaves a weight read unchanged from a file)."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from test_lora import base, inputs  # noqa: F401  (the LoRA tests' tiny model and inputs, as fixtures)
from test_lora import diffusers_fused, lora_factors, needs_peft, ours_from, rel_err, run, write_lora
from qwenimage_pack.core.layers import file_views, host_memory
from qwenimage_pack.core.layers import fold
from qwenimage_pack.core.layers.linear import Linear
from qwenimage_pack.core.layers.lora_patch import apply_loras
from qwenimage_pack.core.loading.lora import load_lora_file, parse_lora


def on_stand_in_gpu(base, tmp_path):
    """``base`` with our Linear layers whose weights are file views, then copied to fresh memory."""
    model = ours_from(base)
    path = tmp_path / "weights.safetensors"
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    save_file({f"{n}.weight": m.weight.detach().contiguous() for n, m in linears.items()}, str(path))
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for n, m in linears.items():
            m.weight = nn.Parameter(f.get_tensor(f"{n}.weight"), requires_grad=False)
            file_views.keep_file_view(m, "weight")
    views = {n: file_views.file_view(m, "weight") for n, m in linears.items()}
    for m in linears.values():
        m.weight.data = m.weight.data.clone()
    return model, linears, views


@pytest.fixture
def setup(base, inputs, tmp_path):
    shapes = {n: tuple(m.weight.shape) for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    path = write_lora(tmp_path, lora_factors(shapes, seed=3), "peft")
    model, linears, views = on_stand_in_gpu(base, tmp_path)
    weights = parse_lora(load_lora_file(path), model, path)
    return model, linears, views, weights, path


@needs_peft
def test_folded_lora_matches_diffusers_fuse_lora(base, inputs, setup):
    model, linears, views, weights, path = setup
    apply_loras(model, [(weights, 1.0)])
    additive = run(model, inputs)
    weights.release_device_copies()
    assert fold.fold(model, allow_cpu=True) == len(weights.layers)
    assert fold.fold(model, allow_cpu=True) == 0  # already folded: nothing to do
    folded = run(model, inputs)
    reference = diffusers_fused(base, inputs, path)
    assert rel_err(folded, reference) < 1e-5 and rel_err(folded, additive) < 1e-5
    # folded patches do not run: no per-device copies of the factors were made
    assert all(not layer._cache for layer in weights.layers.values())


@needs_peft
def test_strength_change_and_removal_restore_exactly(base, inputs, setup):
    model, linears, views, weights, path = setup
    plain = run(model, inputs)
    apply_loras(model, [(weights, 1.0)])
    fold.fold(model, allow_cpu=True)
    apply_loras(model, [(weights, 0.5)])  # restores the changed layers before re-weighting
    assert all(not m.folded for m in linears.values())
    assert all(torch.equal(m.weight, views[n]) for n, m in linears.items())
    fold.fold(model, allow_cpu=True)
    assert rel_err(run(model, inputs), diffusers_fused(base, inputs, path, strength=0.5)) < 1e-5
    apply_loras(model, [])
    assert all(torch.equal(m.weight, views[n]) and not m.folded for n, m in linears.items())
    assert rel_err(run(model, inputs), plain) < 1e-6  # the weights are bit-exact (above)


def test_leaving_the_gpu_drops_the_folded_copy(base, inputs, setup):
    model, linears, views, weights, _ = setup
    apply_loras(model, [(weights, 1.0)])
    additive = run(model, inputs)
    fold.fold(model, allow_cpu=True)
    host_memory.move(model, "cpu")  # what placement does on eviction
    assert all(m.weight.data_ptr() == views[n].data_ptr() and not m.folded for n, m in linears.items())
    # the patches run again, on the file's weights (same values; BLAS may round differently on other memory)
    assert rel_err(run(model, inputs), additive) < 1e-6


def test_what_is_never_folded(base, inputs, setup):
    model, linears, views, weights, _ = setup
    apply_loras(model, [(weights, 1.0)])
    lin = next(iter(linears.values()))
    assert fold.fold(model) == 0  # weights on the CPU: only with allow_cpu (tests)
    lin.weight.data = views[next(iter(linears))]  # the file view itself: writing would touch the mapping
    assert not fold.can_fold(lin, allow_cpu=True)
    fp8 = Linear(4, 4)
    fp8.weight.data = fp8.weight.data.to(torch.float8_e4m3fn)
    assert not fold.can_fold(fp8, allow_cpu=True)  # would need re-quantizing
    converted = Linear(4, 4)  # no file view to restore from
    assert not fold.can_fold(converted, allow_cpu=True)


def test_the_sampler_folds_a_resident_models_loras(base, setup, tmp_path, monkeypatch):
    from qwenimage_pack.core.loading.load import load_mmdit
    from qwenimage_pack.nodes import sampling
    from qwenimage_pack.nodes.handles import DiffusionModel

    _, _, _, weights, path = setup
    file = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(file))
    module = load_mmdit(file)
    for p in module.parameters():  # the stand-in GPU copy
        p.data = p.data.clone()
    ours = parse_lora(load_lora_file(path), module, path)
    handle = DiffusionModel(module=module, name="dit.safetensors", variant="qwen-image", weight_format="float32",
                            loras=(("lora", ours, 0.8),))
    positive = [[torch.randn(1, 7, 48, generator=torch.Generator().manual_seed(4)), {}]]
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    additive = sampling.sample(handle, positive, latent, seed=3, steps=2, cfg=1.0, device="cpu")
    calls = []
    real_fold = fold.fold
    monkeypatch.setattr(fold, "fold", lambda m: calls.append(real_fold(m, allow_cpu=True)))
    folded = sampling.sample(handle, positive, latent, seed=3, steps=2, cfg=1.0, device="cpu")
    assert calls == [len(ours.layers)]
    assert rel_err(folded["samples"], additive["samples"]) < 1e-5
