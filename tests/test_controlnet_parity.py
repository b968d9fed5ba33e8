"""InstantX ControlNets against diffusers, same tiny weights.

- the control model's block samples vs ``QwenImageControlNetModel`` (Union and Inpainting), loaded
  from files in bf16 / fp16 / fp8 storage and with a prefix;
- the whole node graph (loaders, text encode, Apply ControlNet, sampler, decode) vs
  ``QwenImageControlNetPipeline`` and ``QwenImageControlNetInpaintPipeline``.

diffusers samples the control image's latent from the VAE's distribution; we use its mode (as
ComfyUI does), so the reference run is patched to the mode as well.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import references as refs

torch.set_num_threads(1)

PROMPT = "A red bicycle leaning on a brick wall, sharp shadows"
CN_CFG = dict(patch_size=2, in_channels=64, out_channels=16, attention_head_dim=32, num_attention_heads=2,
              joint_attention_dim=refs.TEXT_HIDDEN, axes_dims_rope=(4, 14, 14))


def tiny_controlnet(seed: int, layers: int = 2, extra: int = 0):
    from diffusers import QwenImageControlNetModel

    model = QwenImageControlNetModel(num_layers=layers, extra_condition_channels=extra, **CN_CFG).eval()
    refs._randomize(model, seed)  # the zero-initialised heads must matter
    return model


def _save(model, path, prefix: str = "", dtype=None):
    sd = {}
    for k, v in model.state_dict().items():
        v = v.contiguous()
        if dtype is not None and v.ndim == 2:
            v = v.to(dtype)
        elif dtype is not None and dtype != torch.float8_e4m3fn:
            v = v.to(dtype)
        sd[prefix + k] = v
    save_file(sd, str(path))
    return path


def _pack(t):
    from qwenimage_pack.core.models.mmdit import pack_latent

    return pack_latent(t, 2)[0]


@pytest.mark.parametrize("extra", [0, 4])
def test_block_samples_match_diffusers(tmp_path, extra):
    from qwenimage_pack.core.models.controlnet import InstantXControlNet
    from qwenimage_pack.core.loading.controlnet import load_controlnet

    ref = tiny_controlnet(5 + extra, extra=extra)
    ours = load_controlnet(_save(ref, tmp_path / "cn.safetensors", prefix="controlnet."), compute_dtype=torch.float32)
    assert isinstance(ours, InstantXControlNet) and ours.hint_channels == 16 + extra // 4

    g = torch.Generator().manual_seed(0)
    B, h, w = 2, 6, 10
    x = torch.randn(B, 16, h, w, generator=g)
    hint = torch.randn(B, 16 + extra // 4, h, w, generator=g)
    ctx = torch.randn(B, 7, refs.TEXT_HIDDEN, generator=g)
    sigma = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        want = ref(hidden_states=_pack(x), controlnet_cond=_pack(hint), conditioning_scale=1.0, encoder_hidden_states=ctx,
                   timestep=sigma, img_shapes=[(1, h // 2, w // 2)] * B, return_dict=False)
        got = ours(x, sigma, ctx, hint)
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float16, 5e-3), (torch.float8_e4m3fn, 0.15)])
def test_storage_dtypes_are_kept(tmp_path, dtype, tol):
    from qwenimage_pack.core.loading.controlnet import load_controlnet

    ref = tiny_controlnet(11)
    ours = load_controlnet(_save(ref, tmp_path / "cn.safetensors", prefix="model.diffusion_model.", dtype=dtype),
                           compute_dtype=torch.float32)
    assert ours.transformer_blocks[0].attn.to_q.weight.dtype == dtype
    assert ours.controlnet_blocks[0].weight.dtype == dtype
    g = torch.Generator().manual_seed(1)
    x, hint = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    ctx = torch.randn(1, 5, refs.TEXT_HIDDEN, generator=g)
    with torch.no_grad():
        want = ref(hidden_states=_pack(x), controlnet_cond=_pack(hint), encoder_hidden_states=ctx,
                   timestep=torch.tensor([0.5]), img_shapes=[(1, 2, 2)], return_dict=False)
        got = ours(x, torch.tensor([0.5]), ctx, hint)
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm()).item() < tol


# ----------------------------------------------------------------------------- whole graph


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler

    root = tmp_path_factory.mktemp("models")
    transformer = refs.tiny_transformer(layers=3)
    vae = refs.tiny_vae()
    text_encoder = refs.tiny_text_encoder()
    union, inpaint = tiny_controlnet(21), tiny_controlnet(22, extra=4)

    refs.write_model_files(root, tokenizer_dir, transformer, vae, text_encoder)
    (root / "controlnet").mkdir()
    _save(union, root / "controlnet" / "union_tiny.safetensors")
    _save(inpaint, root / "controlnet" / "inpaint_tiny.safetensors")

    common = dict(scheduler=FlowMatchEulerDiscreteScheduler(**refs.QWEN_SCHEDULER), vae=vae, text_encoder=text_encoder,
                  tokenizer=transformers.AutoTokenizer.from_pretrained(tokenizer_dir), transformer=transformer)
    return root, common, union, inpaint


@pytest.fixture(scope="module")
def graph(setup):
    from qwenimage_pack.nodes import conditioning, controlnet, loaders

    root = setup[0]
    with refs.models_dir(root):
        model = loaders.QwenImageDiTLoader().load("qwen_image_tiny.safetensors", "default")[0]
        te = loaders.QwenImageTextEncoderLoader().load("qwen_2.5_vl_tiny.safetensors")[0]
        vae = loaders.QwenImageVAELoader().load("qwen_image_vae_tiny.safetensors")[0]
        union = controlnet.QwenImageControlNetLoader().load("union_tiny.safetensors")[0]
        inpaint = controlnet.QwenImageControlNetLoader().load("inpaint_tiny.safetensors")[0]
    encode = conditioning.QwenImageTextEncode().encode
    return dict(model=model, vae=vae, union=union, inpaint=inpaint, pos=encode(te, PROMPT)[0], neg=encode(te, " ")[0])


@pytest.fixture
def vae_mode(monkeypatch):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


def _control_image(h, w, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, h, w, 3, generator=g)  # ComfyUI IMAGE, 0..1


def run_graph(graph, cn, image, mask, size, seed, steps, cfg, strength, start, end):
    from qwenimage_pack.nodes import controlnet, latents, sampling

    w, h = size
    pos, neg = controlnet.QwenImageControlNetApply().apply(graph["pos"], graph["neg"], graph[cn], graph["vae"], image,
                                                           strength, start, end, mask)
    latent = latents.QwenImageEmptyLatent().generate(w, h, 1)[0]
    out = sampling.QwenImageSampler().run(graph["model"], pos, latent, seed, steps, cfg, "dynamic", 3.0, "euler", 1.0, neg)[0]
    return latents.QwenImageVAEDecode().decode(graph["vae"], out)[0]


@pytest.mark.parametrize("size,seed,steps,cfg,strength,start,end", [
    ((64, 48), 42, 3, 4.0, 0.8, 0.0, 1.0),
    ((48, 64), 7, 4, 2.5, 1.3, 0.25, 0.75),
])
def test_union_graph_matches_pipeline(setup, graph, vae_mode, size, seed, steps, cfg, strength, start, end):
    from diffusers import QwenImageControlNetPipeline

    _, common, union, _ = setup
    w, h = size
    image = _control_image(h, w)
    ours = run_graph(graph, "union", image, None, size, seed, steps, cfg, strength, start, end)
    pipe = QwenImageControlNetPipeline(controlnet=union, **common)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=cfg, height=h, width=w, num_inference_steps=steps,
                   control_image=image.permute(0, 3, 1, 2) * 2 - 1, controlnet_conditioning_scale=strength,
                   control_guidance_start=start, control_guidance_end=end,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images.permute(0, 2, 3, 1)
    plain = run_graph(graph, "union", image, None, size, seed, steps, cfg, 0.0, start, end)
    assert (plain - ours).abs().max() > 1e-2  # the control does change the picture
    err = (ours - ref).abs().max().item()
    print(f"max abs error {err:.2e}")
    assert err <= 1e-3


def test_inpaint_graph_matches_pipeline(setup, graph, vae_mode):
    from diffusers import QwenImageControlNetInpaintPipeline

    _, common, _, inpaint = setup
    w, h, seed, steps, cfg = 64, 48, 5, 3, 4.0
    image = _control_image(h, w, seed=9)
    mask = torch.zeros(1, h, w)
    mask[:, 12:36, 16:40] = 1.0
    ours = run_graph(graph, "inpaint", image, mask, (w, h), seed, steps, cfg, 1.0, 0.0, 1.0)
    pipe = QwenImageControlNetInpaintPipeline(controlnet=inpaint, **common)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=cfg, height=h, width=w, num_inference_steps=steps,
                   control_image=image.permute(0, 3, 1, 2) * 2 - 1, control_mask=mask[:, None],
                   controlnet_conditioning_scale=1.0,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images.permute(0, 2, 3, 1)
    err = (ours - ref).abs().max().item()
    print(f"max abs error {err:.2e}")
    assert err <= 1e-3
