"""Image to layers through our nodes against diffusers' QwenImageLayeredPipeline, same tiny weights.

The files are written in the layouts ComfyUI users download (the Layered MMDiT as a ComfyUI split
file, the RGBA VAE in the original Wan names of ``qwen_image_layered_vae.safetensors``) and go
through the loader nodes. The graph is the one a workflow uses: VAE Encode of the RGBA input
image -> a reference latent on positive and negative (what ComfyUI's ReferenceLatent node
does) -> Empty Layered Latent -> Sampler -> Decode Layers. diffusers runs its own pipeline on the
same image with the same seed, so noise, sigmas (its mu = sqrt(tokens / 256)), CFG (with
cfg_normalize, as the model card runs it) and decoding must all agree.

The pipeline sizes its output from ``resolution`` (640 or 1024 only) and the image's aspect
ratio; at 640 px the tiny VAE alone takes most of a minute on two CPU threads, so the test swaps
the pipeline's sizing function for one returning a small non-square size (everything after it is
the pipeline's own code).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import references as refs

PROMPT = "A red fox in front of a lighthouse, flat illustration"
WIDTH, HEIGHT = 160, 96  # the pipeline's calculate_dimensions is patched to give this size
LAYERED_DIT = "qwen_image_layered_tiny.safetensors"
LAYERED_VAE = "qwen_image_layered_vae_tiny.safetensors"
PLAIN_VAE = "qwen_image_vae_plain_tiny.safetensors"


def tiny_rgba_vae(seed: int):
    """references.tiny_vae's architecture with 4 pixel channels (the Qwen-Image-Layered VAE)."""
    from diffusers import AutoencoderKLQwenImage

    model = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                                   temperal_downsample=[False, True, True], input_channels=4).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as references._randomize: norm gains around 1, everything else N(0, 0.08)
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1 or name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    return model


def _input_image(seed: int = 0):
    """An RGBA image with a smooth picture and a partly transparent alpha."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 4, 6, 10, generator=g)
    px = torch.nn.functional.interpolate(coarse, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)[0]
    px[3] = (px[3] * 1.6 - 0.3).clamp(0, 1)
    arr = (px.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr, mode="RGBA")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline
    from safetensors.torch import save_file

    from qwenimage_pack.core.keymaps.vae import convert_vae_keys

    root = tmp_path_factory.mktemp("models")
    transformer = refs.tiny_transformer(seed=3, use_additional_t_cond=True, use_layer3d_rope=True)
    vae = tiny_rgba_vae(seed=4)
    text_encoder = refs.tiny_text_encoder()
    refs.write_model_files(root, tokenizer_dir, transformer, vae, text_encoder, dit_file=LAYERED_DIT)
    # ComfyUI's qwen_image_layered_vae.safetensors keeps the original Wan names.
    save_file({k: v.contiguous() for k, v in convert_vae_keys(vae.state_dict()).items()}, root / "vae" / LAYERED_VAE)
    save_file({k: v.contiguous() for k, v in refs.tiny_vae(seed=5).state_dict().items()}, root / "vae" / PLAIN_VAE)

    pipe = QwenImageLayeredPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**refs.QWEN_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=transformers.AutoTokenizer.from_pretrained(tokenizer_dir), processor=None, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return root, pipe


@pytest.fixture(scope="module")
def graph(setup):
    from qwenimage_pack.nodes import conditioning, loaders

    root, _ = setup
    with refs.models_dir(root):
        model = loaders.QwenImageDiTLoader().load(LAYERED_DIT, "default")[0]
        te = loaders.QwenImageTextEncoderLoader().load(refs.TEXT_ENCODER_FILE)[0]
        vae = loaders.QwenImageVAELoader().load(LAYERED_VAE)[0]
        plain_vae = loaders.QwenImageVAELoader().load(PLAIN_VAE)[0]
    encode = conditioning.QwenImageTextEncode().encode
    return dict(model=model, vae=vae, plain_vae=plain_vae, pos=encode(te, PROMPT)[0], neg=encode(te, " ")[0])


def with_reference(conditioning, latent):
    """What ComfyUI's ReferenceLatent node does: append the latent to reference_latents."""
    return [[ctx, {**extra, "reference_latents": list(extra.get("reference_latents", [])) + [latent["samples"]]}]
            for ctx, extra in conditioning]


def image_tensor(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0)[None]


def run_graph(graph, pil, layers, seed, steps, cfg):
    from qwenimage_pack.nodes import latents, sampling

    ref = latents.QwenImageVAEEncode().encode(graph["vae"], image_tensor(pil))[0]
    latent = latents.QwenImageEmptyLayeredLatent().generate(WIDTH, HEIGHT, layers, 1)[0]
    out = sampling.QwenImageSampler().run(
        graph["model"], with_reference(graph["pos"], ref), latent, seed, steps, cfg, "dynamic", 3.0, "euler", 1.0,
        with_reference(graph["neg"], ref),
    )[0]
    assert out["samples"].shape == (1, 16, layers + 1, HEIGHT // 8, WIDTH // 8)
    return out, latents.QwenImageDecodeLayers().decode(graph["vae"], out)


def run_reference(pipe, pil, layers, seed, steps, cfg, monkeypatch):
    """The pipeline's layers [layers, H, W, 4] in 0..1 and its final (normalized, packed) latents."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered

    monkeypatch.setattr(pipeline_qwenimage_layered, "calculate_dimensions", lambda area, ratio: (WIDTH, HEIGHT))
    seen = {}

    def keep_latents(pipeline, step, t, tensors):
        seen["latents"] = tensors["latents"]
        return {}

    run = lambda: pipe(  # noqa: E731
        image=pil, prompt=PROMPT, negative_prompt=" ", true_cfg_scale=cfg, layers=layers,
        num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
        resolution=640, cfg_normalize=True, callback_on_step_end=keep_latents,
    ).images
    with torch.no_grad():
        if layers == 0:  # diffusers drops frame 0 before decoding and then fails on an empty batch
            with pytest.raises(RuntimeError):
                run()
            return None, seen["latents"]
        images = run()
    return images[0].permute(0, 2, 3, 1), seen["latents"]


@pytest.mark.parametrize("layers,seed,steps,cfg", [(2, 42, 2, 4.0), (4, 7, 3, 2.5), (0, 3, 2, 4.0)],
                         ids=["2-layers", "4-layers", "0-layers"])
def test_image_to_layers_matches_pipeline(setup, graph, monkeypatch, layers, seed, steps, cfg):
    _, pipe = setup
    pil = _input_image()
    out, (rgb, mask, rgba) = run_graph(graph, pil, layers, seed, steps, cfg)
    alpha = 1.0 - mask  # ComfyUI's MASK convention (Split Image with Alpha's)
    ref, ref_latents = run_reference(pipe, pil, layers, seed, steps, cfg, monkeypatch)

    from qwenimage_pack.core.pipeline import latent_format as lf

    ours_norm = lf.normalize(out["samples"])
    theirs = pipe._unpack_latents(ref_latents, HEIGHT, WIDTH, layers, pipe.vae_scale_factor)
    err_latent = (ours_norm - theirs).abs().max().item()
    print(f"layers {layers}: max abs latent error {err_latent:.2e}")
    assert err_latent <= 1e-3
    if layers == 0:  # one frame: our Decode Layers gives it as the (only) layer
        assert rgb.shape == (1, HEIGHT, WIDTH, 3) and alpha.shape == (1, HEIGHT, WIDTH)
        return
    assert rgb.shape == (layers, HEIGHT, WIDTH, 3) and alpha.shape == (layers, HEIGHT, WIDTH)
    assert rgba.shape == ref.shape == (layers, HEIGHT, WIDTH, 4)
    err_rgb = (rgb - ref[..., :3]).abs().max().item()
    err_alpha = [(alpha[i] - ref[i, ..., 3]).abs().max().item() for i in range(layers)]
    print(f"max abs error: image {err_rgb:.2e}, alpha per layer {[f'{e:.2e}' for e in err_alpha]}")
    assert err_rgb <= 1e-3
    assert max(err_alpha) <= 1e-3
    assert torch.equal(rgba[..., :3], rgb) and torch.equal(1.0 - rgba[..., 3], mask)  # Split Image with Alpha's
    assert float(alpha.std()) > 1e-3  # the alpha is a real channel, not a constant


def test_composite_and_plain_decode(graph):
    """include_composite adds frame 0; our plain VAE Decode gives every frame as RGBA, composite first
    (ComfyUI's LatentCutToBatch + VAEDecode order); ComfyUI's core empty layered latent (untagged) works."""
    from qwenimage_pack.nodes import latents, sampling

    core_latent = {"samples": torch.zeros(1, 16, 3, 4, 6)}  # EmptyQwenImageLayeredLatentImage(48, 32, layers=2)
    out = sampling.QwenImageSampler().run(graph["model"], graph["pos"], core_latent, 1, 1, 1.0, "constant", 1.0,
                                          "euler", 1.0)[0]
    assert out["samples"].shape == (1, 16, 3, 4, 6)
    rgb, mask, _ = latents.QwenImageDecodeLayers().decode(graph["vae"], out)
    rgb_all, mask_all, _ = latents.QwenImageDecodeLayers().decode(graph["vae"], out, include_composite=True)
    assert rgb.shape == (2, 32, 48, 3) and rgb_all.shape == (3, 32, 48, 3)
    torch.testing.assert_close(rgb_all[1:], rgb, rtol=0, atol=1e-6)
    torch.testing.assert_close(mask_all[1:], mask, rtol=0, atol=1e-6)
    every = latents.QwenImageVAEDecode().decode(graph["vae"], out)[0]
    assert every.shape == (3, 32, 48, 4)
    torch.testing.assert_close(every[..., 3], 1.0 - mask_all, rtol=0, atol=1e-6)


def test_rgb_image_into_rgba_vae_is_opaque(graph):
    from qwenimage_pack.nodes import latents

    pil = _input_image(seed=1)
    rgba = image_tensor(pil)[:, :64, :64]
    opaque = rgba.clone()
    opaque[..., 3] = 1.0
    enc = latents.QwenImageVAEEncode().encode
    torch.testing.assert_close(enc(graph["vae"], rgba[..., :3])[0]["samples"], enc(graph["vae"], opaque)[0]["samples"])


def test_wrong_vae_or_model_is_refused_naming_the_file(graph):
    from qwenimage_pack.nodes import latents, sampling

    model, vae, plain_vae = graph["model"], graph["vae"], graph["plain_vae"]
    layered_latent = latents.QwenImageEmptyLayeredLatent().generate(48, 32, 2, 1)[0]
    run = sampling.QwenImageSampler().run
    out = run(model, graph["pos"], layered_latent, 1, 1, 1.0, "constant", 1.0, "euler", 1.0)[0]

    # A Layered latent decoded with the 3-channel VAE.
    for node in (latents.QwenImageDecodeLayers().decode, latents.QwenImageVAEDecode().decode):
        with pytest.raises(ValueError, match="qwen_image_layered_vae.safetensors"):
            node(plain_vae, out)
    # A reference image encoded by the 3-channel VAE, given to the Layered model.
    image = torch.rand(1, 32, 48, 3)
    plain_ref = latents.QwenImageVAEEncode().encode(plain_vae, image)[0]
    with pytest.raises(ValueError, match="Layered model got a reference latent encoded by the 3-channel.*"
                                         "qwen_image_layered_vae.safetensors"):
        run(model, with_reference(graph["pos"], plain_ref), layered_latent, 1, 1, 1.0, "constant", 1.0, "euler", 1.0)

    # The other way round: a plain model with the RGBA VAE's reference, or a layered latent.
    plain_model = graph["model"].__class__(**{**graph["model"].__dict__, "module": _plain_module(model.module),
                                              "name": "qwen_image_tiny.safetensors"})
    rgba_ref = latents.QwenImageVAEEncode().encode(vae, image)[0]
    empty = latents.QwenImageEmptyLatent().generate(48, 32, 1)[0]
    with pytest.raises(ValueError, match="not Layered.*qwen_image_vae.safetensors"):
        run(plain_model, with_reference(graph["pos"], rgba_ref), empty, 1, 1, 1.0, "constant", 1.0, "euler", 1.0)
    with pytest.raises(ValueError, match="3 frames.*not a Qwen-Image-Layered model.*qwen_image_layered_bf16"):
        run(plain_model, graph["pos"], {"samples": torch.zeros(1, 16, 3, 4, 6)}, 1, 1, 1.0, "constant", 1.0,
            "euler", 1.0)
    plain_out = run(plain_model, graph["pos"], empty, 1, 1, 1.0, "constant", 1.0, "euler", 1.0)[0]
    with pytest.raises(ValueError, match="not Layered.*qwen_image_vae.safetensors"):
        latents.QwenImageVAEDecode().decode(vae, plain_out)
    assert latents.QwenImageVAEDecode().decode(plain_vae, plain_out)[0].shape == (1, 32, 48, 3)


def _plain_module(module):
    """The same weights as a plain (non-Layered) Qwen-Image MMDiT."""
    from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT

    cfg = MMDiTConfig(**{**module.config.__dict__, "use_additional_t_cond": False, "use_layer3d_rope": False})
    plain = QwenImageMMDiT(cfg).eval()
    plain.load_state_dict({k: v for k, v in module.state_dict().items() if "addition_t_embedding" not in k})
    return plain


def test_empty_layered_latent_takes_its_size_from_a_connected_latent():
    from qwenimage_pack.nodes.latents import QwenImageEmptyLayeredLatent

    node = QwenImageEmptyLayeredLatent()
    (out,) = node.generate(640, 640, 2, 1, size_from={"samples": torch.zeros(1, 16, 53, 80)})
    assert tuple(out["samples"].shape) == (1, 16, 3, 53, 80)  # the reference's own grid (424 x 640 px)
    (plain,) = node.generate(640, 480, 3, 2)
    assert tuple(plain["samples"].shape) == (2, 16, 4, 60, 80)
    (odd,) = node.generate(640, 427, 1, 1)  # GetImageSize of a 640 x 427 image, as ComfyUI's node takes it
    assert tuple(odd["samples"].shape) == (1, 16, 2, 53, 80)


def test_layers_of_an_odd_sized_image_line_up_with_it(graph):
    """A 100 x 60 image (official template: any size GetImageSize reports) encodes to a 12 x 7
    latent; the layered latent takes that grid, the MMDiT pads it, and every layer comes back at
    the encoded image's size (96 x 56 px, what VAE Encode kept)."""
    from qwenimage_pack.nodes import latents, sampling

    pil = _input_image().resize((100, 60))
    ref = latents.QwenImageVAEEncode().encode(graph["vae"], image_tensor(pil))[0]
    assert tuple(ref["samples"].shape[-2:]) == (7, 12)
    latent = latents.QwenImageEmptyLayeredLatent().generate(640, 640, 2, 1, size_from=ref)[0]
    out = sampling.QwenImageSampler().run(
        graph["model"], with_reference(graph["pos"], ref), latent, 1, 1, 1.0, "dynamic", 3.0, "euler", 1.0,
    )[0]
    assert out["samples"].shape == (1, 16, 3, 7, 12) and torch.isfinite(out["samples"]).all()
    layers_rgb, alpha, rgba = latents.QwenImageDecodeLayers().decode(graph["vae"], out)
    assert tuple(rgba.shape[1:3]) == (56, 96) and tuple(alpha.shape[1:]) == (56, 96)
