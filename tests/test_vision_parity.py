"""The Qwen2.5-VL vision tower, its image preprocessing and the text+image prompt embedding
against transformers (Qwen2_5_VisionTransformerPretrainedModel, Qwen2VLImageProcessorPil,
Qwen2_5_VLForConditionalGeneration with mm_token_type_ids for the 3-D positions)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import references as refs
from qwenimage_pack.core.pipeline import edit as E
from qwenimage_pack.core.encoders import vision as V
from qwenimage_pack.core.encoders.tokenizer import IMAGE_PAD_ID, QwenTokenizer, build_prompt

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def hf_tower():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vcfg = transformers.Qwen2_5_VLVisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                                                out_hidden_size=48, fullatt_block_indexes=[1], window_size=112)
    vcfg._attn_implementation = "eager"
    model = Qwen2_5_VisionTransformerPretrainedModel(vcfg).eval()
    refs._randomize(model, 3)
    return model


# (h, w) in pixels: one window, several full and partial windows, a single merged token
@pytest.mark.parametrize("h,w", [(84, 140), (280, 252), (28, 28), (392, 112)])
def test_vision_tower_matches_transformers(hf_tower, h, w):
    cfg = V.VisionConfig.from_hf_config(hf_tower.config)
    tower = V.build_vision_tower(hf_tower.state_dict(), cfg)
    pixels = torch.rand(3, h, w, generator=torch.Generator().manual_seed(h * w))
    patches, gh, gw = V.image_to_patches(V.normalize_pixels(pixels), cfg)
    with torch.no_grad():
        ref = hf_tower(patches, grid_thw=torch.tensor([[1, gh, gw]])).pooler_output
        ours = tower(patches, gh, gw)
    assert ours.shape == ref.shape == (gh * gw // 4, 48)
    assert (ours - ref).abs().max().item() < 1e-5


def test_window_groups_cover_every_patch_once():
    cfg = V.VisionConfig(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=8)
    groups = V.window_groups(74, 74, cfg)  # 1036x1036: 37x37 merged tokens, 10x10 windows
    flat = torch.cat([g.reshape(-1) for g in groups])
    assert sorted(flat.tolist()) == list(range(74 * 74))
    assert max(g.shape[1] for g in groups) == 64  # 4x4 merged tokens of 4 patches


def hf_image_processor():
    """The processor as Qwen-Image-Edit's processor/preprocessor_config.json sets it up."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=E.MIN_PIXELS, max_pixels=E.MAX_PIXELS)


def hf_processor(tokenizer_dir):
    """transformers' Qwen2VLProcessor (tokenizer + PIL image processor). Its constructor insists
    on a video processor class that needs torchvision; images never touch it."""
    class ImagesOnly(transformers.Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return arg

    return ImagesOnly(image_processor=hf_image_processor(),
                      tokenizer=transformers.AutoTokenizer.from_pretrained(tokenizer_dir))


def _pil(h, w, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    # smooth plus noise, so resampling differences would show
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x / w) * 255, (y / h) * 255, ((x + y) % 64) * 4], axis=-1)
    arr = np.clip(base + rng.integers(-20, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _as_image(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0)


@pytest.mark.parametrize("w,h,kind", [(100, 70, "edit"), (333, 517, "edit_plus"), (64, 64, "edit_plus")])
def test_preprocessing_matches_image_processor(w, h, kind):
    cfg = V.VisionConfig(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=8)
    pil = _pil(h, w, 1)
    plan = E.plan_image(w, h, kind, "reference")
    # the reference pipelines resize with PIL Lanczos first, then the processor does its own resize
    copy = pil.resize(plan.vision, resample=1)
    ref = hf_image_processor()(images=[copy], return_tensors="pt")
    patches, gh, gw = E.vision_input(_as_image(pil), plan, cfg)
    assert [1, gh, gw] == ref["image_grid_thw"][0].tolist()
    assert (patches - ref["pixel_values"]).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from qwenimage_pack.core.loading.load import load_text_encoder

    model = refs.tiny_text_encoder()
    path = tmp_path_factory.mktemp("te") / "qwen_2.5_vl_tiny.safetensors"
    save_file(refs.original_text_layout(model.state_dict()), path)
    ours, vision_state = load_text_encoder(path, compute_dtype=torch.float32)
    return model, ours, vision_state


def test_loader_vision_state_builds_a_tower(lm):
    ref, _, vision_state = lm
    assert vision_state and all(not k.startswith("visual.") for k in vision_state)
    tower = V.build_vision_tower(vision_state, V.VisionConfig.from_hf_config(ref.config.vision_config))
    assert tower.config.depth == 1
    broken = dict(vision_state)
    broken.pop("merger.mlp.2.weight")
    with pytest.raises(ValueError, match="merger.mlp.2.weight"):
        V.build_vision_tower(broken, V.VisionConfig.from_hf_config(ref.config.vision_config))


@pytest.mark.parametrize("kind,sizes", [("edit", [(90, 60)]), ("edit_plus", [(90, 60), (50, 110), (64, 64)])])
def test_text_and_image_hidden_states_match_transformers(lm, tokenizer_dir, kind, sizes, monkeypatch):
    # a few hundred image tokens instead of ~1400 per image: the same code at a tenth of the cost
    monkeypatch.setattr(E, "VAE_AREA", 224 * 224)
    monkeypatch.setattr(E, "PLUS_VISION_AREA", 112 * 112)
    ref, ours, vision_state = lm
    vcfg = V.VisionConfig.from_hf_config(ref.config.vision_config)
    tower = V.build_vision_tower(vision_state, vcfg)
    tokenizer = QwenTokenizer.from_dir(tokenizer_dir)
    prompt = "Make the sky purple and add a small red boat"
    pils = [_pil(h, w, i) for i, (w, h) in enumerate(sizes)]
    plans = [E.plan_image(w, h, kind, "reference") for w, h in sizes]
    inputs = [E.vision_input(_as_image(p), plan, vcfg) for p, plan in zip(pils, plans)]
    got = E.encode_edit_prompt(ours, tower, tokenizer, prompt, inputs, kind)

    # transformers: the processor expands the image tokens; mm_token_type_ids turns on 3-D positions
    text, drop = build_prompt(kind, prompt, len(pils))
    proc = hf_processor(tokenizer_dir)
    model_inputs = proc(text=[text], images=[p.resize(plan.vision, resample=1) for p, plan in zip(pils, plans)],
                        return_tensors="pt")
    ids = model_inputs["input_ids"]
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=model_inputs["attention_mask"],
                  pixel_values=model_inputs["pixel_values"], image_grid_thw=model_inputs["image_grid_thw"],
                  mm_token_type_ids=(ids == IMAGE_PAD_ID).int(), output_hidden_states=True)
    want = out.hidden_states[-1][:, drop:]
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-5
    # and the positions are the 3-D ones transformers builds
    pos, _ = ref.model.get_rope_index(ids, (ids == IMAGE_PAD_ID).int(), model_inputs["image_grid_thw"])
    mine = E.mrope_positions(ids[0].tolist(), [(g[1] // 2, g[2] // 2) for g in model_inputs["image_grid_thw"].tolist()])
    assert torch.equal(mine, pos)


def test_mmproj_gguf_tower_through_the_node_matches_transformers(lm, tmp_path):
    """A llama.cpp mmproj GGUF given to the text-encoder loader: the edit node builds the tower
    from its tensors alone (config inferred from shapes) and it matches transformers."""
    from gguf import GGMLQuantizationType as T
    from test_gguf_load import MMPROJ_METADATA, to_mmproj_names, write_model
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from qwenimage_pack.core.loading.load import load_text_encoder
    from qwenimage_pack.nodes.edit import vision_tower_for
    from qwenimage_pack.nodes.handles import TextEncoder

    vcfg = transformers.Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                out_hidden_size=48, fullatt_block_indexes=[1], window_size=112)
    vcfg._attn_implementation = "eager"
    ref = Qwen2_5_VisionTransformerPretrainedModel(vcfg).eval()
    refs._randomize(ref, 5)
    with torch.no_grad():  # F16 in the file: give the reference the same rounded weights
        for p in ref.parameters():
            p.copy_(p.half().float())
    gg = to_mmproj_names({"visual." + k: v for k, v in ref.state_dict().items()})
    meta = dict(MMPROJ_METADATA, **{"clip.vision.block_count": 2, "clip.vision.embedding_length": 32,
                                    "clip.vision.feed_forward_length": 64, "clip.vision.projection_dim": 48})
    mm = tmp_path / "mmproj-tiny-f16.gguf"
    write_model(mm, "clip", gg, lambda name, shape: T.F32 if len(shape) == 1 else T.F16, metadata=meta)

    te_path = tmp_path / "te.safetensors"
    save_file(refs.original_text_layout(lm[0].state_dict()), te_path)
    module, vision_state = load_text_encoder(te_path, compute_dtype=torch.float32, mmproj=mm)
    tower = vision_tower_for(TextEncoder(module=module, tokenizer=None, name="tiny.gguf", vision=vision_state))
    assert tower.config.num_heads == 2 and tower.config.fullatt_block_indexes == (1,)
    assert vision_tower_for(TextEncoder(module=module, tokenizer=None, name="tiny.gguf", vision=vision_state)) is tower

    pixels = torch.rand(3, 280, 196, generator=torch.Generator().manual_seed(0))
    patches, gh, gw = V.image_to_patches(V.normalize_pixels(pixels), tower.config)
    with torch.no_grad():
        want = ref(patches, grid_thw=torch.tensor([[1, gh, gw]])).pooler_output
        got = tower(patches, gh, gw)
    assert rel_err(got, want) < 1e-5
