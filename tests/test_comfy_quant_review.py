"""ComfyUI mixed-precision (comfy_quant) layers: what a review of their loading and kernels found.

- side tensors (block scales, smoothing, ...) are file views like the weight, and go back to the
  file's mapping after a GPU trip (or are copied out where the load converted most of the file);
- a quantized Embedding is decoded at load; a quantized weight on any other module is refused;
- header layer names match a prefixed file; an integer weight without a config is refused;
- ``full_precision_matrix_mult`` keeps a layer off the quantized-activation matmuls;
- the int8 matmul: no weight copy per call, M padded like kitchen, a failing kernel falls back;
- the block-scaled matmul takes e4m3 values stored as bytes;
- side-tensor sizes are checked at load, for every format kitchen writes;
- compiled decoding steps aside inside an enclosing torch.compile, and keys on the side layout.

References: comfy-kitchen's QuantizedTensor (quantize / dequantize; what ComfyUI uses), files
written the way ComfyUI writes them. Skipped without comfy-kitchen.
"""
from __future__ import annotations

import copy
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_comfy_quant_kernels import builds  # noqa: F401  (fixture: compiled decoding with a stand-in compiler)
from test_comfy_quant_load import FORMATS as LOAD_FORMATS
from test_load_mmdit import inputs, ref, rel_err, run_ours, run_ref, state, with_weights  # noqa: F401  (fixtures)

from qwenimage_pack.core.errors import WeightFileError
from qwenimage_pack.core.keymaps.mmdit import quant_side_tensors
from qwenimage_pack.core.layers import file_views, host_memory
from qwenimage_pack.core.layers.linear import Linear
from qwenimage_pack.core.layers.run_options import RunOptions
from qwenimage_pack.core.loading.load import load_mmdit
from qwenimage_pack.core.quant import blockscaled_matmul as bm
from qwenimage_pack.core.quant import comfy_quant, int8_matmul
from qwenimage_pack.core.quant import comfy_quant_kernels as kernels

ck = pytest.importorskip("comfy_kitchen")
ck_tensor = pytest.importorskip("comfy_kitchen.tensor")
QuantizedTensor = ck_tensor.QuantizedTensor

# format id -> (comfy_quant JSON, kitchen layout, layout kwargs): the load tests' formats, plus a
# plain int8 layer and a w4a8 one with groups of 32 and no codebook.
FORMATS = {
    **LOAD_FORMATS,
    "int8": ({"format": "int8_tensorwise"}, "TensorWiseINT8Layout", {}),
    "w4a8_g32": ({"format": "asym_w4a8_int8", "group_size": 32, "convrot_groupsize": 16}, "AsymW4A8Int8Layout",
                 {"group_size": 32, "convrot_groupsize": 16, "codebook": False}),
}
CONVERTED_SIDE = {"weight_scale", "weight_scale_2", "pre_quant_scale"}


def _conf_tensor(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


def _is_block_linear(key: str) -> bool:
    return key.startswith("transformer_blocks.") and key.endswith(".weight") and "norm" not in key


def _file(ref, tmp_path, fmt: str, *, only=None, prefix: str = "", header_prefix: str | None = None,
          no_config: bool = False, conf: dict | None = None, name: str = "q"):
    """(path, the dense weights kitchen decodes) of the tiny MMDiT whose block Linears (those in
    ``only``, if given) are in ``fmt``: kitchen's tensors, and per-layer ``comfy_quant`` tensors or
    (``header_prefix`` given) the header's ``_quantization_metadata`` naming each layer behind that
    prefix; every key behind ``prefix``. nvfp4 layers get an AWQ ``pre_quant_scale``."""
    default_conf, layout, kw = FORMATS[fmt]
    conf = conf or default_conf
    out, dense, layers = {}, {}, {}
    g = torch.Generator().manual_seed(3)
    for key, value in state(ref).items():
        if not _is_block_linear(key) or (only is not None and key not in only):
            out[prefix + key] = dense[key] = value.bfloat16()
            continue
        layer = key[: -len(".weight")]
        qt = QuantizedTensor.from_float(value.float(), layout, **kw)
        out.update({f"{prefix}{layer}.{n}": t.contiguous() for n, t in qt.state_dict("weight").items()})
        w = qt.dequantize().float()
        if fmt == "nvfp4":  # the layer computes (x * s) @ W.T, i.e. x @ (W * s).T
            s = torch.rand(value.shape[1], generator=g) + 0.5
            out[f"{prefix}{layer}.pre_quant_scale"] = s
            w = w * s
        dense[key] = w
        if header_prefix is not None:
            layers[header_prefix + layer] = conf
        elif not no_config:
            out[f"{prefix}{layer}.comfy_quant"] = _conf_tensor(conf)
    path = tmp_path / f"qwen_image_{name}.safetensors"
    metadata = None
    if header_prefix is not None:
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file(out, str(path), metadata=metadata)
    return path, dense


def _mapping(path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of ``path``."""
    real = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[-1] == real:
                lo, hi = (int(a, 16) for a in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def _in(t: torch.Tensor, ranges) -> bool:
    return any(lo <= t.data_ptr() < hi for lo, hi in ranges)


needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")


# ------------------------------------------------------------------ 1. side tensors are file views


@needs_proc_maps
def test_side_tensors_are_file_views_and_return_to_the_file_after_a_gpu_trip(ref, inputs, tmp_path):
    path, _ = _file(ref, tmp_path, "nvfp4")
    model = load_mmdit(path)
    lin = model.transformer_blocks[0].attn.to_q
    side = {"weight_scale", "weight_scale_2", "pre_quant_scale"}
    assert set(lin.comfy_quant_side) == side
    assert {n for n, _ in file_views.file_view_items(lin)} == {"weight", "bias"} | side
    mapped = _mapping(path)
    assert all(_in(getattr(lin, n), mapped) for n in side)
    expected = run_ours(model, *inputs)
    # The GPU trip, stood in for by fresh memory for every tensor (module.to replaces buffers).
    for mod in model.modules():
        for n, p in mod._parameters.items():
            if p is not None:
                p.data = p.data.clone()
        for n, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[n] = b.clone()
    assert not any(_in(getattr(lin, n), mapped) for n in side)
    host_memory.move(model, "cpu")
    for n in side:
        assert getattr(lin, n).data_ptr() == file_views.file_view(lin, n).data_ptr(), n
    assert torch.equal(run_ours(model, *inputs), expected)


@needs_proc_maps
def test_a_mostly_converted_file_keeps_no_tensor_in_its_mapping(ref, inputs, tmp_path):
    """One nvfp4 layer kept as stored, the other block Linears converted to float8: the load copies
    the few tensors it kept, side tensors included, so the file's mapping can close."""
    key = "transformer_blocks.0.attn.to_q.weight"
    path, dense = _file(ref, tmp_path, "nvfp4", only={key})
    model = load_mmdit(path, weight_dtype="fp8_e4m3fn")
    lin = model.transformer_blocks[0].attn.to_q
    assert lin.comfy_quant is not None and lin.weight.dtype == torch.uint8
    assert model.transformer_blocks[0].attn.to_k.weight.dtype == torch.float8_e4m3fn
    mapped = _mapping(path)
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(_in(t, mapped) for t in tensors)
    assert not any(file_views.file_view_items(m) for m in model.modules())
    assert torch.equal(comfy_quant.smoothed_weight(lin.comfy_quant, lin.weight, lin.quant_side(), 64, 64), dense[key])
    assert torch.isfinite(run_ours(model, *inputs)).all()


# ------------------------------------------------------------------ 2. Embedding / other modules


def test_a_quantized_embedding_is_decoded_at_load(tmp_path):
    """An int8 (per-row, ConvRot) embed_tokens, as ComfyUI's mixed-precision Embedding loads it
    (and decodes row by row: the same values). Reference: transformers holding kitchen's decoding."""
    import references as refs
    from qwenimage_pack.core.loading.load import load_text_encoder

    pytest.importorskip("transformers")
    model_ref = refs.qwen25vl_reference(layers=1, vision_intermediate=40)
    dense = copy.deepcopy(model_ref)
    out = {}
    conf = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 16}
    for key, value in refs.original_text_layout(model_ref.state_dict()).items():
        if "embed_tokens" not in key:
            out[key] = value
            continue
        layer = key[: -len(".weight")]
        qt = QuantizedTensor.from_float(value.float(), "TensorWiseINT8Layout", per_channel=True, convrot=True,
                                        convrot_groupsize=16)
        out.update({f"{layer}.{n}": t.contiguous() for n, t in qt.state_dict("weight").items()})
        out[f"{layer}.comfy_quant"] = _conf_tensor(conf)
        dense.model.language_model.embed_tokens.weight.data.copy_(qt.dequantize().float())
    path = tmp_path / "qwen_2.5_vl_7b_int8_embed.safetensors"
    save_file(out, str(path))
    model, _ = load_text_encoder(path, compute_dtype=torch.float32)
    emb = model.embed_tokens
    assert emb.comfy_quant is None and emb.weight.dtype == torch.float32
    assert tuple(emb.weight.shape) == (emb.num_embeddings, emb.embedding_dim)
    ids = torch.randint(0, 1000, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = dense.model(input_ids=ids).last_hidden_state
        ours = model(input_ids=ids)
    assert rel_err(ours, expected) <= 1e-5


def test_a_quantized_weight_on_another_module_is_refused(ref, tmp_path):
    path, _ = _file(ref, tmp_path, "int8", only=set())
    sd = load_file(str(path))
    layer = "transformer_blocks.0.attn.norm_q"
    sd[f"{layer}.weight"] = torch.randint(-127, 128, sd[f"{layer}.weight"].shape, dtype=torch.int8)
    sd[f"{layer}.weight_scale"] = torch.tensor(0.01)
    sd[f"{layer}.comfy_quant"] = _conf_tensor({"format": "int8_tensorwise"})
    save_file(sd, str(path))
    with pytest.raises(WeightFileError) as e:
        load_mmdit(path)
    assert f"'{layer}.weight'" in str(e.value) and "RMSNorm" in str(e.value) and path.name in str(e.value)


# ------------------------------------------------------------------ 3. header names, integer weights


@pytest.mark.parametrize("prefix,header_prefix", [("model.diffusion_model.", ""),
                                                  ("model.diffusion_model.", "model.diffusion_model."),
                                                  ("", "")])
def test_header_layer_names_match_with_or_without_the_model_prefix(ref, inputs, tmp_path, prefix, header_prefix):
    path, dense = _file(ref, tmp_path, "int8_convrot", prefix=prefix, header_prefix=header_prefix)
    model = load_mmdit(path, compute_dtype=torch.float32)
    lin = model.transformer_blocks[1].img_mlp.net[2]
    assert lin.comfy_quant.format == "int8_tensorwise" and lin.comfy_quant.convrot
    assert rel_err(run_ours(model, *inputs), run_ref(with_weights(ref, dense), *inputs)) <= 1e-5


def test_quant_side_tensors_match_header_names_behind_a_prefix():
    names = {"model.diffusion_model.txt_norm.weight", "model.diffusion_model.transformer_blocks.0.attn.to_q.weight",
             "model.diffusion_model.transformer_blocks.0.attn.to_q.weight_scale"}
    meta = {"_quantization_metadata": json.dumps({"layers": {"transformer_blocks.0.attn.to_q": {
        "format": "int8_tensorwise"}, "not_in_the_file": {"format": "int8_tensorwise"}}})}
    side = quant_side_tensors(names, meta)
    assert side.meta_configs == {"model.diffusion_model.transformer_blocks.0.attn.to_q.weight":
                                 {"format": "int8_tensorwise"}}


def test_an_integer_weight_without_a_quant_config_is_refused(ref, tmp_path):
    """Without its config an int8 weight would be cast to float with its scale dropped: garbage."""
    path, _ = _file(ref, tmp_path, "int8_convrot", prefix="model.diffusion_model.", no_config=True)
    with pytest.raises(WeightFileError) as e:
        load_mmdit(path)
    msg = str(e.value)
    assert "integer tensor 'model.diffusion_model.transformer_blocks." in msg and "int8" in msg
    assert "no quantization config" in msg and path.name in msg


# ------------------------------------------------------------------ 4. full_precision_matrix_mult


def _kitchen_linear(fmt: str, out: int, inp: int, conf: dict, seed: int = 0) -> Linear:
    _, layout, kw = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    qt = QuantizedTensor.from_float((torch.randn(out, inp, generator=g) * 0.05).to(torch.bfloat16), layout, **kw)
    stored = qt.state_dict("weight")
    side = {k: v.view(torch.uint8) if "e8m0" in str(v.dtype) else v for k, v in stored.items() if k != "weight"}
    lin = Linear(inp, out, device="meta")
    lin.bias = torch.nn.Parameter((torch.randn(out, generator=g) * 0.1).to(torch.bfloat16), requires_grad=False)
    lin.set_comfy_quant(stored["weight"], side, comfy_quant.parse_layer_config(conf), (out, inp))
    return lin


@pytest.mark.parametrize("fmt,options", [
    ("int8", RunOptions(int8_matmul=True, int8_on_cpu=True)),
    ("nvfp4", RunOptions(blockscaled_matmul=True, blockscaled_on_cpu=True)),
    ("mxfp8", RunOptions(blockscaled_matmul=True, blockscaled_on_cpu=True)),
])
def test_full_precision_layers_skip_the_quantized_activation_matmuls(fmt, options):
    conf = FORMATS[fmt][0]
    x = (torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1)) * 0.7).to(torch.bfloat16)
    plain = _kitchen_linear(fmt, 64, 128, conf)
    flagged = _kitchen_linear(fmt, 64, 128, {**conf, "full_precision_matrix_mult": True})
    assert flagged.comfy_quant.full_precision_matrix_mult and flagged.full_precision_mm
    assert not torch.equal(plain(x, options), plain(x))  # the quantized-activation path is taken...
    assert torch.equal(flagged(x, options), flagged(x))  # ...but not for a layer the file marks


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="torch without _scaled_mm")
@pytest.mark.parametrize("legacy", [False, True])
def test_full_precision_float8_layers_skip_the_float8_matmul(ref, inputs, tmp_path, legacy):
    """float8 layers: per layer from comfy_quant, or for all of a legacy file from a two-element
    ``scaled_fp8`` marker (how ComfyUI reads it)."""
    out, marked, i = {}, set(), 0
    for key, value in state(ref).items():
        if not _is_block_linear(key):
            out[key] = value.bfloat16()
            continue
        layer = key[: -len(".weight")]
        scale = value.abs().amax() / 448
        out[key] = (value / scale).to(torch.float8_e4m3fn)
        if legacy:
            out[f"{layer}.scale_weight"] = scale.reshape(1)
            marked.add(layer)
            continue
        out[f"{layer}.weight_scale"] = scale.reshape(())
        conf = {"format": "float8_e4m3fn", **({"full_precision_matrix_mult": True} if i % 2 else {})}
        out[f"{layer}.comfy_quant"] = _conf_tensor(conf)
        if i % 2:
            marked.add(layer)
        i += 1
    if legacy:
        out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    path = tmp_path / "qwen_image_fp8.safetensors"
    save_file(out, str(path))
    model = load_mmdit(path, compute_dtype=torch.bfloat16)
    flags = {n: m.full_precision_mm for n, m in model.named_modules() if isinstance(m, Linear) and n.startswith(
        "transformer_blocks.")}
    assert {n for n, f in flags.items() if f} == marked and (legacy or len(marked) < len(flags))
    on = RunOptions(fp8_matmul="auto", fp8_on_cpu=True)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for name, flagged in flags.items():
        lin = model.get_submodule(name)
        if lin.in_features == 64 and lin.weight.dtype == torch.float8_e4m3fn:
            assert torch.equal(lin(x, on), lin(x)) == flagged, name
    if legacy:  # a one-element marker (or none) asks for nothing
        out["scaled_fp8"] = torch.zeros(1, dtype=torch.float8_e4m3fn)
        save_file(out, str(path))
        model = load_mmdit(path, compute_dtype=torch.bfloat16)
        assert not any(m.full_precision_mm for m in model.modules() if isinstance(m, Linear))


# ------------------------------------------------------------------ 5. int8 matmul


@pytest.fixture
def fresh_int8():
    int8_matmul.reset()
    yield
    int8_matmul.reset()


def test_int8_m_padding_is_kitchens():
    from comfy_kitchen.backends.eager import quantization as ck_eager

    for m in range(1, 200):
        pad_m, _, _ = int8_matmul._padding(m, 64, 64, cuda=True)
        assert m + pad_m == ck_eager._round_up(max(m, 32), 32), m
        assert int8_matmul._padding(m, 64, 64, cuda=False)[0] == 0
    assert int8_matmul._padding(40, 36, 20, cuda=False) == (0, 4, 4)


def test_int8_matmul_takes_the_stored_weight_without_copying_it(monkeypatch, fresh_int8):
    lin = _kitchen_linear("int8_convrot", 72, 192, FORMATS["int8_convrot"][0])
    x = torch.randn(3, 11, 192, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    real, seen = torch._int_mm, []

    def recording(a, b):
        seen.append(b)
        return real(a, b)

    monkeypatch.setattr(torch, "_int_mm", recording)
    y = lin(x, RunOptions(int8_matmul=True, int8_on_cpu=True))
    (b,) = seen
    assert b.data_ptr() == lin.weight.data_ptr() and b.shape == (192, 72) and b.stride() == (1, 192)
    exact = F.linear(x.float(), lin.dense_weight(torch.float32), lin.bias.float())
    assert rel_err(y, exact) <= 1e-2


def test_int8_matmul_pads_odd_sizes_and_matches_kitchen(fresh_int8):
    """K and N not multiples of 8: padded with zeros, same result as kitchen's int8 linear."""
    lin = _kitchen_linear("int8", 20, 40, FORMATS["int8"][0], seed=4)
    x = torch.randn(2, 7, 40, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ours = lin(x, RunOptions(int8_matmul=True, int8_on_cpu=True))
    kitchen = ck.int8_linear(x, lin.weight, lin.weight_scale, lin.bias, out_dtype=torch.bfloat16)
    exact = F.linear(x.float(), lin.dense_weight(torch.float32), lin.bias.float())
    assert ours.shape == (2, 7, 20) and rel_err(ours, kitchen) <= 1e-2
    assert rel_err(ours, exact) <= rel_err(kitchen, exact) * 1.05


def test_a_failing_int8_kernel_falls_back_once(monkeypatch, caplog, fresh_int8):
    lin = _kitchen_linear("int8", 64, 128, FORMATS["int8"][0])
    x = torch.randn(5, 128).to(torch.bfloat16)
    calls = []

    def broken(a, b):
        calls.append(1)
        raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul")

    monkeypatch.setattr(torch, "_int_mm", broken)
    on = RunOptions(int8_matmul=True, int8_on_cpu=True)
    with caplog.at_level(logging.WARNING, logger=int8_matmul.__name__):
        first, second = lin(x, on), lin(x, on)
    assert torch.equal(first, lin(x)) and torch.equal(second, first)  # decoded, as without the option
    assert len(calls) == 1
    assert sum("int8 matmul" in r.getMessage() for r in caplog.records) == 1
    assert lin(x.float(), on) is not None and len(calls) == 2  # another activation dtype: tried once more


# ------------------------------------------------------------------ 6. block-scaled operands stored as bytes


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_block_scaled_operands_stored_as_bytes(fmt):
    bm.reset()
    on = RunOptions(blockscaled_matmul=True, blockscaled_on_cpu=True)
    lin = _kitchen_linear(fmt, 64, 128, FORMATS[fmt][0])
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    expected = lin(x, on)
    if fmt == "nvfp4":
        lin.weight_scale = lin.weight_scale.view(torch.uint8)  # a U8 tensor in the file
    else:
        lin.weight = torch.nn.Parameter(lin.weight.data.view(torch.uint8), requires_grad=False)
    args = bm.weight_operand(fmt, lin.weight, lin.quant_side())
    assert args["block_scale_b"].dtype == (torch.float8_e4m3fn if fmt == "nvfp4" else torch.float8_e8m0fnu)
    assert args["b"].dtype == (torch.uint8 if fmt == "nvfp4" else torch.float8_e4m3fn)
    y = bm.try_linear(x, lin.comfy_quant, lin.weight, lin.quant_side(), lin.bias, 64, on_cpu=True)
    assert y is not None and torch.equal(y, expected) and not bm._failed
    bm.reset()


# ------------------------------------------------------------------ 7. side-tensor sizes


SHAPES = [(96, 160), (200, 344), (33, 48), (3072, 64), (64, 256)]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_side_tensor_kitchen_writes_fits(fmt):
    conf, layout, kw = FORMATS[fmt]
    quant = comfy_quant.parse_layer_config(conf)
    for n, k in SHAPES:
        if fmt not in ("nvfp4", "mxfp8") and k % (64 if fmt == "convrot_w4a4" else 32):
            continue  # kitchen quantizes these widths only
        qt = QuantizedTensor.from_float(torch.randn(n, k) * 0.05, layout, **kw)
        side = {s: t for s, t in qt.state_dict("weight").items() if s != "weight"}
        side["pre_quant_scale"] = torch.ones(k)
        side["input_scale"] = torch.tensor(0.01)
        comfy_quant.check_side_shapes(quant, side, n, k)


def _side(fmt: str, n: int, k: int) -> dict:
    _, layout, kw = FORMATS[fmt]
    return {s: t for s, t in QuantizedTensor.from_float(torch.randn(n, k), layout, **kw).state_dict("weight").items()
            if s != "weight"}


@pytest.mark.parametrize("fmt,n,k,name,bad,expected", [
    ("nvfp4", 200, 344, "weight_scale", torch.zeros(200, 22, dtype=torch.uint8), "6144 values"),  # unswizzled
    ("nvfp4", 96, 160, "weight_scale_2", torch.ones(2), "1 values"),
    ("nvfp4", 96, 160, "pre_quant_scale", torch.ones(176), "160 values"),  # padded K
    ("mxfp8", 200, 344, "weight_scale", torch.zeros(200, 11, dtype=torch.uint8), "3072 values"),
    ("int8", 96, 160, "weight_scale", torch.ones(48, 1), "1 or 96 values"),
    ("convrot_w4a4", 96, 192, "weight_scale", torch.ones(95), "1 or 96 values"),
    ("w4a8", 96, 160, "weight_s_rel", torch.ones(96, 5), "shape [96, 10]"),  # written with group 32
    ("w4a8", 96, 160, "weight_s_channel", torch.ones(48), "96 values"),
    ("w4a8", 96, 160, "weight_codebook", torch.ones(8), "16 values"),
])
def test_a_side_tensor_that_does_not_fit_is_refused(fmt, n, k, name, bad, expected):
    quant = comfy_quant.parse_layer_config(FORMATS[fmt][0])
    side = {**_side(fmt, n, k), name: bad}
    with pytest.raises(ValueError, match=name) as e:
        comfy_quant.check_side_shapes(quant, side, n, k)
    assert expected in str(e.value)


def test_a_file_whose_side_tensors_do_not_fit_fails_at_load(ref, tmp_path):
    """s_rel written with groups of 32 while the JSON says 16: refused at load, naming the layer."""
    path, _ = _file(ref, tmp_path, "w4a8_g32", conf=FORMATS["w4a8"][0])
    with pytest.raises(WeightFileError) as e:
        load_mmdit(path)
    msg = str(e.value)
    assert "cannot be decoded" in msg and "weight_s_rel" in msg and "transformer_blocks." in msg
    assert path.name in msg


# ------------------------------------------------------------------ 8. compiled decoding


def test_decoding_inside_an_enclosing_compile_stays_eager(builds):
    lin = _kitchen_linear("int8", 64, 128, FORMATS["int8"][0])
    kernels.prepare(lin)
    x = torch.randn(4, 128).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x_: lin(x_), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), F.linear(x, lin.dense_weight(torch.bfloat16, fused=False), lin.bias))
    assert builds == []  # traced as the plain decoder, nothing compiled inside the trace
    lin(x)
    assert len(builds) == 1  # eager calls still use the compiled kernel


def test_compiled_decoding_keys_on_the_side_layout(builds):
    """Same format and shape, a per-tensor and a per-row scale: two graphs, each compiled and checked."""
    conf = FORMATS["int8"][0]
    tensorwise = _kitchen_linear("int8", 64, 128, conf)
    rowwise = Linear(128, 64, bias=False, device="meta")
    qt = QuantizedTensor.from_float(torch.randn(64, 128) * 0.05, "TensorWiseINT8Layout", per_channel=True)
    stored = qt.state_dict("weight")
    rowwise.set_comfy_quant(stored["weight"], {"weight_scale": stored["weight_scale"]},
                            comfy_quant.parse_layer_config(conf), (64, 128))
    assert kernels.prepare(torch.nn.Sequential(tensorwise, rowwise)) == 1
    for lin in (tensorwise, rowwise, tensorwise, rowwise):
        assert torch.equal(lin.dense_weight(torch.float32), lin.dense_weight(torch.float32, fused=False))
    assert len(builds) == 2
