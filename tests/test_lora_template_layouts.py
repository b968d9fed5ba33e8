"""The LoRA files of ComfyUI's official Qwen-Image templates, written with their real key names.

One test per family of file (sources: the templates of comfyui-workflow-templates 0.11.31, the
trainers' save code, diffusers' Qwen LoRA conversion, ComfyUI's LoRA loader):

- lightx2v Lightning (Qwen-Image-2512-Lightning-4steps-V1.0-fp32, Qwen-Image-Lightning-4/8steps-V1.0,
  Qwen-Image-Edit-2509- / 2511-Lightning-4steps-V1.0-bf16): bare ``transformer_blocks.N.<module>``
  ``.lora_down.weight`` [64, in] / ``.lora_up.weight`` [out, 64] / ``.alpha`` = 8 (scale 1/8) on the
  8 attention projections and the 4 MLP linears, fp32 or bf16 tensors;
- DiffSynth union control LoRA (qwen_image_union_diffsynth_lora): PEFT ``lora_A.default.weight`` /
  ``lora_B.default.weight``, rank 64, no alpha (scale 1), on the attention projections, img_mod.1 /
  txt_mod.1 and img_mlp / txt_mlp.net.2; as DiffSynth saves it, with the trainer's ``pipe.dit.``
  prefix left on, and repackaged in ComfyUI's ``diffusion_model.`` + lora_down / lora_up spelling;
- Wuli-Qwen-Image-2512-Turbo-LoRA-2steps-V1.0-bf16 and the style LoRAs (qwen-360-diffusion-2512-int8-bf16-v2,
  rank 128: "int8-bf16" means trained against an int8 base, stored in bf16; illustration, gummycandy,
  Edit-2511 SYSTMS / action, Edit-2509 relight): their keys are not published, so every layout their
  trainers write is checked: diffusers / PEFT ``transformer.`` (alpha in JSON metadata), ai-toolkit's
  ``diffusion_model.`` + lora_A / lora_B, kohya / musubi-tuner ``lora_unet_`` + alpha (with the
  top-level layers and the modulation linears).

Each file is parsed onto a tiny MMDiT; every tensor must land on its layer with the file's scale,
and the patched model must equal diffusers' own loading of the same file (PEFT, fused).
"""
from __future__ import annotations

import json

import pytest
import torch

from test_lora import (  # noqa: F401  (fixtures and helpers of the LoRA tests)
    CFG, base, diffusers_fused, inputs, needs_peft, one_thread, ours_from, rel_err, run, shapes,
)
from safetensors.torch import save_file

from qwenimage_pack.core.keymaps.lora import is_union_control
from qwenimage_pack.core.layers.lora_patch import apply_loras
from qwenimage_pack.core.loading.lora import load_lora_file, lora_summary, parse_lora

ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
        "attn.to_out.0", "attn.to_add_out")
LIGHTNING_MODULES = ATTN + ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
DIFFSYNTH_MODULES = ATTN + ("img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1")
ALL_BLOCK_MODULES = ATTN + ("img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                            "txt_mlp.net.2")
TOP_LEVEL = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.timestep_embedder.linear_2")
BLOCKS = range(CFG["num_layers"])


def layer_names(modules, top_level=()):
    return [f"transformer_blocks.{i}.{m}" for i in BLOCKS for m in modules] + list(top_level)


def factors(shapes, names, rank, seed, dtype):
    """Random down [rank, in] / up [out, rank] per layer, scaled so the LoRA clearly moves the output."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        o, i = shapes[n]
        out[n] = ((torch.randn(rank, i, generator=g) * 0.1).to(dtype), (torch.randn(o, rank, generator=g) * 0.1).to(dtype))
    return out


def spell(fs, layout, alpha=None):
    """The state dict a trainer writes; returns {key: tensor} and {layer: (down key, up key)}."""
    sd, keys = {}, {}
    for n, (down, up) in fs.items():
        if layout == "lightx2v":  # bare names, lora_down / lora_up / alpha
            base_key, a, b = n, "lora_down.weight", "lora_up.weight"
        elif layout == "diffsynth":
            base_key, a, b = n, "lora_A.default.weight", "lora_B.default.weight"
        elif layout == "diffsynth_pipe_dit":
            base_key, a, b = f"pipe.dit.{n}", "lora_A.default.weight", "lora_B.default.weight"
        elif layout == "comfy":
            base_key, a, b = f"diffusion_model.{n}", "lora_down.weight", "lora_up.weight"
        elif layout == "ai_toolkit":
            base_key, a, b = f"diffusion_model.{n}", "lora_A.weight", "lora_B.weight"
        elif layout == "peft":
            base_key, a, b = f"transformer.{n}", "lora_A.weight", "lora_B.weight"
        elif layout == "kohya":
            base_key, a, b = "lora_unet_" + n.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        else:
            raise AssertionError(layout)
        sd[f"{base_key}.{a}"], sd[f"{base_key}.{b}"] = down.contiguous(), up.contiguous()
        if alpha is not None:
            sd[f"{base_key}.alpha"] = torch.tensor(float(alpha), dtype=down.dtype)
        keys[n] = (f"{base_key}.{a}", f"{base_key}.{b}")
    return sd, keys


def write(tmp_path, name, sd, metadata=None):
    path = tmp_path / name
    save_file(sd, str(path), metadata=metadata)
    return path


def parse(base, path):
    model = ours_from(base)
    return model, parse_lora(load_lora_file(path), model, path)


def assert_lands(weights, sd, keys, scale):
    """Every file tensor sits on the layer its key names, untouched (dtype kept), with ``scale``."""
    assert sorted(weights.layers) == sorted(keys) and not weights.ignored
    for n, (down_key, up_key) in keys.items():
        layer = weights.layers[n]
        assert layer.kind == "lora" and layer.rank == sd[down_key].shape[0]
        assert layer.down.dtype == sd[down_key].dtype and torch.equal(layer.down, sd[down_key])
        assert torch.equal(layer.up, sd[up_key])
        assert layer.scale == pytest.approx(scale, rel=1e-6)


def assert_matches_diffusers(base, inputs, model, weights, reference_path, strength=1.0, convert=True):
    expected = diffusers_fused(base, inputs, reference_path, strength=strength, convert=convert)
    assert rel_err(run(base, inputs), expected) > 1e-2  # the LoRA really changes the output
    apply_loras(model, [(weights, strength)])
    assert rel_err(run(model, inputs), expected) <= 1e-5


@needs_peft
@pytest.mark.parametrize("name,dtype", [
    ("Qwen-Image-2512-Lightning-4steps-V1.0-fp32.safetensors", torch.float32),
    ("Qwen-Image-Lightning-4steps-V1.0.safetensors", torch.bfloat16),
    ("Qwen-Image-Lightning-8steps-V1.0.safetensors", torch.bfloat16),
    ("Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors", torch.bfloat16),
    ("Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors", torch.bfloat16),
])
def test_lightx2v_lightning_files(base, shapes, inputs, tmp_path, name, dtype):
    fs = factors(shapes, layer_names(LIGHTNING_MODULES), rank=64, seed=31, dtype=dtype)
    sd, keys = spell(fs, "lightx2v", alpha=8)
    path = write(tmp_path, name, sd)
    model, weights = parse(base, path)
    assert_lands(weights, sd, keys, scale=8 / 64)
    assert lora_summary(weights) == f"{name}: bare-key LoRA, rank 64, {len(keys)} layers"
    assert not is_union_control(name)
    assert_matches_diffusers(base, inputs, model, weights, path)


@needs_peft
def test_fp32_lightning_file_on_a_bf16_model(base, shapes, inputs, tmp_path):
    """The fp32 2512 Lightning file on a bf16 model: factors cast at compute time, result as bf16 allows."""
    fs = factors(shapes, layer_names(LIGHTNING_MODULES), rank=64, seed=32, dtype=torch.float32)
    path = write(tmp_path, "Qwen-Image-2512-Lightning-4steps-V1.0-fp32.safetensors", spell(fs, "lightx2v", alpha=8)[0])
    expected = diffusers_fused(base, inputs, path)
    model = ours_from(base).to(torch.bfloat16)
    weights = parse_lora(load_lora_file(path), model, path)
    apply_loras(model, [(weights, 1.0)])
    bf16_inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                   for k, v in inputs.items()}
    got = run(model, bf16_inputs)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert rel_err(got.float(), expected) <= 3e-2


@needs_peft
@pytest.mark.parametrize("layout", ["diffsynth", "diffsynth_pipe_dit", "comfy"])
def test_union_control_lora_file(base, shapes, inputs, tmp_path, layout):
    """qwen_image_union_diffsynth_lora as DiffSynth saves it, with the ``pipe.dit.`` prefix left on,
    and in ComfyUI's spelling; diffusers reads the DiffSynth file itself."""
    fs = factors(shapes, layer_names(DIFFSYNTH_MODULES), rank=64, seed=33, dtype=torch.bfloat16)
    sd, keys = spell(fs, layout)
    path = write(tmp_path, "qwen_image_union_diffsynth_lora.safetensors", sd)
    model, weights = parse(base, path)
    assert_lands(weights, sd, keys, scale=1.0)
    assert weights.format.startswith("DiffSynth/PEFT" if layout.startswith("diffsynth") else "ComfyUI")
    assert is_union_control(path.name)
    reference = write(tmp_path, "reference.safetensors", spell(fs, "diffsynth")[0])
    assert_matches_diffusers(base, inputs, model, weights, reference)


@needs_peft
@pytest.mark.parametrize("layout", ["peft", "ai_toolkit", "kohya"])
def test_wuli_turbo_2steps_file(base, shapes, inputs, tmp_path, layout):
    """Wuli-Qwen-Image-2512-Turbo-LoRA-2steps-V1.0-bf16 (layout unpublished): each trainer's spelling."""
    fs = factors(shapes, layer_names(ALL_BLOCK_MODULES), rank=32, seed=34, dtype=torch.bfloat16)
    metadata, convert, alpha, scale = None, True, None, 1.0
    if layout == "peft":  # diffusers' save_lora_weights: alpha in the JSON metadata, not as tensors
        config = {"r": 32, "lora_alpha": 16, "target_modules": list(ALL_BLOCK_MODULES)}
        metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
        convert, scale = False, 0.5
    elif layout == "kohya":
        alpha, scale = 16, 0.5
    sd, keys = spell(fs, layout, alpha=alpha)
    path = write(tmp_path, "Wuli-Qwen-Image-2512-Turbo-LoRA-2steps-V1.0-bf16.safetensors", sd, metadata)
    model, weights = parse(base, path)
    assert_lands(weights, sd, keys, scale=scale)
    assert_matches_diffusers(base, inputs, model, weights, path, convert=convert)


@needs_peft
@pytest.mark.parametrize("name,layout", [
    ("qwen-360-diffusion-2512-int8-bf16-v2.safetensors", "kohya"),
    ("qwen-360-diffusion-2512-int8-bf16-v2.safetensors", "ai_toolkit"),
    ("illustration-1.0-qwen-image.safetensors", "peft"),
    ("Qwen_Image_Edit_2511-SYSTMS_INFL8.safetensors", "diffsynth"),
])
def test_style_lora_files(base, shapes, inputs, tmp_path, name, layout):
    """Style LoRAs, rank 128 in bf16 (the 360 LoRA's size), including the top-level layers a
    full-model LoRA covers; the "int8-bf16" in a name changes nothing in the keys."""
    fs = factors(shapes, layer_names(ALL_BLOCK_MODULES, TOP_LEVEL), rank=128, seed=35, dtype=torch.bfloat16)
    alpha = 64 if layout == "kohya" else None
    sd, keys = spell(fs, layout, alpha=alpha)
    path = write(tmp_path, name, sd)
    model, weights = parse(base, path)
    assert_lands(weights, sd, keys, scale=0.5 if alpha else 1.0)
    assert not is_union_control(name)
    assert_matches_diffusers(base, inputs, model, weights, path, strength=0.8)


@pytest.mark.parametrize("name,union", [
    ("qwen_image_union_diffsynth_lora.safetensors", True),
    ("Qwen-Image-In-Context-Control-Union/model.safetensors", True),
    ("controlnets/Qwen_Image_Union_Control_LoRA.safetensors", True),
    ("Qwen-Image-Lightning-8steps-V1.0.safetensors", False),
    ("qwen_image_union_style.safetensors", False),
    ("Qwen-Image-Edit-2509-Light-Migration.safetensors", False),
])
def test_union_control_lora_is_recognised_by_name(name, union):
    assert is_union_control(name) is union
