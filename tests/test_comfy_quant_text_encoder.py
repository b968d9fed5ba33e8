"""Text-encoder files with ComfyUI mixed-precision layers, the vision tower's included.

ComfyUI 0.30 builds its text encoders with the same mixed-precision ops as the diffusion model,
so a quantized Qwen2.5-VL file may hold int8 / nvfp4 / mxfp8 layers in the language model and in
the vision tower. The language model keeps them as stored (decoded in the layer); the vision
tower is returned as plain tensors, so its layers are decoded at load. The tower's MLP width here
(40, like 3420 in the real 7B) is no multiple of 16 or 32: nvfp4 / mxfp8 store it padded.

References: transformers' Qwen2.5-VL holding comfy-kitchen's dequantized weights (kitchen is the
library ComfyUI quantizes with). Skipped without comfy-kitchen or transformers.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import references as refs

from qwenimage_pack.core.encoders.vision import build_vision_tower
from qwenimage_pack.core.loading.load import inspect_file, load_text_encoder

transformers = pytest.importorskip("transformers")
ck_tensor = pytest.importorskip("comfy_kitchen.tensor")

VOCAB = 1000
IDS = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(2))
FORMATS = {  # JSON as ComfyUI writes it, kitchen layout, its arguments
    "int8": ({"format": "int8_tensorwise"}, "TensorWiseINT8Layout", {"per_channel": True}),
    "nvfp4": ({"format": "nvfp4"}, "TensorCoreNVFP4Layout", {}),
    "mxfp8": ({"format": "mxfp8"}, "TensorCoreMXFP8Layout", {}),
}


@pytest.fixture(scope="module")
def reference():
    return refs.qwen25vl_reference(vision_depth=2, vision_intermediate=40, vocab=VOCAB)


def _quantized(reference, fmt: str, tmp_path):
    """(path, reference holding kitchen's dense weights, the vision tensors it holds)."""
    conf, layout, kw = FORMATS[fmt]
    dense = copy.deepcopy(reference)
    dense_sd = dense.state_dict()
    out = {}
    g = torch.Generator().manual_seed(4)
    for key, value in refs.original_text_layout(reference.state_dict()).items():
        linear = value.dim() == 2 and key.endswith(".weight") and (".layers." in key or key.startswith("visual."))
        if not linear or "embed" in key:
            out[key] = value
            continue
        layer = key[: -len(".weight")]
        qt = ck_tensor.QuantizedTensor.from_float(value.float(), layout, **kw)
        out.update({f"{layer}.{n}": t.contiguous() for n, t in qt.state_dict("weight").items()})
        out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
        w = qt.dequantize().float()
        if fmt == "nvfp4":  # AWQ smoothing: the layer computes (x * s) @ W.T
            s = torch.rand(value.shape[1], generator=g) + 0.5
            out[f"{layer}.pre_quant_scale"] = s
            w = w * s
        ref_key = ("model.language_model." + key[len("model."):]) if key.startswith("model.") else "model." + key
        dense_sd[ref_key].copy_(w)
    path = tmp_path / f"qwen_2.5_vl_7b_{fmt}.safetensors"
    save_file(out, str(path))
    vision = {k[len("model.visual."):]: v for k, v in dense.state_dict().items() if k.startswith("model.visual.")}
    return path, dense, vision


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_text_encoder_and_vision_tower(reference, tmp_path, fmt):
    path, dense, vision_ref = _quantized(reference, fmt, tmp_path)
    assert "ComfyUI mixed precision" in inspect_file(path).layout
    model, vision = load_text_encoder(path)
    q_proj = model.layers[0].self_attn.q_proj
    assert q_proj.comfy_quant is not None and q_proj.comfy_quant.format == FORMATS[fmt][0]["format"]
    with torch.no_grad():
        expected = dense.model(input_ids=IDS).last_hidden_state
    assert _rel(model(input_ids=IDS), expected) <= 1e-5
    # The tower's layers come back decoded (bf16 by default), in their true shapes: padding cut.
    assert set(vision) == set(vision_ref)
    for k, v in vision_ref.items():
        assert vision[k].shape == v.shape, k
        # bf16 products of bf16-rounded scales, as ComfyUI decodes in bf16 (fp32 is exact: below)
        assert _rel(vision[k], v) <= 8e-3, k
    build_vision_tower(vision)


def test_fp32_decodes_the_vision_tower_exactly(reference, tmp_path):
    """weight_dtype fp32: kitchen's float32 decoding, the nvfp4 smoothing folded in, to the bit."""
    path, _, vision_ref = _quantized(reference, "nvfp4", tmp_path)
    _, vision = load_text_encoder(path, weight_dtype="fp32")
    for k, v in vision_ref.items():
        assert vision[k].dtype == torch.float32 and torch.equal(vision[k], v), k


def test_a_vision_layer_that_fits_no_tower_is_refused(reference, tmp_path):
    """A quantized vision weight whose rows do not match its bias: an error naming file and layer."""
    from qwenimage_pack.core.errors import WeightFileError
    from safetensors.torch import load_file

    path, _, _ = _quantized(reference, "int8", tmp_path)
    sd = load_file(str(path))
    sd["visual.blocks.0.mlp.down_proj.weight"] = sd["visual.blocks.0.mlp.down_proj.weight"][:16].clone()
    sd["visual.blocks.0.mlp.down_proj.weight_scale"] = sd["visual.blocks.0.mlp.down_proj.weight_scale"][:16].clone()
    bad = tmp_path / "qwen_2.5_vl_7b_int8_cut.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(WeightFileError, match=r"qwen_2.5_vl_7b_int8_cut.*visual\.blocks\.0\.mlp\.down_proj"):
        load_text_encoder(bad)
