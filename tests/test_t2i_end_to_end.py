"""The text-to-image node graph against diffusers' QwenImagePipeline, same tiny weights.

Files are written in the layouts users have (ComfyUI split files with prefixes, the original
text-encoder names with the tokenizer beside it, the VAE in diffusers names) and go through the
real loader nodes, exactly as inside ComfyUI.
"""
from __future__ import annotations

import pytest
import torch

import references as refs

PROMPT = "A corgi wearing sunglasses on a surfboard, bold poster art"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    root = tmp_path_factory.mktemp("models")
    transformer = refs.tiny_transformer()
    vae = refs.tiny_vae()
    text_encoder = refs.tiny_text_encoder()

    refs.write_model_files(root, tokenizer_dir, transformer, vae, text_encoder)

    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**refs.QWEN_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=transformers.AutoTokenizer.from_pretrained(tokenizer_dir), transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return root, pipe


@pytest.fixture(scope="module")
def graph(setup):
    from qwenimage_pack.nodes import conditioning, latents, loaders

    root, _ = setup
    with refs.models_dir(root):
        model = loaders.QwenImageDiTLoader().load("qwen_image_tiny.safetensors", "default")[0]
        te = loaders.QwenImageTextEncoderLoader().load("qwen_2.5_vl_tiny.safetensors")[0]
        vae = loaders.QwenImageVAELoader().load("qwen_image_vae_tiny.safetensors")[0]
    encode = conditioning.QwenImageTextEncode().encode
    return dict(model=model, vae=vae, pos=encode(te, PROMPT)[0], neg=encode(te, " ")[0], latents=latents)


def run_graph(graph, width, height, batch, seed, steps, cfg, negative=True):
    from qwenimage_pack.nodes import latents, sampling

    latent = latents.QwenImageEmptyLatent().generate(width, height, batch)[0]
    out = sampling.QwenImageSampler().run(
        graph["model"], graph["pos"], latent, seed, steps, cfg, "dynamic", 3.0, "euler", 1.0,
        graph["neg"] if negative else None,
    )[0]
    return latents.QwenImageVAEDecode().decode(graph["vae"], out)[0]


def run_reference(pipe, width, height, batch, seed, steps, cfg, negative=True):
    with torch.no_grad():
        images = pipe(
            prompt=PROMPT, negative_prompt=" " if negative else None, true_cfg_scale=cfg, height=height, width=width,
            num_inference_steps=steps, num_images_per_prompt=batch,
            generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
        ).images
    return images.permute(0, 2, 3, 1)


@pytest.mark.parametrize("width,height,batch,seed,steps,cfg,negative", [
    (64, 48, 1, 42, 4, 4.0, True),
    (48, 80, 2, 7, 3, 2.5, True),
    (64, 64, 1, 3, 2, 1.0, False),
])
def test_node_graph_matches_pipeline(setup, graph, width, height, batch, seed, steps, cfg, negative):
    _, pipe = setup
    ours = run_graph(graph, width, height, batch, seed, steps, cfg, negative)
    ref = run_reference(pipe, width, height, batch, seed, steps, cfg, negative)
    assert ours.shape == (batch, height, width, 3)
    assert ref.shape == ours.shape
    err = (ours - ref).abs().max().item()
    print(f"max abs error {err:.2e}")
    assert err <= 1e-3


def test_core_style_conditioning_with_mask_is_accepted(graph):
    """ComfyUI's own Qwen text encode may add an attention_mask; padded tokens must not matter."""
    from qwenimage_pack.nodes import latents, sampling

    pos = graph["pos"]
    ctx = pos[0][0]
    padded = torch.cat([ctx, torch.randn(1, 5, ctx.shape[-1])], dim=1)
    mask = torch.cat([torch.ones(1, ctx.shape[1]), torch.zeros(1, 5)], dim=1)
    latent = latents.QwenImageEmptyLatent().generate(32, 32, 1)[0]
    run = sampling.QwenImageSampler().run
    a = run(graph["model"], pos, latent, 1, 2, 1.0, "dynamic", 3.0, "euler", 1.0)[0]["samples"]
    b = run(graph["model"], [[padded, {"attention_mask": mask}]], latent, 1, 2, 1.0, "dynamic", 3.0, "euler", 1.0)[0]["samples"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
