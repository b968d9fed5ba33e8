"""Reading GGUF files: tiny files written with gguf-py, checked against diffusers /
transformers models holding the same (gguf-py-dequantized) weights."""
from __future__ import annotations

import copy
import json
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from gguf import MODEL_ARCH, GGMLQuantizationType as T, get_tensor_name_map, quants

from gguf_writer_util import encode, write_gguf
from qwenimage_pack.core.errors import WeightFileError
from qwenimage_pack.core.formats.gguf import (
    GGUFContents, LazyStringArray, read_header, read_tensors, text_config_from_metadata, vision_config_from_metadata,
)
from qwenimage_pack.core.layers.linear import Embedding, Linear, QuantizedTensor
from qwenimage_pack.core.loading.gguf import read_gguf


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def randomize(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


def write_model(path, arch, state_dict, types, names=lambda n: n, metadata=None, seed=0):
    """Encode every tensor with ``types(name, shape)``; returns the dense values gguf-py decodes."""
    rng = np.random.default_rng(seed)
    tensors, dense = {}, {}
    for name, t in state_dict.items():
        data, raw_dtype, decoded = encode(t.detach().float().numpy(), types(name, tuple(t.shape)), rng)
        tensors[names(name)] = (data, raw_dtype)
        dense[name] = torch.from_numpy(decoded.copy())
    write_gguf(path, arch, tensors, metadata)
    return dense


def assign(model: nn.Module, tensors: dict) -> None:
    """Put read_gguf's tensors into ``model`` the way a loader does: blocks into our Linear /
    Embedding, everything else as plain parameters."""
    for name, t in tensors.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if isinstance(t, QuantizedTensor):
            assert attr == "weight" and isinstance(module, (Linear, Embedding)), name
            module.set_quantized(t.blocks, t.qtype, t.shape)
        else:
            assert tuple(t.shape) == tuple(getattr(module, attr).shape), name
            setattr(module, attr, nn.Parameter(t, requires_grad=False))


def use_our_linear(model: nn.Module) -> nn.Module:
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, Linear(m.in_features, m.out_features, bias=m.bias is not None))
    return model


# ---------------------------------------------------------------------------------------
# MMDiT

UNQUANTIZED = ("img_in.", "txt_in.", "time_text_embed.", "norm_out.", "proj_out.")


def dit_types(main: T, down: T | None = None, value: T | None = None):
    """Per-tensor types as real Qwen-Image GGUFs mix them (FACTS 8)."""
    def pick(name: str, shape) -> T:
        if len(shape) == 1:
            return T.F32
        if name.startswith(UNQUANTIZED):
            return T.BF16
        if down is not None and ".net.2." in name:
            return down
        if value is not None and ("to_v." in name or "add_v_proj." in name):
            return value
        return main
    return pick


RECIPES = {
    "Q8_0": dit_types(T.Q8_0),
    "Q4_0": dit_types(T.Q4_0, down=T.Q4_1),
    "Q4_K_M": dit_types(T.Q4_K, down=T.Q6_K, value=T.Q5_K),
}


@pytest.fixture(scope="module")
def diffusers_dit():
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128,
        num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(16, 56, 56),
    )
    return randomize(model, 0)


def dit_forward(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 64, generator=g)  # 8x8 latent -> 4x4 tokens of 64
    ctx = torch.randn(1, 7, 48, generator=g)
    with torch.no_grad():
        return model(
            hidden_states=x, encoder_hidden_states=ctx, encoder_hidden_states_mask=torch.ones(1, 7),
            timestep=torch.tensor([0.6]), img_shapes=[(1, 4, 4)], return_dict=False,
        )[0]


@pytest.fixture(scope="module")
def dit_gguf(diffusers_dit, tmp_path_factory):
    """``recipe -> (path, dense values)``, each file written once per module."""
    made = {}

    def make(recipe: str):
        if recipe not in made:
            path = tmp_path_factory.mktemp("dit") / f"qwen-image-{recipe}.gguf"
            # Real files carry no prefix; one variant checks the ComfyUI prefix is stripped.
            prefix = "model.diffusion_model." if recipe == "Q4_0" else ""
            dense = write_model(path, "qwen_image", diffusers_dit.state_dict(), RECIPES[recipe],
                                names=lambda n: prefix + n)
            made[recipe] = (path, dense)
        return made[recipe]

    return make


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_mmdit_gguf_matches_diffusers(recipe, diffusers_dit, dit_gguf):
    sd = diffusers_dit.state_dict()
    path, dense = dit_gguf(recipe)
    contents = read_gguf(path, expect="mmdit")
    assert isinstance(contents, GGUFContents) and contents.arch == "qwen_image"
    assert list(contents.tensors) == list(sd)
    for name, t in contents.tensors.items():
        want = RECIPES[recipe](name, tuple(sd[name].shape))
        if want in (T.F32, T.BF16):
            assert isinstance(t, torch.Tensor) and t.dtype == {T.F32: torch.float32, T.BF16: torch.bfloat16}[want]
            assert torch.equal(t.float(), dense[name]), name
        else:
            assert isinstance(t, QuantizedTensor) and t.qtype == int(want) and t.shape == tuple(sd[name].shape)

    reference = copy.deepcopy(diffusers_dit)
    reference.load_state_dict(dense)
    ours = use_our_linear(copy.deepcopy(diffusers_dit))
    assign(ours, contents.tensors)
    assert rel_err(dit_forward(ours), dit_forward(reference)) < 1e-5


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_mmdit_gguf_through_load_mmdit(recipe, diffusers_dit, dit_gguf):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

    from qwenimage_pack.core.loading.load import load_mmdit

    path, dense = dit_gguf(recipe)
    model = load_mmdit(path, compute_dtype=torch.float32)
    assert model.transformer_blocks[1].img_mlp.net[2].is_quantized and not model.proj_out.is_quantized
    reference = copy.deepcopy(diffusers_dit)
    reference.load_state_dict(dense)

    g = torch.Generator().manual_seed(2)
    x, ctx, sigma = torch.randn(1, 16, 8, 10, generator=g), torch.randn(1, 7, 48, generator=g), torch.tensor([0.6])
    with torch.no_grad():
        got = model(x, sigma, ctx).float()
        packed = QwenImagePipeline._pack_latents(x, 1, 16, 8, 10)
        want = reference(hidden_states=packed, encoder_hidden_states=ctx, timestep=sigma,
                         img_shapes=[[(1, 4, 5)]], return_dict=False)[0]
    want = QwenImagePipeline._unpack_latents(want, 64, 80, 8)[:, :, 0]
    assert rel_err(got, want) < 1e-5


def test_tensors_are_views_of_the_file(dit_gguf):
    path, _ = dit_gguf("Q8_0")
    header = read_header(path)
    base = np.frombuffer(header.buffer, dtype=np.uint8).ctypes.data
    tensors = read_tensors(header)
    by_name = {i.name: i for i in header.tensors}
    for name in ("transformer_blocks.0.attn.to_q.weight", "img_in.weight", "txt_norm.weight"):
        t = tensors[name]
        ptr = (t.blocks if isinstance(t, QuantizedTensor) else t).data_ptr()
        assert ptr == base + by_name[name].offset, name


def test_orig_shape_override(tmp_path):
    rng = np.random.default_rng(0)
    a = encode(rng.standard_normal((2, 64)).astype(np.float32), T.Q8_0, rng)
    b = encode(rng.standard_normal((4, 32)).astype(np.float32), T.Q8_0, rng)
    c = encode(rng.standard_normal((6, 4)).astype(np.float32), T.F16, rng)
    path = write_gguf(
        tmp_path / "shapes.gguf", "qwen_image",
        {"a.weight": a[:2], "b.weight": b[:2], "c.weight": c[:2]},
        {"comfy.gguf.orig_shape.a.weight": [2, 2, 32], "comfy.gguf.orig_shape.b.weight": [8, 16],
         "comfy.gguf.orig_shape.c.weight": [2, 3, 4]},
    )
    t = read_gguf(path, expect="mmdit").tensors
    assert isinstance(t["a.weight"], QuantizedTensor) and t["a.weight"].shape == (2, 2, 32)
    # 16-value rows cannot hold 32-value blocks: decoded once instead.
    assert isinstance(t["b.weight"], torch.Tensor) and torch.equal(t["b.weight"], torch.from_numpy(b[2].reshape(8, 16)))
    assert torch.equal(t["c.weight"].float(), torch.from_numpy(c[2].reshape(2, 3, 4)))


# ---------------------------------------------------------------------------------------
# Text encoder (llama.cpp qwen2vl)


def text_types(name: str, shape) -> T:
    if len(shape) == 1:
        return T.F32
    if name == "lm_head.weight":
        return T.F16
    for part, t in (("embed_tokens", T.Q4_K), ("q_proj", T.Q4_K), ("k_proj", T.Q5_K), ("v_proj", T.Q6_K),
                    ("o_proj", T.Q8_0), ("gate_proj", T.Q4_0), ("up_proj", T.Q5_1), ("down_proj", T.Q6_K)):
        if part in name:
            return t
    raise AssertionError(name)


QWEN2VL_METADATA = {
    "qwen2vl.block_count": 2, "qwen2vl.context_length": 4096, "qwen2vl.embedding_length": 256,
    "qwen2vl.feed_forward_length": 512, "qwen2vl.attention.head_count": 2,
    "qwen2vl.attention.head_count_kv": 1, "qwen2vl.rope.freq_base": 1e6,
    "qwen2vl.attention.layer_norm_rms_epsilon": 1e-6, "qwen2vl.rope.dimension_sections": [16, 24, 24, 0],
}


@pytest.fixture(scope="module")
def text_gguf(tmp_path_factory):
    """A tiny Qwen2.5-VL language model as llama.cpp writes it, and the transformers model
    holding the weights that file decodes to."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2_5_VLTextConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    cfg._attn_implementation = "eager"
    ref = randomize(transformers.Qwen2_5_VLTextModel(cfg), 3)
    sd = {"model." + k: v for k, v in ref.state_dict().items()}
    sd["lm_head.weight"] = torch.randn(512, 256)  # in every real file; never used
    names = get_tensor_name_map(MODEL_ARCH.QWEN2VL, 2)
    path = tmp_path_factory.mktemp("te") / "Qwen2.5-VL-tiny-mixed.gguf"
    dense = write_model(path, "qwen2vl", sd, text_types, metadata=QWEN2VL_METADATA,
                        names=lambda n: names.get_name(n, try_suffixes=(".weight", ".bias")))
    ref.load_state_dict({k[len("model."):]: v for k, v in dense.items() if k.startswith("model.")})
    return path, ref, {k for k in sd if k.startswith("model.")}


def text_forward(model, ids=None):
    ids = torch.randint(0, 512, (1, 11), generator=torch.Generator().manual_seed(0)) if ids is None else ids
    with torch.no_grad():
        out = model(input_ids=ids)
    return getattr(out, "last_hidden_state", out)


def test_text_gguf_matches_transformers(text_gguf):
    from qwenimage_pack.core.encoders.text_encoder import QwenTextEncoder, TextEncoderConfig

    path, ref, hf_names = text_gguf
    contents = read_gguf(path, expect="text")
    assert contents.arch == "qwen2vl"
    assert set(contents.tensors) == {k[len("model."):] for k in hf_names}
    config = text_config_from_metadata(contents.metadata, contents.tensors, path)
    assert config == dict(hidden_size=256, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=128,
                          intermediate_size=512, rope_theta=1e6, rms_eps=pytest.approx(1e-6),
                          mrope_section=(16, 24, 24), vocab_size=512)

    ours = QwenTextEncoder(TextEncoderConfig(**config))
    assign(ours, contents.tensors)
    ours.compute_dtype = torch.float32
    assert rel_err(text_forward(ours), text_forward(ref)) < 1e-5


def test_text_gguf_through_load_text_encoder(text_gguf, mmproj_gguf):
    from qwenimage_pack.core.loading.load import load_text_encoder

    path, ref, _ = text_gguf
    model, vision = load_text_encoder(path, compute_dtype=torch.float32)
    assert model.embed_tokens.is_quantized and model.layers[0].mlp.down_proj.is_quantized
    assert vision is None
    assert rel_err(text_forward(model), text_forward(ref)) < 1e-5

    mm_path, hf_vision = mmproj_gguf(T.F16)
    _, vision = load_text_encoder(path, compute_dtype=torch.float32, mmproj=mm_path)
    assert set(vision) == {k[len("visual."):] for k in hf_vision}


# ---------------------------------------------------------------------------------------
# mmproj (vision tower): best-effort layout of llama.cpp's Qwen2.5-VL converter


def to_mmproj_names(sd: dict) -> dict:
    """HF ``visual.*`` tensors -> llama.cpp mmproj tensors, as convert_hf_to_gguf splits them."""
    names = get_tensor_name_map(MODEL_ARCH.MMPROJ, 3)  # 3: the merger's "mm.2" is block id 2

    def rename(k: str) -> str:
        new = names.get_name(k, try_suffixes=(".weight", ".bias"))
        assert new is not None, k
        return new

    out = {}
    for k, v in sd.items():
        if ".attn.qkv." in k:
            for part, chunk in zip("qkv", v.chunk(3, dim=0)):
                out[rename(k.replace(".qkv.", f".{part}."))] = chunk
        elif k == "visual.patch_embed.proj.weight":
            out["v.patch_embd.weight"] = v[:, :, 0]
            out["v.patch_embd.weight.1"] = v[:, :, 1]
        else:
            out[rename(k)] = v
    return out


MMPROJ_METADATA = {
    "clip.projector_type": "qwen2.5vl_merger", "clip.has_vision_encoder": True,
    "clip.vision.block_count": 2, "clip.vision.embedding_length": 64, "clip.vision.feed_forward_length": 96,
    "clip.vision.attention.head_count": 2, "clip.vision.projection_dim": 128, "clip.vision.patch_size": 14,
    "clip.vision.spatial_merge_size": 2, "clip.vision.n_wa_pattern": 2, "clip.vision.window_size": 112,
    "clip.vision.attention.layer_norm_epsilon": 1e-6,
}


@pytest.fixture(scope="module")
def mmproj_gguf(tmp_path_factory):
    """``make(matrix_type) -> (path, HF visual.* state dict, dense values by GGUF name)``."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vcfg = transformers.Qwen2_5_VLVisionConfig(depth=2, hidden_size=64, intermediate_size=96, num_heads=2,
                                                out_hidden_size=128, fullatt_block_indexes=[1], window_size=112)
    vision = randomize(Qwen2_5_VisionTransformerPretrainedModel(vcfg), 4)
    hf = {"visual." + k: v for k, v in vision.state_dict().items()}
    gg = to_mmproj_names(hf)
    assert "v.blk.1.attn_v.bias" in gg and "mm.2.weight" in gg and "v.post_ln.weight" in gg
    made = {}

    def make(matrices: T, with_dense: bool = False):
        if matrices not in made:
            def types(name, shape):
                if len(shape) == 1:
                    return T.F32
                return T.F16 if name.startswith("v.patch_embd") else matrices

            path = tmp_path_factory.mktemp("mmproj") / f"mmproj-{matrices.name}.gguf"
            made[matrices] = (path, hf, write_model(path, "clip", gg, types, metadata=MMPROJ_METADATA))
        return made[matrices] if with_dense else made[matrices][:2]

    return make


@pytest.mark.parametrize("matrices", [T.F16, T.Q8_0], ids=lambda t: t.name)
def test_mmproj_gguf_gives_hf_vision_names(matrices, mmproj_gguf):
    path, hf, dense = mmproj_gguf(matrices, with_dense=True)
    contents = read_gguf(path, expect="mmproj")
    assert set(contents.tensors) == set(hf)
    for name, want in hf.items():
        t = contents.tensors[name]
        if isinstance(t, QuantizedTensor):
            assert name.endswith("weight") and t.shape == tuple(want.shape)
            rows = t.shape[0]
            t = torch.from_numpy(quants.dequantize(t.blocks.numpy(), T(t.qtype))).reshape(rows, -1)
        assert t.shape == want.shape, name
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            block = name.split(".")[2]
            stem = f"v.blk.{block}.attn_"
            suffix = name.rsplit(".", 1)[1]
            expected = torch.cat([dense[f"{stem}{p}.{suffix}"] for p in "qkv"])
        elif name == "visual.patch_embed.proj.weight":
            expected = torch.stack((dense["v.patch_embd.weight"], dense["v.patch_embd.weight.1"]), dim=2)
        else:
            expected = dense[to_mmproj_names({name: want}).popitem()[0]]
        assert torch.equal(t.float(), expected), name
    cfg = vision_config_from_metadata(contents.metadata, path)
    assert cfg["depth"] == 2 and cfg["hidden_size"] == 64 and cfg["out_hidden_size"] == 128
    assert cfg["fullatt_block_indexes"] == [1] and cfg["window_size"] == 112


# ---------------------------------------------------------------------------------------
# Tokenizer in the metadata


def llama_cpp_token_arrays(tokenizer_dir, n_added: int | None = None, vocab_size: int = 152064):
    """Token list / types / merges laid out as llama.cpp's converter writes them."""
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    added = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))["added_tokens_decoder"]
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    types = [1] * len(tokens)
    for i, info in sorted(added.items(), key=lambda kv: int(kv[0]))[:n_added]:
        assert int(i) == len(tokens)
        tokens.append(info["content"])
        types.append(3 if info["content"].startswith("<|") else 4)
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(5)
    lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [m for m in lines if m and not m.startswith("#version")]
    return tokens, types, merges


SAMPLES = [
    "<|im_start|>system\nDescribe the image by detailing the color:<|im_end|>\n<|im_start|>user\n"
    "A cat's hat, 3 dogs & 1024x1024 pixels!<|im_end|>\n<|im_start|>assistant\n",
    "一只戴着红帽子的猫，在雪地里。 Ünïcödé ﬁ café\u0301 🎉🐱 \t\ttabs\r\n\nnewlines   spaces",
    "<|vision_start|><|image_pad|><|vision_end|>I'll we've <tool_call>x</tool_call> [PAD151700] 12345",
]


def test_tokenizer_from_gguf_metadata(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from qwenimage_pack.core.encoders.tokenizer import QwenTokenizer
    from qwenimage_pack.core.loading.gguf_tokenizer import GGUFTokenizer, build_tokenizer, tokenizer_from_gguf

    tokens, types, merges = llama_cpp_token_arrays(tokenizer_dir)
    path = write_gguf(tmp_path / "tok.gguf", "qwen2vl", {"output_norm.weight": (np.ones(32, np.float32), None)}, {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
    })
    start = time.perf_counter()
    contents = read_gguf(path, expect="text")
    opened = time.perf_counter() - start
    assert isinstance(contents.metadata["tokenizer.ggml.tokens"], LazyStringArray)
    assert opened < 2.0, f"opening took {opened:.2f} s: the token arrays were parsed eagerly"
    assert text_config_from_metadata({**contents.metadata, "qwen2vl.embedding_length": 8, "qwen2vl.block_count": 1,
                                      "qwen2vl.attention.head_count": 1, "qwen2vl.feed_forward_length": 8}
                                     )["vocab_size"] == 152064

    ours = GGUFTokenizer(contents.metadata, str(path))
    from_path = tokenizer_from_gguf(path)
    reference = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    from_files = QwenTokenizer.from_dir(tokenizer_dir)
    for text in SAMPLES:
        want = reference(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == want == from_files.encode(text) == from_path.encode(text)
    assert ours.token_to_id("<|image_pad|>") == 151655 and len(ours) == 152064

    # A llama.cpp file of Qwen2.5-VL-7B-Instruct itself: 22 added tokens, then [PAD] fillers.
    tokens, types, merges = llama_cpp_token_arrays(tokenizer_dir, n_added=22)
    assert tokens[151665] == "[PAD151665]"
    md = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    instruct = build_tokenizer(md, "instruct.gguf")
    for text in SAMPLES:
        assert instruct.encode(text) == reference(text, add_special_tokens=False)["input_ids"]


def test_tokenizer_errors(tmp_path):
    from qwenimage_pack.core.loading.gguf_tokenizer import tokenizer_from_gguf

    path = write_gguf(tmp_path / "none.gguf", "qwen2vl", {"output_norm.weight": (np.ones(32, np.float32), None)})
    with pytest.raises(WeightFileError, match="none.gguf: carries no tokenizer"):
        tokenizer_from_gguf(path)
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(WeightFileError, match="'llama' tokenizer"):
        tokenizer_from_gguf(md)


# ---------------------------------------------------------------------------------------
# Files that are not what the loader expects


def small_tensors(rng=None):
    rng = rng or np.random.default_rng(0)
    data, raw, _ = encode(rng.standard_normal((4, 64)).astype(np.float32), T.Q8_0, rng)
    return {"transformer_blocks.0.attn.to_q.weight": (data, raw), "txt_norm.weight": (np.ones(8, np.float32), None)}


@pytest.mark.parametrize("arch, expect, says", [
    ("flux", "mmdit", r"Flux diffusion model \(general.architecture 'flux'\).*Expected a Qwen-Image MMDiT"),
    ("llama", "text", r"Llama language model.*Expected a Qwen2.5-VL-7B language model GGUF"),
    ("qwen_image", "text", r"Qwen-Image MMDiT.*Expected a Qwen2.5-VL-7B"),
    ("clip", "mmdit", r"vision tower / projector \(mmproj\).*Expected a Qwen-Image MMDiT"),
    ("qwen2vl", "mmproj", r"Qwen2.5-VL language model.*Expected a Qwen2.5-VL vision projector"),
    ("sdxl", "mmdit", r"SDXL UNet"),
])
def test_wrong_architecture(arch, expect, says, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", arch, small_tensors())
    with pytest.raises(WeightFileError, match=says) as e:
        read_gguf(path, expect=expect)
    assert str(path) in str(e.value)


def test_architecture_missing_or_other_projector(tmp_path):
    path = write_gguf(tmp_path / "noarch.gguf", None, small_tensors())
    assert read_gguf(path, expect="mmdit").arch == "qwen_image"  # recognised by its tensors
    with pytest.raises(WeightFileError, match="no general.architecture"):
        read_gguf(path, expect="text")
    path = write_gguf(tmp_path / "gemma.gguf", "clip", small_tensors(), {"clip.projector_type": "gemma3"})
    with pytest.raises(WeightFileError, match="projector of type 'gemma3'"):
        read_gguf(path, expect="mmproj")


def test_unsupported_tensor_type(tmp_path):
    tensors = small_tensors()
    tensors["transformer_blocks.0.attn.to_k.weight"] = (np.zeros((4, 66), np.uint8), T.IQ2_XXS)
    path = write_gguf(tmp_path / "iq2.gguf", "qwen_image", tensors)
    with pytest.raises(WeightFileError, match=r"'transformer_blocks.0.attn.to_k.weight' is stored as IQ2_XXS.*"
                                              r"supported types: F32, F16, Q4_0.*Q4_K.*BF16"):
        read_gguf(path, expect="mmdit")


def test_truncated_files(tmp_path):
    path = write_gguf(tmp_path / "full.gguf", "qwen_image", small_tensors())
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-40])
    with pytest.raises(WeightFileError, match=r"is truncated: tensor 'txt_norm.weight' needs bytes"):
        read_gguf(cut, expect="mmdit")
    cut.write_bytes(data[:60])
    with pytest.raises(WeightFileError, match="is truncated: the header runs past the end"):
        read_gguf(cut, expect="mmdit")


def test_not_gguf_files(tmp_path):
    from safetensors.torch import save_file

    st = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(2)}, str(st))
    with pytest.raises(WeightFileError, match="safetensors file, not a GGUF"):
        read_gguf(st, expect="mmdit")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00\x01junk" * 10)
    with pytest.raises(WeightFileError, match="is not a GGUF file"):
        read_gguf(junk, expect="mmdit")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(WeightFileError, match="is empty"):
        read_gguf(empty, expect="mmdit")
    with pytest.raises(WeightFileError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf", expect="mmdit")
    with pytest.raises(ValueError, match="expect must be one of"):
        read_gguf(junk, expect="vae")


def test_big_endian_file_is_refused(tmp_path):
    path = write_gguf(tmp_path / "be.gguf", "qwen_image", small_tensors(), big_endian=True)
    with pytest.raises(WeightFileError, match="big-endian"):
        read_gguf(path, expect="mmdit")
