"""Node-level handling of what users actually type, pick and connect."""
from __future__ import annotations

import logging

import pytest
import torch

from qwenimage_pack.nodes import latents, loaders, runtime, sampling
from qwenimage_pack.nodes.handles import variant_from_name


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.MODELS_DIR_ENV, str(tmp_path))
    return tmp_path


def test_listing_shows_what_we_load_and_hides_pickles_and_shards(models_dir):
    d = models_dir / "diffusion_models"
    (d / "sub").mkdir(parents=True)
    for name in ("qwen_image_bf16.safetensors", "qwen-image-Q4_K_M.gguf", "sub/other.sft", "old.ckpt", "weights.pt", "notes.txt"):
        (d / name).write_bytes(b"x")
    pipe = d / "Qwen-Image" / "transformer"
    pipe.mkdir(parents=True)
    for name in ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors",
                 "diffusion_pytorch_model.safetensors.index.json", "config.json"):
        (pipe / name).write_bytes(b"{}")
    (models_dir / "unet").mkdir()
    (models_dir / "unet" / "legacy.safetensors").write_bytes(b"x")
    listed = runtime.list_model_files("diffusion_models")
    assert listed == sorted(["Qwen-Image/transformer", "legacy.safetensors", "qwen-image-Q4_K_M.gguf",
                             "qwen_image_bf16.safetensors", "sub/other.sft"], key=str.lower)
    assert runtime.resolve_model_file("diffusion_models", "Qwen-Image/transformer") == pipe
    assert "qwen-image-Q4_K_M.gguf" not in runtime.list_model_files("diffusion_models", gguf=False)


def test_missing_file_message_names_the_folder(models_dir):
    with pytest.raises(FileNotFoundError, match="diffusion_models"):
        runtime.resolve_model_file("diffusion_models", "nope.safetensors")


def test_placeholder_choice_explains_where_files_go(models_dir):
    choices = loaders.QwenImageDiTLoader.INPUT_TYPES()["required"]["model_name"][0]
    assert choices == ["(no files in models/diffusion_models)"]
    with pytest.raises(FileNotFoundError, match="models/diffusion_models"):
        loaders.QwenImageDiTLoader().load(choices[0], "default")


def test_wrong_model_in_loader_is_a_clear_error(models_dir):
    from safetensors.torch import save_file

    (models_dir / "diffusion_models").mkdir()
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4), "single_blocks.0.linear1.weight": torch.zeros(4, 4)},
              models_dir / "diffusion_models" / "flux1-dev.safetensors")
    with pytest.raises(ValueError, match="(?i)flux") as err:
        loaders.QwenImageDiTLoader().load("flux1-dev.safetensors", "default")
    assert "flux1-dev.safetensors" in str(err.value)


@pytest.mark.parametrize("name,variant", [
    ("qwen_image_bf16.safetensors", "qwen-image"), ("qwen_image_2512_fp8_e4m3fn.safetensors", "qwen-image"),
    ("qwen_image_edit_fp8_e4m3fn.safetensors", "edit"), ("Qwen-Image-Edit-2509-Q4_K_M.gguf", "edit-2509"),
    ("qwen_image_edit_2511_bf16.safetensors", "edit-2511"),
])
def test_variant_from_file_name(name, variant):
    assert variant_from_name(name) == variant


def test_empty_latent_sizes_presets_and_rounding(caplog):
    node = latents.QwenImageEmptyLatent()
    out = node.generate(1328, 1328, 2)[0]["samples"]
    assert out.shape == (2, 16, 166, 166) and not out.any()
    assert node.generate(64, 64, 1, "16:9 (1664x928)")[0]["samples"].shape == (1, 16, 116, 208)
    with caplog.at_level(logging.WARNING, logger="qwenimage"):
        out = node.generate(1000, 770, 1)[0]["samples"]
    assert out.shape == (1, 16, 96, 126)  # 1008 x 768
    assert "multiple of 16" in caplog.text
    with pytest.raises(ValueError, match="aspect_ratio"):
        node.generate(64, 64, 1, "5:4")


def test_image_inputs_are_normalised():
    rgba = torch.rand(1, 20, 24, 4)
    assert latents.image_to_vae_input(rgba).shape == (1, 3, 20, 24)
    gray = torch.rand(2, 16, 16, 1)
    out = latents.image_to_vae_input(gray)
    assert out.shape == (2, 3, 16, 16) and torch.equal(out[:, 0], out[:, 2])
    assert latents.image_to_vae_input(torch.ones(1, 8, 8, 3)).max() == 1.0
    with pytest.raises(ValueError, match="at least 8x8"):
        latents.image_to_vae_input(torch.rand(1, 1, 1, 3))
    with pytest.raises(ValueError, match="channels"):
        latents.image_to_vae_input(torch.rand(1, 16, 16, 2))


class _Echo(torch.nn.Module):
    """Stands in for the MMDiT: the velocity is a fixed function of its inputs."""

    class config:
        joint_attention_dim = 8

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, sigma, context, **kw):
        self.calls.append((x.shape[0], context.shape[1], kw.get("context_mask")))
        return x * 0.5 + context.mean() * self.w


def _handle(module):
    from qwenimage_pack.nodes.handles import DiffusionModel

    return DiffusionModel(module=module, name="echo", variant="qwen-image", weight_format="float32")


def test_sampler_rejects_foreign_latents_and_conditioning():
    model = _handle(_Echo())
    cond = [[torch.zeros(1, 3, 8), {}]]
    with pytest.raises(ValueError, match="16"):
        sampling.sample(model, cond, {"samples": torch.zeros(1, 4, 8, 8)}, 0, 2, 1.0)
    with pytest.raises(ValueError, match="text encoder"):
        sampling.sample(model, [[torch.zeros(1, 3, 4096), {}]], {"samples": torch.zeros(1, 16, 8, 8)}, 0, 2, 1.0)
    with pytest.raises(ValueError, match="empty"):
        sampling.sample(model, [], {"samples": torch.zeros(1, 16, 8, 8)}, 0, 2, 1.0)


def test_cfg_batches_positive_and_negative_with_padding():
    module = _Echo()
    model = _handle(module)
    pos = [[torch.randn(1, 5, 8), {}]]
    neg = [[torch.randn(1, 2, 8), {}]]
    out = sampling.sample(model, pos, {"samples": torch.zeros(1, 16, 1, 8, 8)}, 0, 2, 4.0, negative=neg)
    assert out["samples"].shape == (1, 16, 1, 8, 8)  # 5-D in, 5-D out
    assert all(b == 2 and length == 5 and mask is not None for b, length, mask in module.calls)


def test_cfg_without_negative_warns_and_runs_once(caplog):
    module = _Echo()
    with caplog.at_level(logging.WARNING, logger="qwenimage"):
        sampling.sample(_handle(module), [[torch.randn(1, 3, 8), {}]], {"samples": torch.zeros(1, 16, 8, 8)}, 0, 3, 4.0)
    assert "no negative" in caplog.text and len(module.calls) == 3 and module.calls[0][0] == 1


def test_denoise_zero_returns_input_and_keeps_noise_mask():
    latent = {"samples": torch.randn(1, 16, 8, 8), "noise_mask": torch.ones(1, 64, 64)}
    out = sampling.sample(_handle(_Echo()), [[torch.randn(1, 3, 8), {}]], latent, 0, 10, 1.0, denoise=0.0)
    assert torch.equal(out["samples"], latent["samples"]) and out["noise_mask"] is latent["noise_mask"]


def test_edit_auto_variant_follows_the_connected_model(monkeypatch):
    from qwenimage_pack.nodes import edit

    seen = []
    monkeypatch.setattr(edit, "edit_conditioning", lambda te, vae, prompt, images, variant, sizing: seen.append(variant))
    node = edit.QwenImageEditEncode()
    for model_variant, expected in (("edit", "edit"), ("edit-2509", "edit-plus"), ("edit-2511", "edit-plus"), ("qwen-image", "auto")):
        node.encode(None, None, "p", torch.zeros(1, 8, 8, 3), model=_handle(_Echo()).__class__(
            module=_Echo(), name="m", variant=model_variant, weight_format="bf16"))
        assert seen[-1] == expected
    node.encode(None, None, "p", torch.zeros(1, 8, 8, 3), variant="edit")
    assert seen[-1] == "edit"
