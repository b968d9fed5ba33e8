"""The Qwen-Image-2512 Fun ControlNet (VideoX-Fun): file, loader, model, nodes, bad input.

The tiny files are written in the released file's layout (``references.fun_controlnet_state``:
unprefixed, 174 tensors for 5 blocks). The model is checked against VideoX-Fun's algorithm
(``QwenImageControlTransformer2DModel.forward_control`` and its ``BaseQwenImageTransformerBlock``)
written out here with diffusers' own Qwen-Image modules: the main model's embeddings, diffusers'
``QwenImageTransformerBlock`` as the control blocks, forward hooks adding the hints after the main
blocks. ComfyUI's implementation is the reference of tests/integration/test_comfyui_fun_controlnet.py.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

import references as refs
from test_controlnet_parity import _pack

torch.set_num_threads(1)

DIM, HEAD_DIM = refs.TINY_INNER_DIM, refs.TINY_MMDIT["attention_head_dim"]


def fun_state(seed: int, blocks: int = 2, **kw) -> dict:
    return refs.fun_controlnet_state(torch.Generator().manual_seed(seed), blocks, **kw)


def _save(sd: dict, path, prefix: str = "", dtype=None):
    save_file({prefix + k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in sd.items()}, str(path))
    return path


def videox_reference(main, sd: dict, x, sigma, ctx, hint, scale: float, layers: list[int]):
    """VideoX-Fun's control forward with diffusers' modules: returns (hints, velocity)."""
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    n = len({k.split(".")[1] for k in sd if k.startswith("control_blocks.")})
    blocks, after = [], []
    for i in range(n):
        p = f"control_blocks.{i}."
        block = QwenImageTransformerBlock(DIM, DIM // HEAD_DIM, HEAD_DIM).eval()
        block.load_state_dict({k[len(p):]: v for k, v in sd.items()
                               if k.startswith(p) and not k[len(p):].startswith(("before_proj.", "after_proj."))}, strict=True)
        blocks.append(block)
        after.append((sd[p + "after_proj.weight"], sd[p + "after_proj.bias"]))
    B, _, h, w = x.shape
    img_shapes = [(1, h // 2, w // 2)] * B
    with torch.no_grad():
        hs = main.img_in(_pack(x))
        txt = main.txt_in(main.txt_norm(ctx))
        temb = main.time_text_embed(sigma, hs)
        rope = main.pos_embed(img_shapes, max_txt_seq_len=ctx.shape[1], device=x.device)
        c = _pack(hint) @ sd["control_img_in.weight"].T + sd["control_img_in.bias"]
        c = c @ sd["control_blocks.0.before_proj.weight"].T + sd["control_blocks.0.before_proj.bias"] + hs
        hints = []
        for block, (wa, ba) in zip(blocks, after):
            txt, c = block(hidden_states=c, encoder_hidden_states=txt, encoder_hidden_states_mask=None, temb=temb,
                           image_rotary_emb=rope)
            hints.append(c @ wa.T + ba)

        def adder(k):
            def add(mod, args, out):
                return out[0], out[1] + hints[k] * scale
            return add

        handles = [main.transformer_blocks[i].register_forward_hook(adder(k)) for k, i in enumerate(layers)]
        try:
            velocity = main(hidden_states=_pack(x), timestep=sigma, encoder_hidden_states=ctx, img_shapes=img_shapes,
                            return_dict=False)[0]
        finally:
            for hd in handles:
                hd.remove()
    return hints, velocity


# ----------------------------------------------------------------------------- file and loader


def test_tiny_file_has_the_released_layout():
    """174 tensors for 5 blocks, and each control block is exactly a diffusers double-stream block."""
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    sd = fun_state(1, blocks=5)
    assert len(sd) == 174 and sd["control_img_in.weight"].shape == (DIM, 132)
    assert [k for k in sd if "before_proj" in k] == ["control_blocks.0.before_proj.weight", "control_blocks.0.before_proj.bias"]
    block = {k[len("control_blocks.3."):]: v for k, v in sd.items()
             if k.startswith("control_blocks.3.") and "after_proj" not in k}
    QwenImageTransformerBlock(DIM, DIM // HEAD_DIM, HEAD_DIM).load_state_dict(block, strict=True)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_loader_recognises_the_fun_controlnet(tmp_path, prefix):
    from qwenimage_pack.core.keymaps.controlnet import flavour
    from qwenimage_pack.core.keymaps.detect import detect
    from qwenimage_pack.core.loading.controlnet import load_controlnet
    from qwenimage_pack.core.models.controlnet_fun import FunControlNet

    sd = fun_state(2, blocks=5)
    names = [prefix + k for k in sd]
    assert flavour(names) == "fun"
    found = detect(names, {prefix + k: tuple(v.shape) for k, v in sd.items()})
    assert (found.kind, found.detail) == ("qwen_image_controlnet", "Fun ControlNet")
    net = load_controlnet(_save(sd, tmp_path / "fun.safetensors", prefix), compute_dtype=torch.float32)
    assert isinstance(net, FunControlNet) and net.kind == "fun" and not net.is_inpaint
    assert len(net.control_blocks) == 5 and net.hint_channels == 33
    assert net.injection_layers(60) == [0, 12, 24, 36, 48]  # VideoX's control_layers for the released model
    mine = net.state_dict()
    assert sorted(mine) == sorted(sd) and all(torch.equal(mine[k], sd[k]) for k in sd)


def test_storage_dtype_is_kept(tmp_path):
    from qwenimage_pack.core.loading.controlnet import load_controlnet

    net = load_controlnet(_save(fun_state(3), tmp_path / "fun.safetensors", dtype=torch.bfloat16), compute_dtype=torch.float32)
    assert net.control_blocks[1].attn.to_q.weight.dtype == torch.bfloat16
    assert net.control_img_in.weight.dtype == torch.bfloat16


def test_bad_files_are_named(tmp_path):
    from qwenimage_pack.core.errors import WeightFileError
    from qwenimage_pack.core.loading.controlnet import load_controlnet

    def refused(sd, match, name="bad"):
        with pytest.raises(WeightFileError, match=match):
            load_controlnet(_save(sd, tmp_path / f"{name}.safetensors"))

    sd = fun_state(4)
    refused({k: v for k, v in sd.items() if "before_proj" not in k}, r"lacks 2 tensors.*before_proj", "no_before")
    refused({k: v for k, v in sd.items() if not k.startswith("control_blocks.1.attn.to_k")}, r"lacks 2 tensors.*to_k", "cut")
    odd = dict(sd, **{"control_img_in.weight": torch.zeros(DIM, 130)})
    refused(odd, r"does not describe a usable ControlNet.*130 features", "odd_in")
    narrow = fun_state(4, head_dim=32, dim=DIM)
    narrow["control_img_in.weight"], narrow["control_img_in.bias"] = torch.zeros(2 * DIM, 132), torch.zeros(2 * DIM)
    refused(narrow, r"does not describe a usable ControlNet.*width", "narrow")
    zimage = {"control_all_x_embedder.2-1.weight": torch.zeros(4, 4), "control_layers.0.after_proj.weight": torch.zeros(4, 4)}
    refused(zimage, "Z-Image Fun ControlNet", "zimage")


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def main_pair(tmp_path_factory):
    """The tiny main model (4 blocks) as diffusers and as ours (loaded from its file)."""
    from qwenimage_pack.core.loading import load

    root = tmp_path_factory.mktemp("fun_main")
    transformer = refs.tiny_transformer(seed=5, layers=4)
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, root / "tiny.safetensors")
    return transformer, load.load_mmdit(root / "tiny.safetensors", compute_dtype=torch.float32)


@pytest.mark.parametrize("full_hint", [False, True])
def test_matches_videox_algorithm(tmp_path, main_pair, full_hint):
    """Residuals and velocity against VideoX's forward; 2 blocks on 4 feed blocks 0 and 2. A batch
    of two prompts: each row's residuals follow its own text. ``full_hint``: all 33 channels set
    (mask and inpaint latent too), else the 16-channel control latent padded with zeros."""
    from qwenimage_pack.core.loading.controlnet import load_controlnet
    from qwenimage_pack.core.models.controlnet import AppliedControl

    transformer, ours = main_pair
    sd = fun_state(6)
    net = load_controlnet(_save(sd, tmp_path / "fun.safetensors"), compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    B, h, w, scale = 2, 6, 10, 0.8
    x = torch.randn(B, 16, h, w, generator=g)
    ctx = torch.randn(B, 5, refs.TEXT_HIDDEN, generator=g)
    hint = torch.randn(1, 33 if full_hint else 16, h, w, generator=g)
    hint33 = hint if full_hint else torch.cat([hint, torch.zeros(1, 17, h, w)], dim=1)
    sigma = torch.tensor([0.6, 0.6])
    layers = net.injection_layers(4)
    assert layers == [0, 2]
    want_hints, want = videox_reference(transformer, sd, x, sigma, ctx, hint33.expand(B, -1, -1, -1), scale, layers)
    with torch.no_grad():
        got_hints = net(ours, x, sigma, ctx, hint)
        control = AppliedControl(net, lambda hh, ww: hint, scale)
        got = _pack(ours(x, sigma, ctx, control=control.hook(ours, x, sigma, ctx, None, 0, 1)))
        plain = _pack(ours(x, sigma, ctx))
    for a, b in zip(got_hints, want_hints):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_odd_latent_pads_the_hint_with_zeros(main_pair):
    """An odd latent: the image tokens pad circularly (the model's rule), the hint with zeros."""
    from qwenimage_pack.core.models.controlnet_fun import FunControlNet

    net = FunControlNet(num_blocks=1, dim=DIM, num_attention_heads=DIM // HEAD_DIM, attention_head_dim=HEAD_DIM)
    hint = torch.randn(1, 16, 5, 7)
    tokens = net.pack_hint(hint, (5, 7))
    assert tokens.shape == (1, 3 * 4, 132)
    padded = torch.zeros(1, 33, 6, 8)
    padded[:, :16, :5, :7] = hint
    torch.testing.assert_close(tokens, _pack(padded))


# ----------------------------------------------------------------------------- nodes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fun_models")
    for d in ("diffusion_models", "vae", "controlnet"):
        (root / d).mkdir()
    transformer = refs.tiny_transformer(seed=8, layers=4)
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, root / "diffusion_models" / "tiny.safetensors")
    shutil.copy(root / "diffusion_models" / "tiny.safetensors", root / "diffusion_models" / "tiny_edit_2511.safetensors")
    save_file({k: v.contiguous() for k, v in refs.tiny_vae().state_dict().items()}, root / "vae" / "vae.safetensors")
    _save(fun_state(9), root / "controlnet" / "Qwen-Image-2512-Fun-Controlnet-Union-2602.safetensors")
    _save(fun_state(10, blocks=5), root / "controlnet" / "fun_five_blocks.safetensors")
    return root


@pytest.fixture(scope="module")
def nodes(files):
    from qwenimage_pack.nodes import controlnet, loaders

    with refs.models_dir(files):
        load = controlnet.QwenImageControlNetLoader().load
        return dict(
            model=loaders.QwenImageDiTLoader().load("tiny.safetensors", "default")[0],
            vae=loaders.QwenImageVAELoader().load("vae.safetensors")[0],
            fun=load("Qwen-Image-2512-Fun-Controlnet-Union-2602.safetensors")[0],
            five=load("fun_five_blocks.safetensors")[0],
        )


def _cond(seed: int, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, length, refs.TEXT_HIDDEN, generator=g), {}]]


def _image(h=32, w=32, seed=0):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _apply(nodes, pos, neg, cn="fun", strength=1.0, mask=None):
    from qwenimage_pack.nodes import controlnet

    return controlnet.QwenImageControlNetApply().apply(pos, neg, nodes[cn], nodes["vae"], _image(), strength, 0.0, 1.0, mask)


def _sample(model, pos, neg, steps=2, cfg=3.0):
    from qwenimage_pack.nodes import latents, sampling

    latent = latents.QwenImageEmptyLatent().generate(32, 32, 1)[0]
    return sampling.QwenImageSampler().run(model, pos, latent, 1, steps, cfg, "dynamic", 3.0, "euler", 1.0, neg)[0]["samples"]


def test_loader_node_and_hint(nodes):
    from qwenimage_pack.nodes import controlnet

    assert nodes["fun"].kind == "fun" and "Fun ControlNet" in nodes["fun"].describe()
    hint = controlnet.make_hint_fn(nodes["fun"], nodes["vae"], controlnet.control_pixels(_image()), None)(4, 4)
    assert hint.shape == (1, 16, 4, 4)  # the control latent; mask and inpaint channels are added as zeros


def test_each_pass_runs_with_its_own_text(nodes):
    """Positive and negative get chains of their own; the guided velocity equals true CFG over two
    controlled forwards, each with its own prompt's residuals."""
    from qwenimage_pack.core.models.controlnet import AppliedControl
    from qwenimage_pack.core.pipeline import sampling as fm
    from qwenimage_pack.nodes import controlnet, sampling

    pos, neg = _cond(11), _cond(12, 4)
    cpos, cneg = _apply(nodes, pos, neg, strength=0.7)
    assert cpos[0][1]["control"] is not cneg[0][1]["control"]
    assert cpos[0][1]["control"][0] is cneg[0][1]["control"][0]
    conds_p, conds_n = sampling._as_conds(cpos, "positive"), sampling._as_conds(cneg, "negative")
    controlnet.prepared(conds_p + conds_n, 4, 4)
    module = nodes["model"].module
    guided = sampling._Guided(module, torch.device("cpu"), conds_p, conds_n, 3.0, sigmas=torch.tensor([1.0, 0.5, 0.0]))
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(13))
    s = torch.tensor([1.0])
    ctl: AppliedControl = cpos[0][1]["control"][0]
    with torch.no_grad():
        got = guided(x, s)
        cond = module(x, s, pos[0][0], control=ctl.hook(module, x, s, pos[0][0], None, 0, 2))
        uncond = module(x, s, neg[0][0], control=ctl.hook(module, x, s, neg[0][0], None, 0, 2))
        shared = module(x, s, neg[0][0], control=ctl.hook(module, x, s, pos[0][0], None, 0, 2))
    torch.testing.assert_close(got, fm.true_cfg(cond.float(), uncond.float(), 3.0), rtol=1e-5, atol=1e-5)
    assert (uncond - shared).abs().max() > 1e-4  # the text matters: reusing the positive's residuals would differ


def test_strength_zero_equals_no_control(nodes):
    pos, neg = _cond(14), _cond(15, 3)
    plain = _sample(nodes["model"], pos, neg)
    # (the two passes run apart, not as one batch of two: equal up to the batch's rounding)
    torch.testing.assert_close(_sample(nodes["model"], *_apply(nodes, pos, neg, strength=0.0)), plain, rtol=1e-5, atol=1e-5)
    assert (_sample(nodes["model"], *_apply(nodes, pos, neg)) - plain).abs().max() > 1e-3


def test_mask_is_refused_with_what_to_do(nodes):
    with pytest.raises(ValueError, match="Fun ControlNet.*disconnect the mask"):
        _apply(nodes, _cond(1), _cond(2), mask=torch.ones(1, 32, 32))


def test_edit_2511_model_is_refused_naming_what_to_connect(files, nodes):
    from qwenimage_pack.nodes import loaders

    with refs.models_dir(files):
        edit = loaders.QwenImageDiTLoader().load("tiny_edit_2511.safetensors", "default")[0]
    assert edit.variant == "edit-2511"
    with pytest.raises(ValueError, match="Qwen-Image-Edit-2511.*connect a Qwen-Image-2512 model"):
        _sample(edit, *_apply(nodes, _cond(1), _cond(2)))


def test_more_control_blocks_than_model_blocks_is_refused(nodes):
    with pytest.raises(ValueError, match="5 control blocks but the diffusion model only 4 blocks"):
        _sample(nodes["model"], *_apply(nodes, _cond(1), _cond(2), cn="five"))


# ----------------------------------------------------------------------------- core Fun ControlNet on our MODEL


def test_core_fun_controlnet_runs_ours_on_our_mmdit(main_pair):
    """nodes/comfy_fun: ComfyUI's Fun control module (here a module with the same tensor names)
    called with our MMDiT as its base model returns our residuals at the injection blocks; with
    another base model its own forward runs. (In ComfyUI: tests/integration/test_comfyui_fun_controlnet.py.)"""
    from qwenimage_pack.core.keymaps.controlnet import fun_config
    from qwenimage_pack.core.models.controlnet_fun import FunControlNet
    from qwenimage_pack.nodes import comfy_fun

    _, ours = main_pair
    sd = fun_state(20)
    held = FunControlNet(**fun_config({k: tuple(v.shape) for k, v in sd.items()}))
    held.load_state_dict(sd)
    seen = []
    forward = comfy_fun._forward_for(held, lambda *a, **k: seen.append(k["base_model"]) or "theirs", {})
    g = torch.Generator().manual_seed(21)
    x, ctx, hint = torch.randn(2, 16, 1, 4, 6, generator=g), torch.randn(2, 5, refs.TEXT_HIDDEN, generator=g), torch.randn(2, 16, 1, 4, 6, generator=g)
    sigma = torch.tensor([0.3, 0.3])
    with torch.no_grad():
        got = forward(x, sigma, ctx, hint=hint, base_model=ours)["input"]
        want = held(ours, x, sigma, ctx, hint)
    assert len(got) == 4 and got[1] is None and got[3] is None
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[2], want[1])
    other = object()
    assert forward(x, sigma, ctx, hint=hint, base_model=other) == "theirs" and seen == [other]
