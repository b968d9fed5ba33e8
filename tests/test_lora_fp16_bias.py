"""A LoRA with bias deltas (``diff_b``) on the float16 path gives what diffusers gives in float32.

float16 runs every projection on inputs down-scaled by ``s`` and undoes the scale afterwards
(mmdit._project). Only an input-independent term needs undoing, and a LoRA's bias delta is one
as much as the layer's own bias: left out, it comes back ``1 / s`` times too large (16x for
the attention inputs). The reference is diffusers' model in float32 with the LoRA factors fused
by diffusers / PEFT (``fuse_lora``) and the bias deltas added to the biases.
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import QwenImagePipeline
from safetensors.torch import save_file

from test_lora import base, shapes  # noqa: F401  (the LoRA tests' tiny diffusers model, as fixtures)
from test_lora import CFG, lora_factors, needs_peft, rel_err
from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT
from qwenimage_pack.core.layers.lora_patch import apply_loras
from qwenimage_pack.core.loading.lora import load_lora_file, parse_lora

STRENGTH = 0.7
ALPHA = 1


def _lora_files(tmp_path, shapes, biased):
    """The same LoRA twice: factors and bias deltas (ours), factors only (for diffusers)."""
    g = torch.Generator().manual_seed(31)
    factors = lora_factors(shapes, seed=30)
    diff_b = {n: torch.randn(shapes[n][0], generator=g) * 0.5 for n in shapes if n in biased}
    full, plain = {}, {}
    for n, (down, up) in factors.items():
        plain[f"{n}.lora_down.weight"], plain[f"{n}.lora_up.weight"] = down, up
        plain[f"{n}.alpha"] = torch.tensor(float(ALPHA))
    full.update(plain)
    full.update({f"{n}.diff_b": b for n, b in diff_b.items()})
    ours, theirs = tmp_path / "with_bias.safetensors", tmp_path / "factors.safetensors"
    save_file(full, str(ours))
    save_file(plain, str(theirs))
    return ours, theirs, diff_b


def _diffusers_fp32(base, factors_path, diff_b, x, sigma, context):  # noqa: F811
    ref = copy.deepcopy(base)
    ref.load_lora_adapter(QwenImagePipeline.lora_state_dict(str(factors_path)), prefix="transformer")
    ref.fuse_lora(lora_scale=STRENGTH)
    with torch.no_grad():
        for n, b in diff_b.items():
            mod = ref.get_submodule(n)
            getattr(mod, "base_layer", mod).bias += STRENGTH * b  # PEFT wraps the fused Linear
    b_, c, h, w = x.shape
    tokens = QwenImagePipeline._pack_latents(x, b_, c, h, w)
    with torch.no_grad():
        out = ref(hidden_states=tokens, encoder_hidden_states=context, timestep=sigma,
                  img_shapes=[(1, h // 2, w // 2)] * b_, return_dict=False)[0]
    return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]


@needs_peft
def test_fp16_lora_bias_deltas_match_diffusers_fp32(base, shapes, tmp_path):  # noqa: F811
    biased = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    ours_path, factors_path, diff_b = _lora_files(tmp_path, shapes, biased)
    g = torch.Generator().manual_seed(32)
    x, context, sigma = torch.randn(1, 16, 8, 6, generator=g), torch.randn(1, 7, 48, generator=g), torch.tensor([0.6])
    expected = _diffusers_fp32(base, factors_path, diff_b, x, sigma, context)

    model = QwenImageMMDiT(MMDiTConfig(**CFG))
    model.load_state_dict(base.state_dict(), strict=True)
    weights = parse_lora(load_lora_file(ours_path), model, ours_path)
    assert sum(layer.diff_b is not None for layer in weights.layers.values()) == len(diff_b) > 0
    apply_loras(model, [(weights, STRENGTH)])
    with torch.no_grad():
        fp32 = model(x, sigma, context)
        model.compute_dtype = torch.float16  # fp32 weights, float16 compute: the scaled path
        fp16 = model(x, sigma, context)
    assert rel_err(fp32, expected) < 1e-5  # the LoRA itself (bias deltas included) is right
    # The bias deltas matter: leaving them out is far from the reference.
    without = _diffusers_fp32(base, factors_path, {}, x, sigma, context)
    assert rel_err(without, expected) > 0.05
    assert fp16.dtype == torch.float32 and torch.isfinite(fp16).all()
    err = rel_err(fp16, expected)
    max_abs = float((fp16 - expected).abs().max())
    # float16 rounding alone (the LoRA merged into the weights, float16): 0.3 %, 0.0065 here
    assert err < 1e-2 and max_abs < 0.03, (err, max_abs)

