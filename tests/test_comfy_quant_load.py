"""ComfyUI mixed-precision checkpoints (nvfp4, mxfp8, int8, ConvRot w4a4, w4a8) through load_mmdit.

Every transformer-block Linear of a tiny MMDiT is quantized with comfy-kitchen (the library
ComfyUI uses), written the way ComfyUI writes such files (kitchen's tensors plus a per-layer
``comfy_quant`` JSON tensor, or the same dicts in the header's ``_quantization_metadata``), and
loaded by our DiT loader. The reference is diffusers' QwenImageTransformer2DModel holding
kitchen's own dequantized weights. Skipped without comfy-kitchen.
"""
from __future__ import annotations

import json

import pytest
import torch

from safetensors.torch import save_file
from test_load_mmdit import inputs, ref, rel_err, run_ours, run_ref, state, with_weights  # noqa: F401  (fixtures)

from qwenimage_pack.core.loading.load import load_mmdit

ck_tensor = pytest.importorskip("comfy_kitchen.tensor")
diffusers = pytest.importorskip("diffusers")

# format id -> (comfy_quant JSON, kitchen layout, layout kwargs). ConvRot groups of 16 divide the tiny widths.
FORMATS = {
    "nvfp4": ({"format": "nvfp4"}, "TensorCoreNVFP4Layout", {}),
    "mxfp8": ({"format": "mxfp8"}, "TensorCoreMXFP8Layout", {}),
    "int8_convrot": ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 16},
                     "TensorWiseINT8Layout", {"per_channel": True, "convrot": True, "convrot_groupsize": 16}),
    "convrot_w4a4": ({"format": "convrot_w4a4", "convrot_groupsize": 16}, "TensorCoreConvRotW4A4Layout",
                     {"convrot_groupsize": 16}),
    "w4a8": ({"format": "asym_w4a8_int8", "group_size": 16, "convrot_groupsize": 16}, "AsymW4A8Int8Layout",
             {"group_size": 16, "convrot_groupsize": 16}),
}


def _quantized_file(ref, fmt: str, tmp_path, in_header: bool = False):
    """(path, the dense weights kitchen decodes) for a file whose block Linears are all in ``fmt``."""
    conf, layout, kw = FORMATS[fmt]
    out, dense, layers = {}, {}, {}
    g = torch.Generator().manual_seed(3)
    for key, value in state(ref).items():
        linear = key.startswith("transformer_blocks.") and key.endswith(".weight") and "norm" not in key
        if not linear:
            out[key] = dense[key] = value.bfloat16()
            continue
        layer = key[: -len(".weight")]
        qt = ck_tensor.QuantizedTensor.from_float(value.float(), layout, **kw)
        for name, t in qt.state_dict("weight").items():
            out[f"{layer}.{name}"] = t.contiguous()
        w = qt.dequantize().float()
        if fmt == "nvfp4":  # AWQ smoothing: the layer computes (x * s) @ W.T, i.e. x @ (W * s).T
            s = torch.rand(value.shape[1], generator=g) + 0.5
            out[f"{layer}.pre_quant_scale"] = s
            w = w * s
        dense[key] = w
        if in_header:
            layers[layer] = conf
        else:
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    path = tmp_path / f"qwen_image_{fmt}.safetensors"
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if in_header else None
    save_file(out, str(path), metadata=metadata)
    return path, dense


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_loads_compact_and_matches_diffusers_on_kitchens_weights(ref, inputs, tmp_path, fmt):
    path, dense = _quantized_file(ref, fmt, tmp_path)
    model = load_mmdit(path, compute_dtype=torch.float32)
    lin = model.transformer_blocks[0].attn.to_q
    assert lin.comfy_quant.format == FORMATS[fmt][0]["format"]
    assert lin.weight.dtype != torch.float32 and lin.weight.element_size() == 1  # kept as the file stores it
    assert rel_err(run_ours(model, *inputs), run_ref(with_weights(ref, dense), *inputs)) <= 1e-5


def test_header_metadata_and_decoding_at_load(ref, inputs, tmp_path):
    """The header's _quantization_metadata marks the layers; weight_dtype fp32 decodes once at load."""
    path, dense = _quantized_file(ref, "nvfp4", tmp_path, in_header=True)
    expected = run_ref(with_weights(ref, dense), *inputs)
    compact = load_mmdit(path, compute_dtype=torch.float32)
    assert compact.transformer_blocks[1].img_mlp.net[2].comfy_quant.format == "nvfp4"
    assert rel_err(run_ours(compact, *inputs), expected) <= 1e-5
    decoded = load_mmdit(path, weight_dtype="fp32")
    lin = decoded.transformer_blocks[0].attn.to_q
    assert lin.comfy_quant is None and lin.weight.dtype == torch.float32
    assert rel_err(run_ours(decoded, *inputs), expected) <= 1e-5


def test_a_lora_applies_on_quantized_layers(ref, inputs, tmp_path):
    """LoRA patches add after the decoded matmul: same as on the dense model."""
    from qwenimage_pack.core.layers.lora_patch import LoraLayer, LoraWeights, apply_loras
    from qwenimage_pack.core.loading.load import load_mmdit as load

    path, dense = _quantized_file(ref, "int8_convrot", tmp_path)
    dense_path = tmp_path / "dense.safetensors"
    save_file({k: v.float().contiguous() for k, v in dense.items()}, str(dense_path))
    quantized, plain = load(path, compute_dtype=torch.float32), load(dense_path, compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    lin = plain.transformer_blocks[0].attn.to_q
    layer = LoraLayer(lin.in_features, lin.out_features, "lora", scale=0.5,
                      down=torch.randn(4, lin.in_features, generator=g), up=torch.randn(lin.out_features, 4, generator=g),
                      rank=4)
    weights = LoraWeights("test.safetensors", "test", {"transformer_blocks.0.attn.to_q": layer})
    for model in (quantized, plain):
        apply_loras(model, [(weights, 0.8)])
    assert rel_err(run_ours(quantized, *inputs), run_ours(plain, *inputs)) <= 1e-5


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_block_scaled_matmuls_reach_every_quantized_layer(ref, inputs, tmp_path, fmt, monkeypatch):
    """RunOptions.blockscaled_matmul, passed to the model call, reaches every nvfp4 / mxfp8 Linear
    that runs (here the kernel's arithmetic emulated on the CPU; tests/test_blockscaled_matmul.py
    checks it against ComfyUI's): each quantized layer then rounds its input too, nothing else."""
    from qwenimage_pack.core.layers.linear import Linear
    from qwenimage_pack.core.layers.run_options import RunOptions
    from qwenimage_pack.core.quant import blockscaled_matmul

    path, _ = _quantized_file(ref, fmt, tmp_path)
    model = load_mmdit(path, compute_dtype=torch.bfloat16)  # the kernels take bf16 / fp16 activations
    ran, fast_path = set(), set()
    for lin in model.modules():
        if isinstance(lin, Linear) and lin.comfy_quant is not None:
            lin.register_forward_hook(lambda m, args, out: ran.add(id(m.weight)))
    real = blockscaled_matmul.try_linear

    def recording(x, quant, weight, *args):
        y = real(x, quant, weight, *args)
        if y is not None:
            fast_path.add(id(weight))
        return y

    monkeypatch.setattr(blockscaled_matmul, "try_linear", recording)
    with torch.no_grad():
        fast = model(*inputs, options=RunOptions(blockscaled_matmul=True, blockscaled_on_cpu=True)).float()
    assert len(ran) >= 20 and fast_path == ran
    decoded = run_ours(model, *inputs)  # the same bf16 model, weights decoded
    assert not torch.equal(fast, decoded)
    assert rel_err(fast, decoded) <= (0.02 if fmt == "nvfp4" else 0.01)
