"""The union control LoRA graph against diffusers, same tiny weights (fp32).

ComfyUI's template `image_qwen_image_union_control_lora`: the DiffSynth union LoRA on plain
Qwen-Image, the control map VAE-encoded and attached as a reference latent to the positive and
the negative prompt, the output made at the control image's size. Ours runs the loader nodes ->
Load Qwen-Image LoRA (the file in DiffSynth's own key layout) -> Qwen-Image Text Encode ->
Qwen-Image Control Reference -> Qwen-Image Sampler -> VAE Decode.

The reference is diffusers' QwenImageEditPipeline, which appends a reference image's latent after
the target tokens exactly so (frame index 1, same timestep), with the LoRA loaded by
``load_lora_weights`` (PEFT) and fused, and the text-to-image prompt embeddings of
QwenImagePipeline.encode_prompt (the union LoRA uses the plain template, no vision tokens). The
edit pipeline's 1-megapixel resize is pointed at the control image's own size, which the template
keeps.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import references as refs

pytest.importorskip("diffusers")
pytest.importorskip("peft")

PROMPT = "A knight in ornate armour in a misty forest, oil painting"
LORA = "qwen_image_union_diffsynth_lora.safetensors"
STYLE_LORA = "illustration-1.0-qwen-image.safetensors"
DIFFSYNTH_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                     "attn.to_out.0", "attn.to_add_out", "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1")


def _union_lora(transformer, rank=16, seed=40) -> dict:
    """DiffSynth's layout: transformer_blocks.N.<module>.lora_A/B.default.weight, no alpha."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(transformer.named_modules())
    sd = {}
    for i in range(transformer.config.num_layers):
        for m in DIFFSYNTH_MODULES:
            lin = mods[f"transformer_blocks.{i}.{m}"]
            sd[f"transformer_blocks.{i}.{m}.lora_A.default.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.08
            sd[f"transformer_blocks.{i}.{m}.lora_B.default.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.08
    return sd


def _control_pil(w, h, seed=5):
    """A canny-like map: thin white edges on black."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    for _ in range(6):
        if rng.random() < 0.5:
            img[int(rng.integers(0, h)), :, :] = 255
        else:
            img[:, int(rng.integers(0, w)), :] = 255
    y, x = np.mgrid[0:h, 0:w]
    img[((x - w / 2) ** 2 + (y - h / 2) ** 2 - (min(w, h) / 3) ** 2).__abs__() < min(w, h) / 2] = 255
    return Image.fromarray(img, "RGB")


def _image(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0)[None]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    root = tmp_path_factory.mktemp("models")
    transformer, vae, text_encoder = refs.tiny_transformer(), refs.tiny_vae(), refs.tiny_text_encoder()
    refs.write_model_files(root, tokenizer_dir, transformer, vae, text_encoder)
    (root / "loras").mkdir()
    save_file(_union_lora(transformer), root / "loras" / LORA)
    save_file(_union_lora(transformer, seed=41), root / "loras" / STYLE_LORA)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    t2i = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**refs.QWEN_SCHEDULER), vae=vae,
                            text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    with torch.no_grad():
        embeds = {"": t2i.encode_prompt(PROMPT, device="cpu"), "neg": t2i.encode_prompt(" ", device="cpu")}
    return root, dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer), embeds


@pytest.fixture(scope="module")
def graph(setup):
    from qwenimage_pack.nodes import conditioning, loaders, lora

    root = setup[0]
    with refs.models_dir(root):
        base = loaders.QwenImageDiTLoader().load(refs.DIT_FILE, "default")[0]
        model = lora.QwenImageLoraLoader().apply(base, LORA, 1.0)[0]
        style = lora.QwenImageLoraLoader().apply(base, STYLE_LORA, 1.0)[0]
        te = loaders.QwenImageTextEncoderLoader().load(refs.TEXT_ENCODER_FILE)[0]
        vae = loaders.QwenImageVAELoader().load(refs.VAE_FILE)[0]
    encode = conditioning.QwenImageTextEncode().encode
    return dict(root=root, base=base, model=model, style=style, vae=vae, pos=encode(te, PROMPT)[0],
                neg=encode(te, " ")[0])


def _sample(graph, model, pos, neg, latent, seed, steps, cfg):
    from qwenimage_pack.nodes import sampling

    return sampling.QwenImageSampler().run(model, pos, latent, seed, steps, cfg, "dynamic", 3.0, "euler", 1.0, neg)[0]


def run_nodes(graph, control, seed, steps, cfg, model="model"):
    from qwenimage_pack.nodes import conditioning, latents

    pos, neg, latent = conditioning.QwenImageControlReference().apply(graph["pos"], graph["neg"], graph["vae"], control)
    out = _sample(graph, graph[model], pos, neg if cfg > 1 else None, latent, seed, steps, cfg)
    return latents.QwenImageVAEDecode().decode(graph["vae"], out)[0]


def run_reference(setup, monkeypatch, pil, seed, steps, cfg):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as dp_edit
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    root, parts, embeds = setup
    w, h = pil.size
    # The template keeps the control image's size; the edit pipeline would resize it to ~1 MP.
    monkeypatch.setattr(dp_edit, "calculate_dimensions", lambda area, ratio: (w, h, None))
    pipe = QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**refs.QWEN_SCHEDULER), vae=parts["vae"],
                                 text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], processor=None,
                                 transformer=copy.deepcopy(parts["transformer"]))
    pipe.load_lora_weights(str(root / "loras" / LORA))
    pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    (pe, pm), (ne, nm) = embeds[""], embeds["neg"]
    negative = dict(negative_prompt_embeds=ne, negative_prompt_embeds_mask=nm) if cfg > 1 else {}
    with torch.no_grad():
        images = pipe(image=pil, prompt_embeds=pe, prompt_embeds_mask=pm, **negative, true_cfg_scale=cfg,
                      height=h, width=w, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                      output_type="pt").images
    return images.permute(0, 2, 3, 1)


@pytest.mark.parametrize("w,h,seed,steps,cfg", [(96, 64, 42, 3, 2.5), (64, 80, 7, 2, 1.0)], ids=["cfg2.5", "cfg1"])
def test_union_lora_with_control_reference_matches_diffusers(setup, graph, monkeypatch, w, h, seed, steps, cfg):
    pil = _control_pil(w, h)
    ours = run_nodes(graph, _image(pil), seed, steps, cfg)
    ref = run_reference(setup, monkeypatch, pil, seed, steps, cfg)
    assert ours.shape == ref.shape == (1, h, w, 3)
    err = (ours - ref).abs().max().item()
    print(f"max abs error {err:.2e}")
    assert err <= 1e-3
    # the LoRA and the control image both matter, far beyond the tolerance (the tiny random model
    # attends weakly to the reference tokens: another control image moves pixels by ~4e-3)
    assert (run_nodes(graph, _image(pil), seed, steps, cfg, model="style") - ref).abs().max().item() > 1e-2
    other = torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(9))
    assert (run_nodes(graph, other, seed, steps, cfg) - ref).abs().max().item() > max(2e-3, 100 * err)


@pytest.mark.parametrize("five_d", [False, True], ids=["4d", "5d"])
def test_core_reference_latent_gives_the_same_result(graph, five_d):
    """ComfyUI's VAEEncode -> ReferenceLatent (conditioning_set_values(..., append=True)) on both prompts,
    its 5-D latent included, samples the same as Qwen-Image Control Reference."""
    from qwenimage_pack.nodes import conditioning, latents

    control = _image(_control_pil(64, 48))
    pos, neg, latent = conditioning.QwenImageControlReference().apply(graph["pos"], graph["neg"], graph["vae"], control)
    z = latents.QwenImageVAEEncode().encode(graph["vae"], control)[0]["samples"]
    assert torch.equal(pos[0][1]["reference_latents"][0], z) and torch.equal(neg[0][1]["reference_latents"][0], z)
    ref = z[:, :, None] if five_d else z

    def reference_latent(cond):  # ComfyUI's node_helpers.conditioning_set_values with append=True
        return [[t, {**d, "reference_latents": (d.get("reference_latents") or []) + [ref]}] for t, d in cond]

    a = _sample(graph, graph["model"], pos, neg, latent, 3, 2, 2.0)["samples"]
    b = _sample(graph, graph["model"], reference_latent(graph["pos"]), reference_latent(graph["neg"]),
                {"samples": z}, 3, 2, 2.0)["samples"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert "reference_latents" not in graph["pos"][0][1]  # the input conditioning is not changed


def test_control_reference_sizes_follow_the_control_image(graph):
    from qwenimage_pack.nodes import conditioning

    node = conditioning.QwenImageControlReference()
    img = torch.rand(2, 61, 90, 3)  # a batch, odd sides: centre-cropped to multiples of 8 (56 x 88)
    pos, neg, latent = node.apply(graph["pos"], graph["neg"], graph["vae"], img)
    assert latent["samples"].shape == (2, 16, 7, 11) and not latent["samples"].any()
    assert pos[0][1]["reference_latents"][0].shape == (2, 16, 7, 11)
    cropped = node.apply(graph["pos"], graph["neg"], graph["vae"], img[:, 2:58, 1:89].contiguous())[0]
    torch.testing.assert_close(cropped[0][1]["reference_latents"][0], pos[0][1]["reference_latents"][0])
    # an edit conditioning keeps its own references; the control image is appended after them
    twice = node.apply(pos, neg, graph["vae"], img)[0]
    assert len(twice[0][1]["reference_latents"]) == 2
    gray_alpha = node.apply(graph["pos"], graph["neg"], graph["vae"], torch.rand(1, 32, 32, 4))[2]
    assert gray_alpha["samples"].shape == (1, 16, 4, 4)
    with pytest.raises(ValueError, match="at least 16x16"):
        node.apply(graph["pos"], graph["neg"], graph["vae"], torch.rand(1, 8, 64, 3))
    with pytest.raises(ValueError, match="positive conditioning is empty"):
        node.apply([], graph["neg"], graph["vae"], img)


def test_union_lora_without_control_image_names_what_to_connect(graph, caplog):
    from qwenimage_pack.nodes import conditioning, latents

    empty = latents.QwenImageEmptyLatent().generate(64, 48, 1)[0]
    for cfg, neg in ((1.0, None), (2.0, graph["neg"])):
        with pytest.raises(ValueError) as e:
            _sample(graph, graph["model"], graph["pos"], neg, empty, 1, 1, cfg)
        message = str(e.value)
        assert LORA in message and "Qwen-Image Control Reference" in message and "ReferenceLatent" in message
    # the same file without a union name, and the model without it, sample as usual
    _sample(graph, graph["style"], graph["pos"], None, empty, 1, 1, 1.0)
    _sample(graph, graph["base"], graph["pos"], None, empty, 1, 1, 1.0)
    # control image on the positive only, with a negative in use: a notice, not an error
    control = _image(_control_pil(64, 48))
    pos, _, latent = conditioning.QwenImageControlReference().apply(graph["pos"], graph["neg"], graph["vae"], control)
    with caplog.at_level(logging.WARNING):
        _sample(graph, graph["model"], pos, graph["neg"], latent, 1, 1, 2.0)
    assert any("positive conditioning only" in r.getMessage() for r in caplog.records)


def test_union_lora_at_strength_zero_needs_no_control_image(graph):
    from qwenimage_pack.nodes import latents, lora

    with refs.models_dir(graph["root"]):
        off = lora.QwenImageLoraLoader().apply(graph["base"], LORA, 0.0)[0]
    empty = latents.QwenImageEmptyLatent().generate(32, 32, 1)[0]
    _sample(graph, off, graph["pos"], None, empty, 1, 1, 1.0)


def test_core_sampler_path_checks_the_control_image(graph, caplog):
    """'Qwen-Image as ComfyUI MODEL' + KSampler: the bridge runs the same check on the guider's
    conditionings (ComfyUI's converted dicts in ``guider.conds``) before the sampler starts."""
    from types import SimpleNamespace

    from qwenimage_pack.nodes import comfy_model

    def guider(positive_ref: bool, negative_ref: bool, cfg: float):
        ref = {"reference_latents": [torch.zeros(1, 16, 1, 6, 8)]}
        entry = lambda with_ref: {"cross_attn": torch.zeros(1, 3, 8), **(ref if with_ref else {})}  # noqa: E731
        return SimpleNamespace(conds={"positive": [entry(positive_ref)], "negative": [entry(negative_ref)]}, cfg=cfg)

    for cfg in (1.0, 4.0):
        with pytest.raises(ValueError) as e:
            comfy_model.union_control_check(graph["model"], guider(False, True, cfg))
        assert LORA in str(e.value) and "Qwen-Image Control Reference" in str(e.value)
    comfy_model.union_control_check(graph["style"], guider(False, False, 4.0))  # no union LoRA: nothing to check
    with caplog.at_level(logging.WARNING):
        comfy_model.union_control_check(graph["model"], guider(True, False, 1.0))  # cfg 1: the negative is not run
    assert not any("positive conditioning only" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.WARNING):
        comfy_model.union_control_check(graph["model"], guider(True, False, 4.0))
    assert any("positive conditioning only" in r.getMessage() for r in caplog.records)
