"""load_text_encoder / load_vae on files written in the layouts users have, checked against
transformers' Qwen2.5-VL and diffusers' AutoencoderKLQwenImage holding the same weights."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import references as refs

from qwenimage_pack.core.layers.linear import Linear
from qwenimage_pack.core.loading.load import inspect_file, load_text_encoder, load_vae

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

VOCAB = 1000


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fp8_quantize(w: torch.Tensor):
    """ComfyUI 'scaled fp8': per-tensor scale amax/448, weight stored as float8_e4m3fn."""
    scale = w.float().abs().max() / 448.0
    return (w.float() / scale).to(torch.float8_e4m3fn), scale


# ------------------------------------------------------------------ text encoder

@pytest.fixture(scope="module")
def text_ref():
    return refs.qwen25vl_reference(vocab=VOCAB)


original_layout = refs.original_text_layout  # the names in ComfyUI's qwen_2.5_vl_7b.safetensors


def reference_hidden(model, ids):
    with torch.no_grad():
        return model.model(input_ids=ids).last_hidden_state


def vision_reference(model) -> dict:
    return {k[len("model.visual."):]: v for k, v in model.state_dict().items() if k.startswith("model.visual.")}


IDS = torch.randint(0, VOCAB, (1, 19), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", ["original", "transformers5"])
def test_text_encoder_single_file_both_layouts(text_ref, tmp_path, layout):
    sd = {k: v.contiguous() for k, v in text_ref.state_dict().items()}
    if layout == "original":
        sd = original_layout(sd)
    path = tmp_path / "qwen_2.5_vl_7b.safetensors"
    save_file(sd, str(path))

    model, vision = load_text_encoder(path)
    got = model(input_ids=IDS)
    assert rel_err(got, reference_hidden(text_ref, IDS)) <= 1e-5
    # The vision tower is not part of the LM but comes back for the edit path.
    ref_vision = vision_reference(text_ref)
    assert vision is not None and set(vision) == set(ref_vision)
    for k, v in ref_vision.items():
        assert torch.equal(vision[k], v)
    assert inspect_file(path).kind == "qwen25vl_text_encoder"


def test_text_encoder_fp8_scaled(text_ref, tmp_path):
    sd = original_layout(text_ref.state_dict())
    dequantized = copy.deepcopy(text_ref)
    dq_sd = dequantized.state_dict()
    out = {}
    for k, v in sd.items():
        quantize = v.dim() == 2 and k.endswith(".weight") and (".layers." in k or k.startswith("visual.blocks"))
        if not quantize:
            out[k] = v
            continue
        q, s = fp8_quantize(v)
        out[k] = q
        out[k[: -len(".weight")] + ".scale_weight"] = s.reshape(1)
        out[k[: -len(".weight")] + ".scale_input"] = torch.ones(1)
        v5 = k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else "model." + k
        dq_sd[v5].copy_(q.float() * s)
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    save_file(out, str(path))

    model, vision = load_text_encoder(path)
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear) and q_proj.weight.dtype == torch.float8_e4m3fn
    assert q_proj.weight_scale is not None
    assert rel_err(model(input_ids=IDS), reference_hidden(dequantized, IDS)) <= 1e-5
    # Vision weights come back dense (dequantized with their scales).
    ref_vision = vision_reference(dequantized)
    assert set(vision) == set(ref_vision)
    assert all(not (v.dtype == torch.float8_e4m3fn) for v in vision.values())
    for k, v in ref_vision.items():
        assert torch.allclose(vision[k].float(), v, rtol=1e-2, atol=1e-4), k
    assert "scaled fp8" in inspect_file(path).layout


def test_text_encoder_weight_dtype_fp8_and_bf16(text_ref, tmp_path):
    path = tmp_path / "te.safetensors"
    save_file(original_layout(text_ref.state_dict()), str(path))
    ref = reference_hidden(text_ref, IDS)

    fp8, _ = load_text_encoder(path, weight_dtype="fp8_e4m3fn")
    lin = fp8.layers[1].mlp.down_proj
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.weight_scale is not None
    # Everything outside the decoder layers' Linear weights stays bf16.
    assert fp8.embed_tokens.weight.dtype == torch.bfloat16 and lin.bias is None
    assert fp8.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    assert rel_err(fp8(input_ids=IDS), ref) <= 0.15  # fp8 weights and bf16 activations

    # The quantization is the standard per-tensor amax/448 one: with fp32 activations the
    # model equals transformers' holding the same fp8-rounded weights.
    rounded = copy.deepcopy(text_ref)
    with torch.no_grad():
        for name, p in rounded.model.language_model.layers.named_parameters():
            if p.dim() == 2:
                q, s = fp8_quantize(p)
                p.copy_(q.float() * s)
    fp8_32, _ = load_text_encoder(path, weight_dtype="fp8_e4m3fn", compute_dtype=torch.float32)
    assert fp8_32.layers[1].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert rel_err(fp8_32(input_ids=IDS), reference_hidden(rounded, IDS)) <= 1e-5

    bf16, _ = load_text_encoder(path, weight_dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert rel_err(bf16(input_ids=IDS), ref) <= 3e-2


def test_text_encoder_diffusers_folder(text_ref, tmp_path):
    pipeline = tmp_path / "Qwen-Image"
    text_ref.save_pretrained(pipeline / "text_encoder", max_shard_size="600KB")
    (pipeline / "transformer").mkdir()
    (pipeline / "vae").mkdir()
    assert len(list((pipeline / "text_encoder").glob("*.safetensors"))) >= 2
    assert list((pipeline / "text_encoder").glob("*.safetensors.index.json"))

    for target in (pipeline, pipeline / "text_encoder"):
        model, vision = load_text_encoder(target)
        assert rel_err(model(input_ids=IDS), reference_hidden(text_ref, IDS)) <= 1e-5
        assert vision is not None and set(vision) == set(vision_reference(text_ref))
    assert inspect_file(pipeline, component="text_encoder").layout.startswith("diffusers folder")


# ------------------------------------------------------------------ VAE

@pytest.fixture(scope="module")
def vae_ref():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    return vae


PIXELS = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
LATENT = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(3))


def check_vae(ours, ref):
    with torch.no_grad():
        ref_dec = ref.decode(LATENT[:, :, None]).sample[:, :, 0]
        ref_enc = ref.encode(PIXELS[:, :, None]).latent_dist.mean[:, :, 0]
        assert rel_err(ours.decode(LATENT), ref_dec) <= 1e-4
        assert rel_err(ours.encode(PIXELS), ref_enc) <= 1e-4


def test_vae_diffusers_names_single_file(vae_ref, tmp_path):
    path = tmp_path / "vae_diffusers_names.safetensors"
    save_file({k: v.contiguous() for k, v in vae_ref.state_dict().items()}, str(path))
    check_vae(load_vae(path), vae_ref)


def test_vae_wan_names(vae_ref, tmp_path):
    from qwenimage_pack.core.keymaps.vae import convert_vae_keys

    wan = convert_vae_keys({k: v.contiguous() for k, v in vae_ref.state_dict().items()})
    assert "encoder.conv1.weight" in wan and "decoder.upsamples.0.residual.0.gamma" in wan
    path = tmp_path / "qwen_image_vae.safetensors"
    save_file(wan, str(path))
    check_vae(load_vae(path), vae_ref)
    assert inspect_file(path).kind == "wan_vae"

    half = load_vae(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_vae_diffusers_folder(vae_ref, tmp_path):
    pipeline = tmp_path / "Qwen-Image"
    vae_ref.save_pretrained(pipeline / "vae")
    (pipeline / "transformer").mkdir()
    assert (pipeline / "vae" / "config.json").is_file()
    check_vae(load_vae(pipeline), vae_ref)
    check_vae(load_vae(pipeline / "vae"), vae_ref)


def test_text_encoder_gguf(text_ref, tmp_path):
    """llama.cpp layout (arch qwen2vl): blk.N.* names, Q8_0 layer weights, config from metadata."""
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as T

    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    path = tmp_path / "Qwen2.5-VL-7B-Instruct-Q8_0.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2vl")
    cfg = text_ref.config.text_config
    for key, value in (("embedding_length", cfg.hidden_size), ("block_count", cfg.num_hidden_layers),
                       ("feed_forward_length", cfg.intermediate_size), ("attention.head_count", cfg.num_attention_heads),
                       ("attention.head_count_kv", cfg.num_key_value_heads), ("vocab_size", VOCAB)):
        w.add_uint32(f"qwen2vl.{key}", value)
    w.add_float32("qwen2vl.rope.freq_base", 1e6)
    w.add_float32("qwen2vl.attention.layer_norm_rms_epsilon", 1e-6)
    rounded = copy.deepcopy(text_ref)
    with torch.no_grad():
        lm = rounded.model.language_model
        w.add_tensor("token_embd.weight", lm.embed_tokens.weight.numpy())
        w.add_tensor("output_norm.weight", lm.norm.weight.numpy())
        for name, p in lm.layers.named_parameters():
            i, rest = name.split(".", 1)
            mod, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{parts[mod]}.{kind}"
            if p.dim() == 2:
                data = gguf.quants.quantize(p.numpy(), T.Q8_0)
                w.add_tensor(gname, data, raw_dtype=T.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(data, T.Q8_0).reshape(p.shape).copy()))
            else:
                w.add_tensor(gname, p.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    model, vision = load_text_encoder(path, compute_dtype=torch.float32)
    assert vision is None and model.layers[0].mlp.up_proj.is_quantized
    assert model.config.num_heads == 2 and model.config.num_kv_heads == 1
    assert rel_err(model(input_ids=IDS), reference_hidden(rounded, IDS)) <= 1e-5
    assert inspect_file(path).kind == "qwen25vl_text_encoder"
