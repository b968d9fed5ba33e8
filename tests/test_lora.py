"""LoRA parsing and patching, checked against diffusers' own LoRA loading (PEFT) on a tiny model.

Formats diffusers loads (PEFT, kohya, ComfyUI prefix, bare keys, LoKr) are compared with the
diffusers model after ``load_lora_adapter`` + ``fuse_lora``; formats it cannot load (LoHa,
LyCORIS LoKr with alpha, diff / diff_b) with the diffusers model whose weights had the
independently computed delta added. "Ours" is the same diffusers model with every nn.Linear
swapped for the pack's Linear, so the patches run inside a real Qwen-Image forward.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("diffusers")
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

try:  # diffusers' LoRA loading needs peft (a test-only requirement)
    from peft.tuners.lokr.layer import factorization
except ImportError:
    factorization = None
needs_peft = pytest.mark.skipif(factorization is None, reason="peft is not installed (pip install peft)")

from qwenimage_pack.core.errors import WeightFileError  # noqa: E402
from qwenimage_pack.core.layers.linear import Linear  # noqa: E402
from qwenimage_pack.core.layers.lora_patch import PATCH_PREFIX, apply_loras  # noqa: E402
from qwenimage_pack.core.loading.lora import load_lora_file, lora_summary, parse_lora  # noqa: E402

CFG = dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(4, 14, 14))
RANK = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Everything here is tiny: a second thread only adds sync cost on a shared, busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**CFG).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def shapes(base):
    return {n: tuple(m.weight.shape) for n, m in base.named_modules() if isinstance(m, nn.Linear)}


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, 16, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 7, 48, generator=g),
        encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.bool),
        timestep=torch.tensor([0.6]),
        img_shapes=[(1, 4, 4)],
    )


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def ours_from(base):
    """The diffusers model with our Linear in place of every nn.Linear (same weights)."""
    model = copy.deepcopy(base)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and not isinstance(mod, Linear):
            lin = Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.load_state_dict(mod.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin.requires_grad_(False))
    return model


def lora_factors(shapes, seed, rank=RANK):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, i, generator=g) * 0.2, torch.randn(o, rank, generator=g) * 0.2) for n, (o, i) in shapes.items()}


def kohya_name(name):
    return "lora_unet_" + name.replace(".", "_")


def write_lora(tmp_path, factors, fmt, alpha=None, name="lora.safetensors", metadata=None):
    """Spell one set of down/up factors the way a given trainer does."""
    sd = {}
    for n, (down, up) in factors.items():
        if fmt == "peft":
            a, b, base = "lora_A.weight", "lora_B.weight", f"transformer.{n}"
        elif fmt == "peft_default":
            a, b, base = "lora_A.default.weight", "lora_B.default.weight", n
        elif fmt == "kohya":
            a, b, base = "lora_down.weight", "lora_up.weight", kohya_name(n)
        elif fmt == "comfy":
            a, b, base = "lora_down.weight", "lora_up.weight", f"diffusion_model.{n}"
        elif fmt == "bare":
            a, b, base = "lora_down.weight", "lora_up.weight", n
        elif fmt == "bare_ab":
            a, b, base = "lora_A.weight", "lora_B.weight", n
        sd[f"{base}.{a}"], sd[f"{base}.{b}"] = down.contiguous(), up.contiguous()
        if alpha is not None:
            sd[f"{base}.alpha"] = torch.tensor(float(alpha))
    path = tmp_path / name
    save_file(sd, str(path), metadata=metadata)
    return path


def diffusers_fused(base, inputs, path, strength=1.0, convert=True):
    ref = copy.deepcopy(base)
    if convert:  # the Qwen-Image pipeline's own key conversion (kohya, ComfyUI, alpha, .default)
        ref.load_lora_adapter(QwenImagePipeline.lora_state_dict(str(path)), prefix="transformer")
    else:  # straight from the file, with its metadata
        ref.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer")
    ref.fuse_lora(lora_scale=strength)
    return run(ref, inputs)


def merged(base, inputs, deltas, bias_deltas=None):
    """Reference for formats diffusers does not load: W + delta merged into a copy."""
    ref = copy.deepcopy(base)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for n, d in deltas.items():
            mods[n].weight += d
        for n, d in (bias_deltas or {}).items():
            mods[n].bias += d
    return run(ref, inputs)


def ours_with(base, inputs, path, strength=1.0):
    model = ours_from(base)
    weights = parse_lora(load_lora_file(path), model, path)
    apply_loras(model, [(weights, strength)])
    return run(model, inputs), weights, model


@needs_peft
@pytest.mark.parametrize("fmt,alpha", [("peft", None), ("peft_default", None), ("kohya", 8), ("comfy", 2), ("bare", 8), ("bare_ab", 16)])
def test_format_matches_diffusers(base, shapes, inputs, tmp_path, fmt, alpha):
    path = write_lora(tmp_path, lora_factors(shapes, seed=2), fmt, alpha)
    expected = diffusers_fused(base, inputs, path)
    got, weights, _ = ours_with(base, inputs, path)
    assert len(weights.layers) == len(shapes) and not weights.ignored
    assert rel_err(run(base, inputs), expected) > 1e-2  # the LoRA really changes the output
    assert rel_err(got, expected) <= 1e-5


@needs_peft
def test_qwen_mmdit_with_lora_matches_diffusers(base, shapes, tmp_path):
    mmdit = pytest.importorskip("qwenimage_pack.core.models.mmdit")
    model = mmdit.QwenImageMMDiT(mmdit.MMDiTConfig(**CFG))
    model.load_state_dict(base.state_dict(), strict=True)
    path = write_lora(tmp_path, lora_factors(shapes, seed=20), "bare", alpha=8)
    weights = parse_lora(load_lora_file(path), model, path)
    assert len(weights.layers) == len(shapes)
    apply_loras(model, [(weights, 0.7)])

    g = torch.Generator().manual_seed(21)
    x, context, sigma = torch.randn(1, 16, 8, 6, generator=g), torch.randn(1, 7, 48, generator=g), torch.tensor([0.6])
    with torch.no_grad():
        got = model(x, sigma, context)
    tokens = QwenImagePipeline._pack_latents(x, 1, 16, 8, 6)
    ref_inputs = dict(hidden_states=tokens, encoder_hidden_states=context, timestep=sigma, img_shapes=[(1, 4, 3)])
    expected = QwenImagePipeline._unpack_latents(diffusers_fused(base, ref_inputs, path, strength=0.7), 64, 48, 8)[:, :, 0]
    assert rel_err(got, expected) <= 1e-5
    apply_loras(model, [])
    with torch.no_grad():
        assert rel_err(model(x, sigma, context), expected) > 1e-2


@needs_peft
def test_peft_metadata_alpha_matches_diffusers(base, shapes, inputs, tmp_path):
    # diffusers / PEFT store lora_alpha in JSON metadata, not as tensors: scale = 8 / 4.
    meta = {"r": RANK, "lora_alpha": 8, "target_modules": sorted(shapes)}
    meta = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in meta.items()})}
    path = write_lora(tmp_path, lora_factors(shapes, seed=3), "peft", metadata=meta)
    expected = diffusers_fused(base, inputs, path, convert=False)
    got, weights, _ = ours_with(base, inputs, path)
    assert all(layer.scale == 2.0 for layer in weights.layers.values())
    assert rel_err(got, expected) <= 1e-5


@needs_peft
def test_strength_half_matches_diffusers_scale(base, shapes, inputs, tmp_path):
    path = write_lora(tmp_path, lora_factors(shapes, seed=4), "kohya", alpha=2)
    expected = diffusers_fused(base, inputs, path, strength=0.5)
    got, _, _ = ours_with(base, inputs, path, strength=0.5)
    assert rel_err(got, expected) <= 1e-5


@needs_peft
def test_lokr_matches_diffusers(base, shapes, inputs, tmp_path):
    # diffusers' own LoKr layout: full Kronecker factors on peft's factorization, scale 1.
    g = torch.Generator().manual_seed(5)
    sd = {}
    for n, (o, i) in shapes.items():
        (ol, ok), (im, inn) = factorization(o, -1), factorization(i, -1)
        sd[f"transformer.{n}.lokr_w1"] = torch.randn(ol, im, generator=g) * 0.2
        sd[f"transformer.{n}.lokr_w2"] = torch.randn(ok, inn, generator=g) * 0.2
    path = tmp_path / "lokr.safetensors"
    save_file(sd, str(path))
    expected = diffusers_fused(base, inputs, path, convert=False)
    got, weights, _ = ours_with(base, inputs, path)
    assert "LoKr" in weights.format
    assert rel_err(got, expected) <= 1e-5


def test_lycoris_loha_matches_merged_weights(base, shapes, inputs, tmp_path):
    g = torch.Generator().manual_seed(6)
    sd, deltas, alpha, r = {}, {}, 3.0, 2
    for n, (o, i) in shapes.items():
        f = [torch.randn(o, r, generator=g) * 0.5, torch.randn(r, i, generator=g) * 0.5,
             torch.randn(o, r, generator=g) * 0.5, torch.randn(r, i, generator=g) * 0.5]
        key = "lycoris_" + n.replace(".", "_")
        for part, t in zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), f):
            sd[f"{key}.{part}"] = t
        sd[f"{key}.alpha"] = torch.tensor(alpha)
        deltas[n] = (f[0] @ f[1]) * (f[2] @ f[3]) * (alpha / r)
    path = tmp_path / "loha.safetensors"
    save_file(sd, str(path))
    got, weights, _ = ours_with(base, inputs, path)
    assert "LoHa" in weights.format and lora_summary(weights).count("rank 2") == 1
    assert rel_err(got, merged(base, inputs, deltas)) <= 1e-5


def test_lycoris_lokr_decomposed_with_alpha_matches_merged_weights(base, shapes, inputs, tmp_path):
    # kohya/LyCORIS spelling, w2 split as w2_a @ w2_b: scale = alpha / rank of w2's split.
    g = torch.Generator().manual_seed(7)
    sd, deltas, alpha, r = {}, {}, 4.0, 2
    for n, (o, i) in shapes.items():
        (ol, ok), (im, inn) = (4, o // 4), (4, i // 4)
        w1 = torch.randn(ol, im, generator=g) * 0.3
        w2a, w2b = torch.randn(ok, r, generator=g) * 0.3, torch.randn(r, inn, generator=g) * 0.3
        key = kohya_name(n)
        sd.update({f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b, f"{key}.alpha": torch.tensor(alpha)})
        deltas[n] = torch.kron(w1, w2a @ w2b) * (alpha / r)
    path = tmp_path / "lokr_lycoris.safetensors"
    save_file(sd, str(path))
    got, _, _ = ours_with(base, inputs, path)
    assert rel_err(got, merged(base, inputs, deltas)) <= 1e-5


def test_weight_and_bias_diffs_match_merged_weights(base, shapes, inputs, tmp_path):
    g = torch.Generator().manual_seed(8)
    names = [n for n in shapes if ".attn." in n]
    diffs = {n: torch.randn(*shapes[n], generator=g) * 0.05 for n in names[:4]}
    biases = {n: torch.randn(shapes[n][0], generator=g) * 0.1 for n in names}
    sd = {f"diffusion_model.{n}.diff": d for n, d in diffs.items()}
    sd.update({f"diffusion_model.{n}.diff_b": b for n, b in biases.items()})
    path = tmp_path / "diff.safetensors"
    save_file(sd, str(path))
    got, weights, _ = ours_with(base, inputs, path)
    assert len(weights.layers) == len(names)
    assert rel_err(got, merged(base, inputs, diffs, biases)) <= 1e-5


def test_strength_zero_and_removal_restore_exactly(base, shapes, inputs, tmp_path):
    path = write_lora(tmp_path, lora_factors(shapes, seed=9), "kohya", alpha=4)
    model = ours_from(base)
    clean = run(model, inputs)
    weights = parse_lora(load_lora_file(path), model, path)

    apply_loras(model, [(weights, 0.0)])
    assert not any(getattr(m, "patches", None) for m in model.modules())
    assert torch.equal(run(model, inputs), clean)

    apply_loras(model, [(weights, 1.0)])
    assert not torch.equal(run(model, inputs), clean)
    apply_loras(model, [])
    assert not any(getattr(m, "patches", None) for m in model.modules())
    assert torch.equal(run(model, inputs), clean)


def test_apply_is_an_idempotent_sync(base, shapes, inputs, tmp_path):
    model = ours_from(base)
    a = parse_lora(load_lora_file(write_lora(tmp_path, lora_factors(shapes, 10), "peft", name="a.safetensors")), model, "a")
    b = parse_lora(load_lora_file(write_lora(tmp_path, lora_factors(shapes, 11), "kohya", 2, name="b.safetensors")), model, "b")
    lin = model.get_submodule("transformer_blocks.0.attn.to_q")
    lin.add_patch("other", lambda x, y: y)  # patches that are not LoRAs are left alone

    apply_loras(model, [(a, 1.0), (b, -0.7)])
    first = dict(lin.patches)
    both = run(model, inputs)
    apply_loras(model, [(a, 1.0), (b, -0.7)])
    assert lin.patches.keys() == first.keys() and all(lin.patches[k] is first[k] for k in first)
    assert torch.equal(run(model, inputs), both)

    apply_loras(model, [(a, 1.0)])
    assert sorted(lin.patches) == sorted(["other", f"{PATCH_PREFIX}0:a"])
    deltas = {}
    for n, layer in a.layers.items():
        deltas[n] = layer.delta_weight()
    assert rel_err(run(model, inputs), merged(base, inputs, deltas)) <= 1e-5

    # the two stacked LoRAs equal the sum of their deltas
    apply_loras(model, [(a, 1.0), (b, -0.7)])
    for n, layer in b.layers.items():
        deltas[n] = deltas[n] - 0.7 * layer.delta_weight()
    assert rel_err(run(model, inputs), merged(base, inputs, deltas)) <= 1e-5


def test_patch_caches_per_device_and_dtype_and_keeps_autograd_path(tmp_path):
    torch.manual_seed(12)
    lin = Linear(32, 24)
    down, up = torch.randn(4, 32), torch.randn(24, 4)
    sd = {"proj.lora_down.weight": down.to(torch.bfloat16), "proj.lora_up.weight": up.to(torch.bfloat16), "proj.alpha": torch.tensor(2.0)}
    holder = nn.Module()
    holder.proj = lin
    weights = parse_lora(sd, holder, "mem")
    apply_loras(holder, [(weights, 1.5)])
    layer = weights.layers["proj"]
    assert layer.down.device.type == "cpu" and not layer._cache  # nothing moved before first use

    x = torch.randn(3, 5, 32)
    d, u = down.to(torch.bfloat16).float(), up.to(torch.bfloat16).float()
    want = F.linear(x, lin.weight + 1.5 * 0.5 * (u @ d), lin.bias)
    with torch.no_grad():
        assert torch.allclose(lin(x), want, atol=1e-5, rtol=1e-5)
        assert torch.allclose(lin(x.bfloat16()).float(), want, atol=0.1, rtol=0.05)
    assert set(layer._cache) == {(x.device, torch.float32), (x.device, torch.bfloat16)}
    # with autograd on, the patch must not write into y in place
    xg = x.clone().requires_grad_(True)
    out = lin(xg)
    out.sum().backward()
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5) and xg.grad is not None


def test_fp8_weight_with_lora_equals_dequantized_plus_lora():
    torch.manual_seed(13)
    holder = nn.Module()
    holder.proj = lin = Linear(64, 48)
    w8 = (torch.randn(48, 64) * 0.05).to(torch.float8_e4m3fn)
    lin.weight = nn.Parameter(w8, requires_grad=False)
    lin.set_scale(torch.tensor(0.5))
    down, up = torch.randn(8, 64), torch.randn(48, 8)
    weights = parse_lora({"proj.lora_A.weight": down, "proj.lora_B.weight": up}, holder, "mem")
    apply_loras(holder, [(weights, 0.8)])
    x = torch.randn(6, 64)
    want = F.linear(x, w8.float() * 0.5 + 0.8 * up @ down, lin.bias)
    with torch.no_grad():
        assert rel_err(lin(x), want) <= 1e-5


@pytest.mark.parametrize("qname", ["Q8_0", "Q4_0"])
def test_gguf_weight_with_lora_equals_dequantized_plus_lora(qname):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("qwenimage_pack.core.quant.gguf_dequant")
    import numpy as np

    qtype = getattr(gguf.GGMLQuantizationType, qname)
    torch.manual_seed(14)
    w = (torch.randn(48, 64) * 0.05).numpy()
    blocks = gguf.quants.quantize(w, qtype)
    dense = torch.from_numpy(np.asarray(gguf.quants.dequantize(blocks, qtype), dtype=np.float32))
    holder = nn.Module()
    holder.proj = lin = Linear(64, 48)
    lin.set_quantized(torch.from_numpy(blocks), int(qtype), (48, 64))
    down, up = torch.randn(8, 64), torch.randn(48, 8)
    weights = parse_lora({"proj.lora_down.weight": down, "proj.lora_up.weight": up, "proj.alpha": torch.tensor(4.0)}, holder, "mem")
    apply_loras(holder, [(weights, 1.0)])
    x = torch.randn(6, 64)
    with torch.no_grad():
        assert rel_err(lin(x), F.linear(x, dense + 0.5 * up @ down, lin.bias)) <= 1e-5


def test_summary_line_names_file_format_ranks_and_layer_count(base, shapes, tmp_path):
    factors = lora_factors(shapes, 15)
    factors["proj_out"] = (torch.randn(8, shapes["proj_out"][1]), torch.randn(shapes["proj_out"][0], 8))
    path = write_lora(tmp_path, factors, "kohya", alpha=4, name="style.safetensors")
    text = lora_summary(parse_lora(load_lora_file(path), ours_from(base), path))
    assert text == f"style.safetensors: kohya LoRA, ranks 4-8, {len(shapes)} layers"


def test_unmatched_keys_warn_once(base, shapes, tmp_path):
    factors = lora_factors(shapes, 16)
    for j in range(2, 9):  # a 60-layer LoRA on this 2-layer model: the extra blocks do not exist
        factors[f"transformer_blocks.{j}.attn.to_q"] = tuple(t.clone() for t in factors["transformer_blocks.0.attn.to_q"])
    path = write_lora(tmp_path, factors, "comfy", alpha=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights = parse_lora(load_lora_file(path), ours_from(base), path)
    lora_warnings = [w for w in caught if "LoRA tensors were not applied" in str(w.message)]
    assert len(lora_warnings) == 1 and "21 of" in str(lora_warnings[0].message)
    assert len(weights.layers) == len(shapes) and len(weights.ignored) == 21


def _save(tmp_path, sd, name):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("keys,what", [
    (["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"], "Flux"),
    (["transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.attn.to_q"], "Flux"),
    (["lora_unet_input_blocks_4_1_proj_in", "lora_unet_output_blocks_3_1_proj_out"], "SDXL"),
])
def test_lora_of_another_model_is_refused(base, tmp_path, keys, what):
    sd = {}
    for k in keys:  # shapes that would fit the tiny model, so only the names give it away
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = torch.randn(4, 64), torch.randn(64, 4)
    path = _save(tmp_path, sd, "other.safetensors")
    with pytest.raises(WeightFileError, match=what) as e:
        parse_lora(load_lora_file(path), ours_from(base), path)
    assert "other.safetensors" in str(e.value)


def test_files_without_usable_lora_are_refused(base, tmp_path):
    model = ours_from(base)
    full = _save(tmp_path, {"img_in.weight": torch.randn(64, 64)}, "full_model.safetensors")
    with pytest.raises(WeightFileError, match="no LoRA tensors"):
        parse_lora(load_lora_file(full), model, full)
    te = _save(tmp_path, {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 8),
                          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 4)}, "te.safetensors")
    with pytest.raises(WeightFileError, match="text-encoder"):
        parse_lora(load_lora_file(te), model, te)


def test_damaged_and_pickled_files_are_refused(tmp_path):
    good = _save(tmp_path, {"img_in.lora_down.weight": torch.randn(4, 64)}, "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x07" * 64)
    pickled = tmp_path / "lora.safetensors.pt"
    torch.save({"a.lora_down.weight": torch.zeros(1)}, pickled)
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(pickled.read_bytes())
    for path in (truncated, junk, pickled, renamed, tmp_path / "missing.safetensors"):
        with pytest.raises(WeightFileError) as e:
            load_lora_file(path)
        assert path.name in str(e.value)
    assert "pickle" in str(pytest.raises(WeightFileError, load_lora_file, renamed).value)


def test_rank_mismatch_is_refused_and_model_untouched(base, shapes, inputs, tmp_path):
    model = ours_from(base)
    good = parse_lora(load_lora_file(write_lora(tmp_path, lora_factors(shapes, 17), "peft", name="g.safetensors")), model, "g")
    apply_loras(model, [(good, 1.0)])
    before = {n: dict(m.patches) for n, m in model.named_modules() if isinstance(m, Linear)}
    out_before = run(model, inputs)

    factors = lora_factors(shapes, 18)
    down, up = factors["transformer_blocks.1.attn.to_k"]
    factors["transformer_blocks.1.attn.to_k"] = (down, up[:, :3])  # up's rank 3 vs down's rank 4
    bad = write_lora(tmp_path, factors, "kohya", alpha=4, name="bad_rank.safetensors")
    with pytest.raises(WeightFileError, match="bad_rank.safetensors.*transformer_blocks.1.attn.to_k"):
        parse_lora(load_lora_file(bad), model, bad)
    factors["transformer_blocks.1.attn.to_k"] = (torch.randn(4, 65), up)  # in_features 65 vs 64
    bad_in = write_lora(tmp_path, factors, "kohya", alpha=4, name="bad_in.safetensors")
    with pytest.raises(WeightFileError, match="does not fit"):
        parse_lora(load_lora_file(bad_in), model, bad_in)

    # a LoRA parsed for another model size is refused by apply_loras before any patch changes
    other = QwenImageTransformer2DModel(**{**CFG, "attention_head_dim": 16})
    foreign = parse_lora(load_lora_file(write_lora(tmp_path, lora_factors(
        {n: tuple(m.weight.shape) for n, m in other.named_modules() if isinstance(m, nn.Linear)}, 19), "peft",
        name="small.safetensors")), ours_from(other), "small")
    with pytest.raises(WeightFileError, match="small"):
        apply_loras(model, [(good, 0.5), (foreign, 1.0)])
    after = {n: dict(m.patches) for n, m in model.named_modules() if isinstance(m, Linear)}
    assert after.keys() == before.keys() and all(after[n] == before[n] for n in before)
    assert torch.equal(run(model, inputs), out_before)


def test_missing_up_tensor_is_refused(base, tmp_path):
    path = _save(tmp_path, {"transformer.img_in.lora_A.weight": torch.randn(4, 64)}, "half.safetensors")
    with pytest.raises(WeightFileError, match="half.safetensors.*no matching up"):
        parse_lora(load_lora_file(path), ours_from(base), path)


def test_dora_magnitudes_are_dropped_with_the_one_warning():
    holder = nn.Module()
    holder.proj = Linear(16, 8)
    sd = {"proj.lora_A.weight": torch.randn(2, 16), "proj.lora_B.weight": torch.randn(8, 2),
          "proj.lora_magnitude_vector": torch.randn(8), "proj.extra": torch.randn(3)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights = parse_lora(sd, holder, "dora.safetensors")
    assert len(caught) == 1 and "DoRA" in str(caught[0].message) and "2 of 4" in str(caught[0].message)
    assert list(weights.layers) == ["proj"] and weights.layers["proj"].rank == 2
