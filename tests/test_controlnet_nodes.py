"""ControlNet nodes and protocol: DiffSynth patches, start/end window, chaining, reference
latents, GGUF models, the control-image fitting rule and bad input.

The DiffSynth block is checked against its published formula written out here with plain
tensor operations and injected into diffusers' transformer with a forward hook.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import references as refs
from test_controlnet_parity import _pack, _save, tiny_controlnet

torch.set_num_threads(1)

DIM = refs.TINY_INNER_DIM


def diffsynth_state(seed: int, layers: int, extra: int = 0) -> dict:
    return refs.diffsynth_patch_state(torch.Generator().manual_seed(seed), layers, extra)


def published_block(x, y, sd, i):
    """DiffSynth: output_proj(GELU(input_proj(RMSNorm_x(x) + RMSNorm_y(y)))), exact GELU, eps 1e-6."""
    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    p = f"controlnet_blocks.{i}."
    h = rms(x, sd[p + "x_rms.weight"]) + rms(y, sd[p + "y_rms.weight"])
    h = h @ sd[p + "input_proj.weight"].T + sd[p + "input_proj.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h @ sd[p + "output_proj.weight"].T + sd[p + "output_proj.bias"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for d in ("diffusion_models", "vae", "controlnet", "model_patches"):
        (root / d).mkdir()
    transformer = refs.tiny_transformer(layers=2)
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, root / "diffusion_models" / "tiny.safetensors")
    save_file({k: v.contiguous() for k, v in refs.tiny_vae().state_dict().items()}, root / "vae" / "vae.safetensors")
    _save(tiny_controlnet(31), root / "controlnet" / "union.safetensors")
    _save(tiny_controlnet(32, extra=4), root / "controlnet" / "inpaint.safetensors")
    save_file(diffsynth_state(33, 2), root / "model_patches" / "canny_diffsynth.safetensors")
    save_file(diffsynth_state(34, 2, extra=4), root / "model_patches" / "inpaint_diffsynth.safetensors")
    return root, transformer


@pytest.fixture(scope="module")
def nodes(files):
    from qwenimage_pack.nodes import controlnet, loaders

    root = files[0]
    with refs.models_dir(root):
        load = controlnet.QwenImageControlNetLoader().load
        return dict(
            model=loaders.QwenImageDiTLoader().load("tiny.safetensors", "default")[0],
            vae=loaders.QwenImageVAELoader().load("vae.safetensors")[0],
            union=load("union.safetensors")[0], inpaint=load("inpaint.safetensors")[0],
            canny=load("canny_diffsynth.safetensors")[0], ds_inpaint=load("inpaint_diffsynth.safetensors")[0],
            choices=controlnet.QwenImageControlNetLoader.INPUT_TYPES()["required"]["controlnet_name"][0],
        )


def _cond(seed: int, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, length, refs.TEXT_HIDDEN, generator=g), {}]]


def _image(h, w, seed=0, channels=3):
    return torch.rand(1, h, w, channels, generator=torch.Generator().manual_seed(seed))


def _sample(nodes, pos, neg, seed=1, steps=3, cfg=3.0, size=(32, 32)):
    from qwenimage_pack.nodes import latents, sampling

    latent = latents.QwenImageEmptyLatent().generate(size[0], size[1], 1)[0]
    return sampling.QwenImageSampler().run(nodes["model"], pos, latent, seed, steps, cfg, "dynamic", 3.0, "euler", 1.0, neg)[0]["samples"]


def _apply(nodes, cn, pos, neg, strength=1.0, start=0.0, end=1.0, image=None, mask=None):
    from qwenimage_pack.nodes import controlnet

    image = _image(32, 32) if image is None else image
    return controlnet.QwenImageControlNetApply().apply(pos, neg, nodes[cn], nodes["vae"], image, strength, start, end, mask)


# ----------------------------------------------------------------------------- loader


def test_loader_recognises_every_kind(nodes):
    from qwenimage_pack.core.models.controlnet import DiffSynthControlNet, InstantXControlNet

    assert {"union.safetensors", "canny_diffsynth.safetensors"} <= set(nodes["choices"])
    assert isinstance(nodes["union"].module, InstantXControlNet) and not nodes["union"].is_inpaint
    assert isinstance(nodes["inpaint"].module, InstantXControlNet) and nodes["inpaint"].module.hint_channels == 17
    assert isinstance(nodes["canny"].module, DiffSynthControlNet) and not nodes["canny"].is_inpaint
    assert nodes["ds_inpaint"].module.hint_channels == 17


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_diffsynth_storage_dtypes(tmp_path, dtype):
    from qwenimage_pack.core.loading.controlnet import load_controlnet

    sd = {k: (v.to(dtype) if v.ndim == 2 or dtype != torch.float8_e4m3fn else v) for k, v in diffsynth_state(3, 1).items()}
    save_file({"diffusion_model." + k: v for k, v in sd.items()}, tmp_path / "p.safetensors")
    net = load_controlnet(tmp_path / "p.safetensors", compute_dtype=torch.float32)
    assert net.controlnet_blocks[0].input_proj.weight.dtype == dtype


# ----------------------------------------------------------------------------- DiffSynth


@pytest.mark.parametrize("extra", [0, 4])
def test_diffsynth_one_block_matches_published_formula(files, extra):
    from qwenimage_pack.core.models.controlnet import AppliedControl, DiffSynthControlNet
    from qwenimage_pack.core.loading import load

    root, transformer = files
    module = load.load_mmdit(root / "diffusion_models" / "tiny.safetensors", compute_dtype=torch.float32)
    sd = diffsynth_state(40 + extra, 1, extra)
    net = DiffSynthControlNet(num_layers=1, dim=DIM, extra_in_channels=extra)
    net.load_state_dict(sd)
    g = torch.Generator().manual_seed(2)
    h, w, strength = 6, 8, 0.7
    x = torch.randn(1, 16, h, w, generator=g)
    hint = torch.randn(1, 16 + extra // 4, h, w, generator=g)
    ctx = torch.randn(1, 5, refs.TEXT_HIDDEN, generator=g)
    sigma = torch.tensor([0.4])

    # Packing written out: [C, h, w] -> tokens of (C, 2, 2) patches, row-major.
    C = hint.shape[1]
    y = hint.view(1, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, h * w // 4, 4 * C)
    y = y @ sd["img_in.weight"].T + sd["img_in.bias"]

    def add_patch(mod, args, out):
        txt, img = out
        return txt, img + strength * published_block(img, y, sd, 0)

    handle = transformer.transformer_blocks[0].register_forward_hook(add_patch)
    try:
        with torch.no_grad():
            want = transformer(hidden_states=_pack(x), timestep=sigma, encoder_hidden_states=ctx,
                               img_shapes=[(1, h // 2, w // 2)], return_dict=False)[0]
    finally:
        handle.remove()
    control = AppliedControl(net, lambda hh, ww: hint, strength)
    with torch.no_grad():
        got = _pack(module(x, sigma, ctx, control=control.hook(module, x, sigma, ctx, None, 0, 1)))
        plain = _pack(module(x, sigma, ctx))
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_diffsynth_strength_zero_equals_no_control(nodes):
    pos, neg = _cond(1), _cond(2, 3)
    plain = _sample(nodes, pos, neg)
    off = _sample(nodes, *_apply(nodes, "canny", pos, neg, strength=0.0))
    on = _sample(nodes, *_apply(nodes, "canny", pos, neg, strength=1.0))
    assert torch.equal(plain, off)
    assert (plain - on).abs().max() > 1e-3


def test_diffsynth_inpaint_hint_uses_mask(nodes):
    from qwenimage_pack.nodes import controlnet

    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1.0
    pixels = controlnet.control_pixels(_image(32, 32))
    hint = controlnet.make_hint_fn(nodes["ds_inpaint"], nodes["vae"], pixels, controlnet.mask_tensor(mask))(4, 4)
    assert hint.shape == (1, 17, 4, 4)
    keep = hint[0, 16]
    assert torch.all(keep[:, :2] == 0) and torch.all(keep[:, 2:] == 1)
    no_mask = controlnet.make_hint_fn(nodes["ds_inpaint"], nodes["vae"], pixels, None)(4, 4)
    assert torch.all(no_mask[:, 16] == 1) and torch.allclose(no_mask[:, :16], hint[:, :16])


# ----------------------------------------------------------------------------- protocol


def _guided(nodes, pos, neg, sigmas):
    from qwenimage_pack.nodes import sampling

    return sampling._Guided(nodes["model"].module, torch.device("cpu"), sampling._as_conds(pos, "positive"),
                            sampling._as_conds(neg, "negative"), 3.0, sigmas=sigmas)


@pytest.mark.parametrize("cn", ["union", "canny"])
def test_outside_window_equals_uncontrolled_step(nodes, cn):
    from qwenimage_pack.nodes import controlnet

    pos, neg = _cond(3), _cond(4)
    cpos, cneg = _apply(nodes, cn, pos, neg, strength=1.0, start=0.5, end=0.75)
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.0])
    controlnet.prepared(sum((_cond_list(c) for c in (cpos, cneg)), []), 4, 4)
    with torch.no_grad():
        ctrl, plain = _guided(nodes, cpos, cneg, sigmas), _guided(nodes, pos, neg, sigmas)
        x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(5))
        for step in range(4):  # diffusers' rule: step 2 of 4 only (2/4 >= 0.5 and 3/4 <= 0.75)
            s = sigmas[step].expand(1)
            same = torch.equal(ctrl(x, s), plain(x, s))
            assert same == (step != 2), step


def _cond_list(conditioning):
    from qwenimage_pack.nodes import sampling

    return sampling._as_conds(conditioning, "test")


def test_chained_controls_add_up(nodes):
    """InstantX residuals are linear in strength: 0.5 then 0.7 in series equals 1.2 alone."""
    pos, neg = _cond(5), _cond(6)
    once = _sample(nodes, *_apply(nodes, "union", pos, neg, strength=1.2))
    p1, n1 = _apply(nodes, "union", pos, neg, strength=0.5)
    p2, n2 = _apply(nodes, "union", p1, n1, strength=0.7)
    assert len(p2[0][1]["control"]) == 2 and p2[0][1]["control"] is n2[0][1]["control"]
    torch.testing.assert_close(_sample(nodes, p2, n2), once, rtol=1e-4, atol=1e-5)
    # a DiffSynth patch chained after it changes the result again
    p3, n3 = _apply(nodes, "canny", p2, n2, strength=1.0)
    assert (_sample(nodes, p3, n3) - once).abs().max() > 1e-4


def test_control_touches_only_target_tokens_with_reference_latents(nodes):
    from qwenimage_pack.core.models.controlnet import AppliedControl

    module = nodes["model"].module
    g = torch.Generator().manual_seed(7)
    x, ref, ctx = torch.randn(1, 16, 4, 6, generator=g), torch.randn(1, 16, 6, 4, generator=g), torch.randn(1, 5, refs.TEXT_HIDDEN, generator=g)
    sigma = torch.tensor([0.5])
    n_target = (4 // 2) * (6 // 2)
    for cn in ("union", "canny"):
        hint = torch.randn(1, 16, 4, 6, generator=g)
        hook = AppliedControl(nodes[cn].module, lambda h, w: hint, 1.0).hook(module, x, sigma, ctx, None, 0, 1)
        seen = []

        def spy(i, img):
            before = img[:, n_target:].clone()
            hook(i, img)
            seen.append(torch.equal(before, img[:, n_target:]))

        with torch.no_grad():
            out = module(x, sigma, ctx, ref_latents=[ref], control=spy)
            plain = module(x, sigma, ctx, ref_latents=[ref])
        assert seen and all(seen) and (out - plain).abs().max() > 1e-4


def test_gguf_model_with_control(files, tmp_path):
    """A GGUF MMDiT takes the same control residuals as the dense model with its decoded weights."""
    from gguf import GGMLQuantizationType as T
    from test_gguf_load import write_model

    from qwenimage_pack.core.models.controlnet import AppliedControl
    from qwenimage_pack.core.loading import load
    from qwenimage_pack.core.loading.controlnet import load_controlnet

    root, transformer = files
    dense = write_model(tmp_path / "qwen-image-Q8_0.gguf", "qwen_image", transformer.state_dict(),
                        lambda name, shape: T.Q8_0 if len(shape) == 2 and shape[-1] % 32 == 0 else T.F32)
    save_file({k: v.contiguous() for k, v in dense.items()}, tmp_path / "dense.safetensors")
    quant = load.load_mmdit(tmp_path / "qwen-image-Q8_0.gguf", compute_dtype=torch.float32)
    plain = load.load_mmdit(tmp_path / "dense.safetensors", compute_dtype=torch.float32)
    cn = load_controlnet(root / "controlnet" / "union.safetensors", compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(8)
    x, hint, ctx = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 5, refs.TEXT_HIDDEN, generator=g)
    sigma = torch.tensor([0.6])
    control = AppliedControl(cn, lambda h, w: hint, 0.9)
    with torch.no_grad():
        a = quant(x, sigma, ctx, control=control.hook(quant, x, sigma, ctx, None, 0, 1))
        b = plain(x, sigma, ctx, control=control.hook(plain, x, sigma, ctx, None, 0, 1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- images


def test_fit_covers_and_centre_crops():
    from qwenimage_pack.nodes.controlnet import fit

    img = torch.arange(16 * 32, dtype=torch.float32).view(1, 1, 16, 32)
    torch.testing.assert_close(fit(img, 16, 16), img[..., 8:24])  # wide -> sides trimmed, no scaling
    tall = img.transpose(-1, -2)
    torch.testing.assert_close(fit(tall, 16, 16), tall[..., 8:24, :])
    out = fit(img, 8, 8)  # crop to square, then downscale
    want = F.interpolate(img[..., 8:24], size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out, want)
    assert fit(img, 16, 32) is img


def test_control_image_of_another_size_is_fitted(nodes):
    pos, neg = _cond(9), _cond(10)
    a = _sample(nodes, *_apply(nodes, "union", pos, neg, image=_image(48, 96, seed=3)))
    assert a.shape == (1, 16, 4, 4) and torch.isfinite(a).all()


# ----------------------------------------------------------------------------- bad input


def test_foreign_controlnets_are_named(tmp_path):
    from qwenimage_pack.core.errors import WeightFileError
    from qwenimage_pack.core.loading.controlnet import load_controlnet

    t = torch.zeros(4, 4)
    flux = {"controlnet_blocks.0.weight": t, "controlnet_x_embedder.weight": t, "transformer_blocks.0.attn.to_q.weight": t,
            "single_transformer_blocks.0.attn.to_q.weight": t, "controlnet_single_blocks.0.weight": t, "x_embedder.weight": t}
    sdxl = {"controlnet_cond_embedding.conv_in.weight": t, "down_blocks.0.resnets.0.conv1.weight": t,
            "controlnet_down_blocks.0.weight": t, "add_embedding.linear_1.weight": t}
    for name, sd, what in (("flux_cn", flux, "Flux ControlNet"), ("sdxl_cn", sdxl, "SDXL ControlNet")):
        save_file({k: v.clone() for k, v in sd.items()}, tmp_path / f"{name}.safetensors")
        with pytest.raises(WeightFileError, match=what):
            load_controlnet(tmp_path / f"{name}.safetensors")
    # a Qwen-Image diffusion model in the ControlNet loader
    save_file({"txt_norm.weight": torch.ones(8), "transformer_blocks.0.img_mod.1.weight": t.clone()}, tmp_path / "dit.safetensors")
    with pytest.raises(WeightFileError, match="diffusion-model loader"):
        load_controlnet(tmp_path / "dit.safetensors")


@pytest.mark.parametrize("channels,match", [(4, "alpha"), (1, "1 channel")])
def test_control_image_channels_are_refused(nodes, channels, match):
    with pytest.raises(ValueError, match=match):
        _apply(nodes, "union", _cond(1), _cond(2), image=_image(32, 32, channels=channels))


def test_mask_without_inpainting_model_is_refused(nodes):
    for cn in ("union", "canny"):
        with pytest.raises(ValueError, match="not an inpainting ControlNet"):
            _apply(nodes, cn, _cond(1), _cond(2), mask=torch.ones(1, 32, 32))


@pytest.mark.parametrize("field,value", [("strength", -0.5), ("strength", 11.0), ("strength", float("nan")),
                                         ("start", 1.5), ("end", -0.1), ("start", 0.9)])
def test_out_of_range_numbers_are_refused(nodes, field, value):
    kw = dict(strength=1.0, start=0.0, end=1.0)
    kw[field] = value
    if field == "start" and value == 0.9:
        kw["end"] = 0.5
    with pytest.raises(ValueError, match="strength|start_percent|end_percent"):
        _apply(nodes, "union", _cond(1), _cond(2), **kw)


def test_core_controlnet_in_conditioning_is_refused(nodes):
    class CoreControlNet:  # what ComfyUI's Apply ControlNet stores under "control"
        pass

    pos = [[_cond(1)[0][0], {"control": CoreControlNet()}]]
    with pytest.raises(ValueError, match="Qwen-Image Apply ControlNet"):
        _sample(nodes, pos, _cond(2))
    ours, _ = _apply(nodes, "union", _cond(1), _cond(2))
    with pytest.raises(ValueError, match="Qwen-Image Sampler"):
        ours[0][1]["control"].get_models()
