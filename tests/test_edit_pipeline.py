"""The edit node graph against diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline.

Same tiny weights (written in the users' file layouts and loaded by our loader nodes), same
PIL images, prompt and seed; our side runs QwenImageEditEncode (sizing "reference") ->
QwenImageSampler -> QwenImageVAEDecode.

Two adjustments keep the reference honest and the test fast:
- diffusers 0.42 calls the text encoder without ``mm_token_type_ids``; transformers 5 then gives
  the image tokens plain 1-D positions instead of the 3-D ones the model was trained with
  (transformers 4.x behaviour). The reference's text encoder gets them added back.
- the target areas (1024^2 for VAE copies, 384^2 for Edit-Plus vision copies) are scaled down
  on both sides alike, so the tiny models run at a few thousand pixels; the area formulas
  themselves are compared at full size in test_edit_geometry.py.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

import references as refs
from qwenimage_pack.core.pipeline import edit as E
from qwenimage_pack.core.encoders.tokenizer import IMAGE_PAD_ID
from test_vision_parity import hf_processor

torch.set_num_threads(2)

PROMPT = "Replace the cat with a corgi and make the sky pink"
SMALL_VAE_AREA = 96 * 96
SMALL_VISION_AREA = 56 * 56


@pytest.fixture(autouse=True)
def small_areas(monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as dp_edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as dp_plus

    for module in (dp_edit, dp_plus):  # the output size is computed from a literal 1024 * 1024
        orig = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio, orig=orig: orig(
            SMALL_VAE_AREA if area == 1024 * 1024 else area, ratio))
    monkeypatch.setattr(dp_plus, "VAE_IMAGE_SIZE", SMALL_VAE_AREA)
    monkeypatch.setattr(dp_plus, "CONDITION_IMAGE_SIZE", SMALL_VISION_AREA)
    monkeypatch.setattr(E, "VAE_AREA", SMALL_VAE_AREA)
    monkeypatch.setattr(E, "PLUS_VISION_AREA", SMALL_VISION_AREA)


def _with_3d_positions(text_encoder):
    forward = text_encoder.forward

    def patched(*args, input_ids=None, **kw):
        if input_ids is not None and kw.get("pixel_values") is not None and kw.get("mm_token_type_ids") is None:
            kw["mm_token_type_ids"] = (input_ids == IMAGE_PAD_ID).int()
        return forward(*args, input_ids=input_ids, **kw)

    text_encoder.forward = patched
    return text_encoder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("models")
    transformer = refs.tiny_transformer()
    transformer_2511 = refs.tiny_transformer(zero_cond_t=True)
    vae = refs.tiny_vae()
    text_encoder = refs.tiny_text_encoder()
    refs.write_model_files(root, tokenizer_dir, transformer, vae, text_encoder, dit_file="qwen_image_edit_tiny.safetensors")
    parts = dict(vae=vae, text_encoder=_with_3d_positions(text_encoder), processor=hf_processor(tokenizer_dir),
                 tokenizer=hf_processor(tokenizer_dir).tokenizer)
    return root, parts, transformer, transformer_2511


@pytest.fixture(scope="module")
def nodes(setup):
    from qwenimage_pack.nodes import loaders

    root = setup[0]
    with refs.models_dir(root):
        te = loaders.QwenImageTextEncoderLoader().load("qwen_2.5_vl_tiny.safetensors")[0]
        vae = loaders.QwenImageVAELoader().load("qwen_image_vae_tiny.safetensors")[0]
        models = {v: loaders.QwenImageDiTLoader().load("qwen_image_edit_tiny.safetensors", "default", v)[0]
                  for v in ("edit", "edit-2511")}
    return te, vae, models


def _pil(w, h, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x / w) * 200 + 20, (y / h) * 200 + 20, ((x // 8 + y // 8) % 2) * 120 + 60], axis=-1)
    return Image.fromarray(np.clip(base + rng.integers(-15, 15, size=(h, w, 3)), 0, 255).astype(np.uint8), "RGB")


def _image(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0)[None]


def run_nodes(nodes, variant, pils, seed, steps, cfg, model_variant="edit"):
    from qwenimage_pack.nodes import edit, latents, sampling

    te, vae, models = nodes
    images = [_image(p) for p in pils] + [None] * (3 - len(pils))
    node = edit.QwenImageEditEncode()
    pos, latent = node.encode(te, vae, PROMPT, *images, variant=variant, sizing="reference")
    neg, _ = node.encode(te, vae, " ", *images, variant=variant, sizing="reference")
    out = sampling.QwenImageSampler().run(models[model_variant], pos, latent, seed, steps, cfg, "dynamic", 3.0,
                                          "euler", 1.0, neg)[0]
    return latents.QwenImageVAEDecode().decode(vae, out)[0]


def run_reference(setup, kind, pils, seed, steps, cfg, zero_cond_t=False):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline

    _, parts, transformer, transformer_2511 = setup
    cls = QwenImageEditPipeline if kind == "edit" else QwenImageEditPlusPipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(**refs.QWEN_SCHEDULER),
               transformer=transformer_2511 if zero_cond_t else transformer, **parts)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(image=pils[0] if kind == "edit" else pils, prompt=PROMPT, negative_prompt=" ",
                      true_cfg_scale=cfg, num_inference_steps=steps,
                      generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images
    return images.permute(0, 2, 3, 1)


@pytest.mark.parametrize("variant,sizes,seed,steps,cfg,model_variant", [
    ("edit", [(120, 80)], 42, 3, 4.0, "edit"),
    ("edit-plus", [(120, 80), (70, 110), (90, 90)], 7, 2, 2.5, "edit"),
    ("edit-plus", [(100, 75)], 3, 2, 4.0, "edit-2511"),
], ids=["edit", "edit-2509-three-images", "edit-2511"])
def test_edit_graph_matches_pipeline(setup, nodes, variant, sizes, seed, steps, cfg, model_variant):
    pils = [_pil(w, h, i) for i, (w, h) in enumerate(sizes)]
    ours = run_nodes(nodes, variant, pils, seed, steps, cfg, model_variant)
    ref = run_reference(setup, "edit" if variant == "edit" else "edit_plus", pils, seed, steps, cfg,
                        zero_cond_t=model_variant == "edit-2511")
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    print(f"max abs error {err:.2e}")
    assert err <= 1e-3


def test_preserve_sizing_returns_the_input_size(nodes):
    """Default sizing: the output latent is the reference latent's grid, and after decoding,
    Match Size gives back exactly the input's size (odd sides included)."""
    from qwenimage_pack.nodes import edit, latents, sampling

    te, vae, models = nodes
    for w, h in [(123, 77), (61, 97)]:
        image = _image(_pil(w, h, 3))
        cond, latent = edit.QwenImageEditEncode().encode(te, vae, PROMPT, image)
        ref = cond[0][1]["reference_latents"][0]
        assert latent["samples"].shape[-2:] == ref.shape[-2:]
        out = sampling.QwenImageSampler().run(models["edit"], cond, latent, 1, 1, 1.0, "dynamic", 3.0, "euler", 1.0)[0]
        decoded = latents.QwenImageVAEDecode().decode(vae, out)[0]
        assert decoded.shape[1:3] == (ref.shape[-2] * 8, ref.shape[-1] * 8)
        final = edit.QwenImageMatchSize().match(decoded, image)[0]
        assert final.shape == (1, h, w, 3)
