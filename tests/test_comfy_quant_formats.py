"""ComfyUI ``comfy_quant`` layers (core/quant/comfy_quant.py) against comfy-kitchen.

The reference is comfy-kitchen itself (the library ComfyUI 0.30 quantizes and dequantizes
with, pinned to its version): random weights are quantized with kitchen's layouts, written the
way ComfyUI's ``MixedPrecisionOps.Linear.state_dict`` writes them (kitchen's tensors, a
``comfy_quant`` JSON tensor, bias, nvfp4 extras) through a safetensors file, read back, and our
decoder must give exactly kitchen's ``QuantizedTensor.dequantize()``. Skipped without kitchen.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qwenimage_pack.core.quant import comfy_quant as cq

ck_tensor = pytest.importorskip("comfy_kitchen.tensor")
QuantizedTensor = ck_tensor.QuantizedTensor

# name, JSON as ComfyUI writes it, kitchen layout, layout kwargs, [out, in] shapes.
# 200x344 needs nvfp4 (16) and mxfp8 (32) padding; 3072x64 is img_in-like; 96x160 / 64x3072 small Qwen-likes.
CASES = [
    ("fp8_e4m3", {"format": "float8_e4m3fn"}, "TensorCoreFP8Layout", {}, [(96, 160), (200, 344), (3072, 64)]),
    ("fp8_e5m2", {"format": "float8_e5m2"}, "TensorCoreFP8Layout", {"dtype": torch.float8_e5m2}, [(96, 160), (200, 344)]),
    ("nvfp4", {"format": "nvfp4"}, "TensorCoreNVFP4Layout", {}, [(96, 160), (200, 344), (3072, 64), (33, 40)]),
    ("mxfp8", {"format": "mxfp8"}, "TensorCoreMXFP8Layout", {}, [(96, 160), (200, 344), (3072, 64), (33, 40)]),
    ("int8_tensor", {"format": "int8_tensorwise"}, "TensorWiseINT8Layout", {}, [(96, 160), (3072, 64)]),
    ("int8_row", {"format": "int8_tensorwise"}, "TensorWiseINT8Layout", {"per_channel": True}, [(96, 160)]),
    ("int8_convrot256", {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256},
     "TensorWiseINT8Layout", {"per_channel": True, "convrot": True, "convrot_groupsize": 256}, [(64, 3072), (96, 512)]),
    ("int8_convrot16", {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 16},
     "TensorWiseINT8Layout", {"per_channel": True, "convrot": True, "convrot_groupsize": 16}, [(96, 160)]),
    ("w4a4_256", {"format": "convrot_w4a4", "convrot_groupsize": 256}, "TensorCoreConvRotW4A4Layout",
     {"convrot_groupsize": 256}, [(64, 3072), (96, 512)]),
    ("w4a4_64_int8", {"format": "convrot_w4a4", "convrot_groupsize": 64, "linear_dtype": "int8"},
     "TensorCoreConvRotW4A4Layout", {"convrot_groupsize": 64, "linear_dtype": "int8"}, [(3072, 64), (96, 192)]),
    ("w4a8_codebook", {"format": "asym_w4a8_int8", "group_size": 16, "convrot_groupsize": 256}, "AsymW4A8Int8Layout",
     {"group_size": 16, "convrot_groupsize": 256}, [(64, 3072), (96, 512)]),
    ("w4a8_linear_g32", {"format": "asym_w4a8_int8", "group_size": 32, "convrot_groupsize": 64}, "AsymW4A8Int8Layout",
     {"group_size": 32, "convrot_groupsize": 64, "codebook": False}, [(96, 192)]),
]
PARAMS = [pytest.param(c, s, id=f"{c[0]}-{s[0]}x{s[1]}") for c in CASES for s in c[4]]


def _weight(n, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[torch.rand(n, k, generator=g) < 0.002] *= 20  # a few outliers, as real weights have
    return w.to(dtype)


def _comfy_file(tmp_path, conf, qt, n, k, extras=()):
    """Layer ``l`` as ComfyUI writes it, through a safetensors file; returns the read-back dict."""
    sd = {f"l.{key}": t.contiguous() for key, t in qt.state_dict("weight").items()}
    sd["l.bias"] = torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.1
    sd["l.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)
    if "pre_quant_scale" in extras:
        sd["l.pre_quant_scale"] = torch.rand(k, generator=torch.Generator().manual_seed(2)) + 0.5
    if "input_scale" in extras:
        sd["l.input_scale"] = torch.tensor(0.01)
    path = tmp_path / "layer.safetensors"
    save_file(sd, str(path))
    return load_file(str(path))


def _layer(sd, fmt):
    return {s: sd[f"l.{s}"] for s in cq.SIDE_TENSORS[fmt] if f"l.{s}" in sd}


@pytest.mark.parametrize("case,shape", PARAMS)
def test_dequantize_equals_kitchen(case, shape, tmp_path):
    name, conf, layout, kw, _ = case
    n, k = shape
    qt = QuantizedTensor.from_float(_weight(n, k, seed=sum(map(ord, name)) + n), layout, **kw)
    extras = ("pre_quant_scale", "input_scale") if conf["format"] == "nvfp4" else ()
    sd = _comfy_file(tmp_path, conf, qt, n, k, extras)

    quant = cq.parse_layer_config(sd["l.comfy_quant"])
    assert quant.format == conf["format"]
    assert cq.logical_shape(quant, sd["l.weight"].shape, n, k) == (n, k)
    if (n, k) == (96, 160) or quant.format not in ("nvfp4", "mxfp8"):  # no padding: shape readable from the file
        assert cq.logical_shape(quant, sd["l.weight"].shape) == (n, k)
    side = _layer(sd, quant.format)

    ours = cq.dequantize(quant, sd["l.weight"], side, n, k, torch.float32)
    ref = qt.dequantize()
    assert ours.dtype == torch.float32 and ours.shape == (n, k)
    assert torch.equal(ours, ref), (ours - ref).abs().max().item()

    # The layer's math: y == F.linear(x * pre_quant_scale, W_kitchen, b) (pqs only for nvfp4).
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(4))
    pqs = sd.get("l.pre_quant_scale")
    expect = F.linear(x if pqs is None else x * pqs, ref, sd["l.bias"])
    got = cq.linear(x, quant, sd["l.weight"], side, sd["l.bias"], n, k)
    assert torch.equal(got, expect)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in (
    "fp8_e4m3", "fp8_e5m2", "nvfp4", "mxfp8", "int8_row", "int8_convrot256", "w4a4_256", "w4a8_codebook")],
    ids=lambda c: c[0])
def test_bf16_matches_kitchen(case, tmp_path):
    """bf16: what ComfyUI computes when the model runs in bf16 (kitchen dequantizes to the
    weight's original dtype). Equal bits, except w4a8 where kitchen rotates in bf16 and we in
    float32, then round once: ours is the float32 result rounded, kitchen's is farther off."""
    name, conf, layout, kw, shapes = case
    n, k = shapes[-1]
    qt = QuantizedTensor.from_float(_weight(n, k, seed=7, dtype=torch.bfloat16), layout, **kw)
    sd = _comfy_file(tmp_path, conf, qt, n, k)
    quant = cq.parse_layer_config(sd["l.comfy_quant"])
    ours = cq.dequantize(quant, sd["l.weight"], _layer(sd, quant.format), n, k, torch.bfloat16)
    ref = qt.dequantize()
    assert ours.dtype == ref.dtype == torch.bfloat16
    if quant.format == "asym_w4a8_int8":
        exact = cq.dequantize(quant, sd["l.weight"], _layer(sd, quant.format), n, k, torch.float32)
        rel = lambda a: ((a.float() - exact).norm() / exact.norm()).item()
        assert ((ours.float() - exact).abs() <= exact.abs() * 2**-8).all()  # one rounding: half a bf16 ulp
        assert rel(ours) <= rel(ref) < 5e-3
    else:
        assert torch.equal(ours, ref)


def test_unswizzle_inverts_kitchen_to_blocked():
    from comfy_kitchen.float_utils import to_blocked

    for rows, cols in [(200, 22), (128, 4), (512, 64), (33, 5), (3072, 192)]:
        m = torch.randint(0, 256, (rows, cols), dtype=torch.uint8)
        assert torch.equal(cq.unswizzle_block_scales(to_blocked(m, flatten=False), rows, cols), m)


def test_hadamard_is_kitchens_and_self_inverse():
    from comfy_kitchen.tensor.int8_utils import _build_hadamard

    for g in (4, 16, 64, 256, 1024):
        h = cq.hadamard(g)
        assert torch.equal(h, _build_hadamard(g))
        assert torch.equal(h, h.T) and torch.allclose(h @ h, torch.eye(g), atol=1e-6)


def test_parse_forms_and_defaults():
    raw = {"format": "int8_tensorwise", "params": {"convrot": True, "convrot_groupsize": 64}}
    as_tensor = torch.tensor(list(json.dumps(raw).encode()), dtype=torch.uint8)
    for form in (raw, json.dumps(raw), json.dumps(raw).encode(), as_tensor):
        q = cq.parse_layer_config(form)
        assert (q.format, q.convrot, q.convrot_groupsize) == ("int8_tensorwise", True, 64)
    # Top level wins over "params"; w4a8 defaults; int8 without convrot.
    q = cq.parse_layer_config({"format": "asym_w4a8_int8", "group_size": 32, "params": {"group_size": 8}})
    assert (q.convrot, q.group_size, q.convrot_groupsize) == (True, 32, 256)
    assert cq.parse_layer_config({"format": "int8_tensorwise"}).convrot is False
    # A header entry (_quantization_metadata) carries the same per-layer dicts.
    header = {"format_version": "1.0", "layers": {"transformer_blocks.0.attn.to_q": {"format": "nvfp4"}}}
    assert cq.parse_layer_config(header["layers"]["transformer_blocks.0.attn.to_q"]).format == "nvfp4"
    assert set(cq.SIDE_TENSORS) == set(cq.SUPPORTED) == set(cq.REQUIRED_SIDE)


def test_unknown_format_names_it_and_the_supported_ones():
    with pytest.raises(ValueError) as err:
        cq.parse_layer_config({"format": "svdquant_w4a4"})
    msg = str(err.value)
    assert "'svdquant_w4a4'" in msg and all(f in msg for f in cq.SUPPORTED)
    with pytest.raises(ValueError, match="None"):
        cq.parse_layer_config({"convrot": True})
    with pytest.raises(ValueError, match="power of 4"):
        cq.parse_layer_config({"format": "convrot_w4a4", "convrot_groupsize": 128})


def test_asymmetric_w4a8_is_refused(tmp_path):
    conf = {"format": "asym_w4a8_int8", "group_size": 16, "convrot_groupsize": 256}
    qt = QuantizedTensor.from_float(_weight(64, 512, seed=3), "AsymW4A8Int8Layout", symmetric=False)
    sd = _comfy_file(tmp_path, conf, qt, 64, 512)
    quant = cq.parse_layer_config(sd["l.comfy_quant"])
    side = _layer(sd, quant.format)
    assert "weight_correction" in side  # the loader collects it ...
    with pytest.raises(ValueError, match="asym_w4a8_int8 with weight_correction"):
        cq.check_side(quant, side)  # ... and refuses the layer at load time
    with pytest.raises(ValueError, match="weight_correction"):
        cq.dequantize(quant, sd["l.weight"], side, 64, 512)


def test_missing_scale_and_bad_shapes():
    quant = cq.parse_layer_config({"format": "nvfp4"})
    with pytest.raises(ValueError, match="weight_scale_2"):
        cq.check_side(quant, {"weight_scale": torch.zeros(128, 4, dtype=torch.uint8)})
    assert cq.stored_weight_shape("nvfp4", 200, 344) == (208, 176)
    assert cq.stored_weight_shape("mxfp8", 200, 344) == (224, 352)
    assert cq.logical_shape(quant, (208, 176)) == (208, 352)  # padding cannot be seen: module dims needed
    with pytest.raises(ValueError, match="does not fit"):
        cq.logical_shape(quant, (208, 176), 200, 320)
    w4 = cq.parse_layer_config({"format": "convrot_w4a4"})
    assert cq.logical_shape(w4, (3072, 1536)) == (3072, 3072)
    with pytest.raises(ValueError, match="convrot_groupsize 256"):
        cq.logical_shape(w4, (96, 80))


def test_prepare_input():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert cq.prepare_input(x, {"weight_scale": torch.ones(())}) is x
    s = torch.rand(8) + 0.5
    y = cq.prepare_input(x, {"pre_quant_scale": s})
    assert y.dtype == torch.bfloat16 and torch.equal(y, x * s.to(torch.bfloat16))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in (
    "fp8_e4m3", "nvfp4", "mxfp8", "int8_convrot256", "w4a4_256", "w4a8_codebook")], ids=lambda c: c[0])
def test_traces_without_graph_breaks(case):
    """torch.compile: every decoder is one graph (no data-dependent shapes or host syncs)."""
    name, conf, layout, kw, shapes = case
    n, k = shapes[0]
    qt = QuantizedTensor.from_float(_weight(n, k, seed=5), layout, **kw)
    sd = {key: t.contiguous() for key, t in qt.state_dict("weight").items()}
    quant = cq.parse_layer_config(conf)
    side = {s: sd[s] for s in cq.SIDE_TENSORS[quant.format] if s in sd}
    torch._dynamo.reset()
    fn = torch.compile(lambda w, sd_: cq.dequantize(quant, w, sd_, n, k, torch.float32),
                       backend="eager", fullgraph=True)
    assert torch.equal(fn(sd["weight"], side), qt.dequantize())


def test_inductor_gives_the_same_bits():
    """Compiled for real (inductor, CPU): same bits as eager. mxfp8's e8m0 scales go in as uint8."""
    for layout, conf, (n, k) in [("TensorCoreNVFP4Layout", {"format": "nvfp4"}, (200, 344)),
                                 ("TensorCoreMXFP8Layout", {"format": "mxfp8"}, (200, 344)),
                                 ("TensorCoreConvRotW4A4Layout", {"format": "convrot_w4a4"}, (96, 512))]:
        qt = QuantizedTensor.from_float(_weight(n, k, seed=6), layout)
        sd = {key: t.contiguous() for key, t in qt.state_dict("weight").items()}
        quant = cq.parse_layer_config(conf)
        side = {s: sd[s].view(torch.uint8) if sd[s].element_size() == 1 and sd[s].is_floating_point() else sd[s]
                for s in cq.SIDE_TENSORS[quant.format] if s in sd}
        torch._dynamo.reset()
        fn = torch.compile(lambda w, sd_: cq.dequantize(quant, w, sd_, n, k, torch.float32), fullgraph=True)
        assert torch.equal(fn(sd["weight"], side), qt.dequantize())
