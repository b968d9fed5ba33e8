"""QwenTextEncoder against transformers' Qwen2.5-VL on a tiny random config, and the prompt
embedding against diffusers' QwenImagePipeline."""
from __future__ import annotations

import pytest
import torch

import references as refs

from qwenimage_pack.core.encoders.text_encoder import QwenTextEncoder, TextEncoderConfig, encode_text
from qwenimage_pack.core.keymaps.text import convert_text_encoder_keys, text_encoder_config

transformers = pytest.importorskip("transformers")

VOCAB = 152064  # the real vocabulary, so the real tokenizer's ids are valid


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def reference():
    return refs.tiny_text_encoder()


original_layout = refs.original_text_layout


def build_ours(reference, layout: str = "v5") -> QwenTextEncoder:
    sd = reference.state_dict()
    if layout == "original":
        sd = original_layout(sd)
        assert any(k.startswith("model.layers.") for k in sd) and any(k.startswith("visual.") for k in sd)
    language, vision = convert_text_encoder_keys(sd)
    cfg = text_encoder_config({k: tuple(v.shape) for k, v in sd.items()})
    ours = QwenTextEncoder(cfg).eval()
    ours.load_state_dict(language, strict=True)
    expected_vision = {k[len("model.visual."):] for k in reference.state_dict() if k.startswith("model.visual.")}
    assert set(vision) == expected_vision
    return ours


@pytest.fixture(scope="module")
def ours(reference):
    return build_ours(reference)


@pytest.mark.parametrize("layout", ["v5", "original"])
def test_batch1_matches_transformers(reference, ours, layout):
    if layout == "original":
        ours = build_ours(reference, layout)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, 23))
    with torch.no_grad():
        ref = reference.model(input_ids=ids).last_hidden_state
        got = ours(input_ids=ids)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-5


def test_right_padding_matches_transformers(reference, ours):
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 19))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, 12:] = 0
    ids[1, 12:] = 151643
    with torch.no_grad():
        ref = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    assert rel_err(got[keep], ref[keep]) <= 1e-5


def test_left_padding_matches_transformers(reference, ours):
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0
    ids[0, :5] = 151643
    # transformers' get_rope_index numbers text tokens over the unmasked ones only.
    positions, _ = reference.model.get_rope_index(
        ids, mm_token_type_ids=torch.zeros_like(ids), attention_mask=mask
    )
    with torch.no_grad():
        ref = reference.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        unpadded = reference.model(input_ids=ids[:1, 5:]).last_hidden_state
        got = ours(input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    assert torch.isfinite(got).all()
    assert rel_err(got[keep], ref[keep]) <= 1e-5
    assert rel_err(got[0, 5:], unpadded[0]) <= 1e-5


def test_mrope_sections_and_inputs_embeds(reference, ours):
    """Distinct temporal/height/width positions (as image tokens get) exercise the section split."""
    torch.manual_seed(4)
    ids = torch.randint(0, VOCAB, (1, 12))
    positions = torch.randint(0, 40, (3, 1, 12))
    with torch.no_grad():
        embeds = reference.model.get_input_embeddings()(ids)
        ref = reference.model.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        got = ours(inputs_embeds=embeds, position_ids=positions)
    assert rel_err(got, ref) <= 1e-5


def test_bf16_compute(reference):
    ours = build_ours(reference).to(torch.bfloat16)
    assert ours.compute_dtype == torch.bfloat16
    torch.manual_seed(5)
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        ref = reference.model(input_ids=ids).last_hidden_state
        got = ours(input_ids=ids)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref) <= 3e-2


def test_config_from_hf_and_from_shapes(reference):
    tiny = TextEncoderConfig.from_hf_config(reference.config.to_dict())
    assert tiny == TextEncoderConfig(
        vocab_size=VOCAB, hidden_size=256, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=128,
        intermediate_size=512,
    )
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert text_encoder_config(shapes) == tiny
    # transformers 4.x flat config.json of Qwen2.5-VL-7B-Instruct.
    flat = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "hidden_size": 3584, "intermediate_size": 18944,
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 152064, "vision_config": {"depth": 32, "hidden_size": 1280},
    }
    assert TextEncoderConfig.from_hf_config(flat) == TextEncoderConfig()
    with pytest.raises(ValueError, match="hidden_size"):
        TextEncoderConfig.from_hf_config({"vocab_size": 10})


def test_prompt_embeds_match_diffusers(reference, ours, tokenizer_dir):
    diffusers = pytest.importorskip("diffusers")
    from qwenimage_pack.core.encoders.tokenizer import QwenTokenizer

    pipe = diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, transformer=None,
        text_encoder=reference, tokenizer=transformers.AutoTokenizer.from_pretrained(tokenizer_dir),
    )
    tok = QwenTokenizer.from_dir(tokenizer_dir)
    for prompt in ["A red fox in the snow, 35mm photo", "一只猫  坐在\n窗台上 😺", ""]:
        with torch.no_grad():
            ref, _ = pipe._get_qwen_prompt_embeds(prompt, device=torch.device("cpu"))
        got = encode_text(ours, tok, prompt)
        assert got.shape == ref.shape
        assert rel_err(got, ref) <= 1e-5


def test_every_text_encoder_key_layout_routes_to_the_language_model_or_vision_tower():
    from qwenimage_pack.core.keymaps.text import is_text_encoder_keys, text_key

    assert text_key("model.layers.3.mlp.up_proj.weight") == ("lm", "layers.3.mlp.up_proj.weight")
    assert text_key("model.language_model.norm.weight") == ("lm", "norm.weight")
    assert text_key("model.layers.0.self_attn.q_proj.scale_weight") == ("lm", "layers.0.self_attn.q_proj.scale_weight")
    assert text_key("visual.merger.mlp.0.weight") == ("vision", "merger.mlp.0.weight")
    assert text_key("model.visual.blocks.0.attn.qkv.bias") == ("vision", "blocks.0.attn.qkv.bias")
    assert text_key("blk.2.attn_output.weight") == ("lm", "layers.2.self_attn.o_proj.weight")
    assert text_key("token_embd.weight") == ("lm", "embed_tokens.weight")
    for dropped in ("lm_head.weight", "scaled_fp8", "output.weight"):
        assert text_key(dropped)[0] == "drop"
    with pytest.raises(ValueError, match="transformer_blocks.0.attn.to_q.weight"):
        text_key("transformer_blocks.0.attn.to_q.weight")

    lm = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
          "model.layers.0.self_attn.k_proj.bias", "model.layers.0.mlp.gate_proj.weight",
          "model.layers.0.input_layernorm.weight"]
    assert is_text_encoder_keys(lm + ["visual.patch_embed.proj.weight", "lm_head.weight"])
    assert not is_text_encoder_keys(lm[:3])  # no q/k/v bias: not a Qwen2-style model
    assert not is_text_encoder_keys(["txt_norm.weight", "transformer_blocks.0.attn.to_q.weight"])
    with pytest.raises(ValueError, match="already uses"):
        convert_text_encoder_keys(["model.norm.weight", "model.language_model.norm.weight"])
