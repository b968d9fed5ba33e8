"""img2img and inpainting through our nodes (VAE Encode -> [Inpaint Mask] -> Sampler with
denoise < 1 -> VAE Decode) against diffusers' QwenImageImg2ImgPipeline / QwenImageInpaintPipeline.

diffusers encodes the input image by sampling the VAE posterior with the pipeline's generator,
which also shifts the noise stream; ComfyUI and our VAE Encode use the posterior mean. The
reference is run with the mean (``retrieve_latents(..., sample_mode="argmax")``), which leaves
its generator to draw exactly the initial noise. The mask is aligned to 16-pixel blocks, where
diffusers' binarized nearest-neighbour mask and the sampler's bilinear one agree.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

import references as refs

torch.set_num_threads(2)
PROMPT = "A red lighthouse on a cliff at sunset, oil painting"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    import transformers

    root = tmp_path_factory.mktemp("models")
    transformer, vae, text_encoder = refs.tiny_transformer(), refs.tiny_vae(), refs.tiny_text_encoder()
    refs.write_model_files(root, tokenizer_dir, transformer, vae, text_encoder, dit_prefix="")
    parts = dict(vae=vae, text_encoder=text_encoder, transformer=transformer,
                 tokenizer=transformers.AutoTokenizer.from_pretrained(tokenizer_dir))

    from qwenimage_pack.nodes import conditioning, loaders

    with refs.models_dir(root):
        model = loaders.QwenImageDiTLoader().load("qwen_image_tiny.safetensors", "default")[0]
        te = loaders.QwenImageTextEncoderLoader().load("qwen_2.5_vl_tiny.safetensors")[0]
        our_vae = loaders.QwenImageVAELoader().load("qwen_image_vae_tiny.safetensors")[0]
    encode = conditioning.QwenImageTextEncode().encode
    graph = dict(model=model, vae=our_vae, pos=encode(te, PROMPT)[0], neg=encode(te, " ")[0])
    return parts, graph


@pytest.fixture(autouse=True)
def posterior_mean(monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img as d_i2i
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_inpaint as d_inp

    for module in (d_i2i, d_inp):
        orig = module.retrieve_latents
        monkeypatch.setattr(module, "retrieve_latents",
                            lambda out, generator=None, sample_mode="sample", orig=orig: orig(out, None, "argmax"))


def _pil(w, h, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x / w) * 220, (y / h) * 220, ((x // 6 + y // 6) % 2) * 150 + 40], axis=-1)
    return Image.fromarray(np.clip(base + rng.integers(-10, 10, size=(h, w, 3)), 0, 255).astype(np.uint8), "RGB")


def _ours(graph, pil, seed, steps, cfg, strength, mask=None):
    from qwenimage_pack.nodes import edit, latents, sampling

    image = torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0)[None]
    latent = latents.QwenImageVAEEncode().encode(graph["vae"], image)[0]
    if mask is not None:
        latent = edit.QwenImageInpaintMask().apply(latent, mask)[0]
    out = sampling.QwenImageSampler().run(graph["model"], graph["pos"], latent, seed, steps, cfg, "dynamic", 3.0,
                                          "euler", strength, graph["neg"])[0]
    return latents.QwenImageVAEDecode().decode(graph["vae"], out)[0]


def _reference(cls, parts, pil, seed, steps, cfg, strength, **kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(**refs.QWEN_SCHEDULER), **parts)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(prompt=PROMPT, negative_prompt=" ", image=pil, true_cfg_scale=cfg, strength=strength,
                      height=pil.size[1], width=pil.size[0], num_inference_steps=steps,
                      generator=torch.Generator("cpu").manual_seed(seed), output_type="pt", **kw).images
    return images.permute(0, 2, 3, 1)


@pytest.mark.parametrize("w,h,seed,steps,cfg,strength", [(64, 48, 5, 4, 4.0, 0.6), (48, 80, 9, 5, 2.0, 0.8)])
def test_img2img_matches_pipeline(setup, w, h, seed, steps, cfg, strength):
    from diffusers import QwenImageImg2ImgPipeline

    parts, graph = setup
    pil = _pil(w, h, seed)
    ours = _ours(graph, pil, seed, steps, cfg, strength)
    ref = _reference(QwenImageImg2ImgPipeline, parts, pil, seed, steps, cfg, strength)
    assert ours.shape == ref.shape == (1, h, w, 3)
    err = (ours - ref).abs().max().item()
    print(f"img2img max abs error {err:.2e}")
    assert err <= 1e-3


def test_inpaint_matches_pipeline(setup):
    from PIL import Image
    from diffusers import QwenImageInpaintPipeline

    parts, graph = setup
    w, h, seed, steps, cfg, strength = 64, 64, 11, 4, 4.0, 0.9
    pil = _pil(w, h, seed)
    mask = torch.zeros(h, w)
    mask[16:48, 32:64] = 1.0  # regenerate a 16-pixel-aligned block
    mask_pil = Image.fromarray((mask.numpy() * 255).astype(np.uint8), "L")
    ours = _ours(graph, pil, seed, steps, cfg, strength, mask=mask[None])
    ref = _reference(QwenImageInpaintPipeline, parts, pil, seed, steps, cfg, strength, mask_image=mask_pil)
    assert ours.shape == ref.shape == (1, h, w, 3)
    err = (ours - ref).abs().max().item()
    print(f"inpaint max abs error {err:.2e}")
    assert err <= 1e-3
