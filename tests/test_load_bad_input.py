"""Files users put in the wrong place, or that are damaged: every loader must refuse them with a
message that names the file and says what it is / what was expected, never unpickle anything,
and never leave a half-built model behind."""
from __future__ import annotations

import gc
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qwenimage_pack.core.models.mmdit import QwenImageMMDiT
from qwenimage_pack.core.encoders.text_encoder import QwenTextEncoder
from qwenimage_pack.core.encoders.vae import WanVAE
from qwenimage_pack.core.errors import WeightFileError
from qwenimage_pack.core.loading.load import inspect_file, load_mmdit, load_text_encoder, load_vae

# ------------------------------------------------------------------ tiny files of each kind


def mmdit_state(layers: int = 1, dim: int = 64, head: int = 32, joint: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    sd = {
        "img_in.weight": r(dim, 64), "img_in.bias": r(dim),
        "txt_norm.weight": torch.ones(joint),
        "txt_in.weight": r(dim, joint), "txt_in.bias": r(dim),
        "time_text_embed.timestep_embedder.linear_1.weight": r(dim, 256),
        "time_text_embed.timestep_embedder.linear_1.bias": r(dim),
        "time_text_embed.timestep_embedder.linear_2.weight": r(dim, dim),
        "time_text_embed.timestep_embedder.linear_2.bias": r(dim),
        "norm_out.linear.weight": r(2 * dim, dim), "norm_out.linear.bias": r(2 * dim),
        "proj_out.weight": r(64, dim), "proj_out.bias": r(64),
    }
    for i in range(layers):
        b = f"transformer_blocks.{i}."
        for m in ("img_mod.1", "txt_mod.1"):
            sd[b + m + ".weight"], sd[b + m + ".bias"] = r(6 * dim, dim), r(6 * dim)
        for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            sd[b + "attn." + m + ".weight"], sd[b + "attn." + m + ".bias"] = r(dim, dim), r(dim)
        for m in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            sd[b + "attn." + m + ".weight"] = torch.ones(head)
        for m in ("img_mlp", "txt_mlp"):
            sd[b + m + ".net.0.proj.weight"], sd[b + m + ".net.0.proj.bias"] = r(4 * dim, dim), r(4 * dim)
            sd[b + m + ".net.2.weight"], sd[b + m + ".net.2.bias"] = r(dim, 4 * dim), r(dim)
    return sd


def text_state() -> dict[str, torch.Tensor]:
    h, kv, inter = 256, 128, 64
    sd = {"model.embed_tokens.weight": torch.zeros(50, h), "model.norm.weight": torch.ones(h),
          "lm_head.weight": torch.zeros(50, h), "visual.blocks.0.attn.qkv.weight": torch.zeros(24, 8)}
    p = "model.layers.0."
    sd.update({p + "self_attn.q_proj.weight": torch.zeros(h, h), p + "self_attn.q_proj.bias": torch.zeros(h),
               p + "self_attn.k_proj.weight": torch.zeros(kv, h), p + "self_attn.k_proj.bias": torch.zeros(kv),
               p + "self_attn.v_proj.weight": torch.zeros(kv, h), p + "self_attn.v_proj.bias": torch.zeros(kv),
               p + "self_attn.o_proj.weight": torch.zeros(h, h),
               p + "mlp.gate_proj.weight": torch.zeros(inter, h), p + "mlp.up_proj.weight": torch.zeros(inter, h),
               p + "mlp.down_proj.weight": torch.zeros(h, inter),
               p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h)})
    return sd


def wan_vae_state() -> dict[str, torch.Tensor]:
    return {"encoder.conv1.weight": torch.zeros(8, 3, 3, 3, 3), "encoder.conv1.bias": torch.zeros(8),
            "encoder.downsamples.0.residual.0.gamma": torch.ones(8, 1, 1, 1),
            "conv1.weight": torch.zeros(32, 32, 1, 1, 1), "conv2.weight": torch.zeros(16, 16, 1, 1, 1),
            "decoder.conv1.weight": torch.zeros(32, 16, 3, 3, 3),
            "decoder.upsamples.0.residual.0.gamma": torch.ones(32, 1, 1, 1)}


FLUX = {"img_in.weight": torch.zeros(8, 64), "txt_in.weight": torch.zeros(8, 16),
        "double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8),
        "double_blocks.0.txt_mod.lin.weight": torch.zeros(48, 8),
        "single_blocks.0.linear1.weight": torch.zeros(40, 8), "final_layer.linear.weight": torch.zeros(64, 8)}
SDXL = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 16),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(8, 8),
        "first_stage_model.encoder.down.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3)}


def save(sd: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def live_models() -> list:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, (QwenImageMMDiT, QwenTextEncoder, WanVAE))]


@pytest.fixture(autouse=True)
def no_model_survives():
    assert live_models() == []
    yield
    assert live_models() == [], "a failed load left a model referenced"


def refuse(loader, path, *words, **kw) -> str:
    with pytest.raises(WeightFileError) as info:
        loader(path, **kw)
    msg = str(info.value)
    assert str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


# ------------------------------------------------------------------ wrong model


def test_flux_file_in_mmdit_loader(tmp_path):
    path = save(FLUX, tmp_path / "flux1-dev.safetensors")
    refuse(load_mmdit, path, "Flux", "Qwen-Image", "qwen_image_bf16.safetensors")
    assert inspect_file(path).kind == "flux"


def test_sdxl_checkpoint_in_mmdit_loader(tmp_path):
    path = save(SDXL, tmp_path / "sd_xl_base_1.0.safetensors")
    refuse(load_mmdit, path, "Stable Diffusion XL", "Qwen-Image MMDiT")


def test_text_encoder_in_mmdit_loader_and_back(tmp_path):
    te = save(text_state(), tmp_path / "qwen_2.5_vl_7b.safetensors")
    refuse(load_mmdit, te, "text encoder", "text-encoder loader")
    dit = save(mmdit_state(), tmp_path / "qwen_image_bf16.safetensors")
    refuse(load_text_encoder, dit, "diffusion model", "diffusion-model loader")
    refuse(load_vae, dit, "diffusion model", "VAE")


def test_vae_in_mmdit_and_text_loaders(tmp_path):
    vae = save(wan_vae_state(), tmp_path / "qwen_image_vae.safetensors")
    refuse(load_mmdit, vae, "VAE", "VAE loader")
    refuse(load_text_encoder, vae, "VAE", "VAE loader")


def test_unknown_file(tmp_path):
    path = save({"foo.weight": torch.zeros(2, 2)}, tmp_path / "mystery.safetensors")
    refuse(load_mmdit, path, "not a model this pack recognises", "foo.weight")


# ------------------------------------------------------------------ damaged / not safetensors


def test_missing_file(tmp_path):
    refuse(load_mmdit, tmp_path / "nope.safetensors", "does not exist")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "qwen_image_bf16.safetensors"
    path.write_bytes(b"")
    refuse(load_mmdit, path, "empty", "0 bytes")


def test_truncated_file(tmp_path):
    path = save(mmdit_state(), tmp_path / "qwen_image_bf16.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    refuse(load_mmdit, path, "truncated")
    # Cut inside the header as well.
    path.write_bytes(data[:100])
    refuse(load_mmdit, path, "truncated")


def test_invalid_header_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = b"{not json" + b" " * 7
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    refuse(load_vae, path, "not valid JSON")


def test_web_page_and_lfs_pointer(tmp_path):
    html = tmp_path / "qwen_image_vae.safetensors"
    html.write_bytes(b"<!DOCTYPE html><html><body>Access denied</body></html>")
    refuse(load_vae, html, "web page")
    lfs = tmp_path / "qwen_image_bf16.safetensors"
    lfs.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 40860000000\n")
    refuse(load_mmdit, lfs, "Git LFS")


class _Trap:
    """Unpickling this object creates a file: proof that a loader ran the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_ckpt_refused(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "qwen_image.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": _Trap(marker)}, protocol=4))
    refuse(load_mmdit, path, "pickle", "safetensors")
    assert not marker.exists()


def test_pickle_renamed_safetensors_not_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "qwen_image_bf16.safetensors"
    path.write_bytes(pickle.dumps({"txt_norm.weight": _Trap(marker)}, protocol=2))
    refuse(load_mmdit, path, "pickle", "safetensors")
    refuse(load_text_encoder, path, "pickle")
    with pytest.raises(WeightFileError):
        inspect_file(path)
    assert not marker.exists()

    zipped = tmp_path / "torch_save_renamed.safetensors"
    torch.save({"txt_norm.weight": torch.zeros(2)}, str(zipped))  # zip container around a pickle
    refuse(load_vae, zipped, "pickle")


# ------------------------------------------------------------------ folders


def test_directory_without_index(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    refuse(load_mmdit, folder, "without a safetensors index")
    torch.save({}, str(folder / "diffusion_pytorch_model.bin"))
    refuse(load_mmdit, folder, "pickle")


def test_pipeline_folder_without_the_component(tmp_path):
    pipeline = tmp_path / "Qwen-Image"
    (pipeline / "transformer").mkdir(parents=True)
    (pipeline / "text_encoder").mkdir()
    refuse(load_vae, pipeline, "pipeline folder", "vae/")


def test_sharded_folder_with_missing_shard(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    sd = mmdit_state()
    names = sorted(sd)
    half = len(names) // 2
    save({k: sd[k] for k in names[:half]}, folder / "diffusion_pytorch_model-00001-of-00002.safetensors")
    weight_map = {k: ("diffusion_pytorch_model-00001-of-00002.safetensors" if i < half
                      else "diffusion_pytorch_model-00002-of-00002.safetensors") for i, k in enumerate(names)}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    msg = refuse(load_mmdit, folder, "missing")
    assert "00002-of-00002" in msg


# ------------------------------------------------------------------ content problems


def test_unsupported_comfy_quant_format(tmp_path):
    sd = mmdit_state()
    layer = "transformer_blocks.0.attn.to_q"
    sd[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "nvfp8_future"}'), dtype=torch.uint8)
    sd[layer + ".weight_scale"] = torch.ones(())
    path = save(sd, tmp_path / "qwen_image_future.safetensors")
    refuse(load_mmdit, path, "nvfp8_future", layer, "not support", "nvfp4", "int8_tensorwise")


def test_comfy_quant_layer_that_does_not_fit_its_format(tmp_path):
    """A layer marked nvfp4 whose weight is not nvfp4's packed [out, in/2] uint8."""
    sd = mmdit_state()
    layer = "transformer_blocks.0.attn.to_q"
    sd[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    sd[layer + ".weight_scale"] = torch.ones(())
    path = save(sd, tmp_path / "qwen_image_nvfp4.safetensors")
    refuse(load_mmdit, path, layer, "nvfp4", "does not fit")


def test_missing_and_unexpected_tensors(tmp_path):
    sd = mmdit_state()
    del sd["transformer_blocks.0.attn.to_k.weight"]
    path = save(sd, tmp_path / "cut.safetensors")
    refuse(load_mmdit, path, "transformer_blocks.0.attn.to_k.weight")

    sd = mmdit_state()
    sd["transformer_blocks.0.attn.extra_thing.weight"] = torch.zeros(2, 2)
    path = save(sd, tmp_path / "extra.safetensors")
    refuse(load_mmdit, path, "extra_thing", "not part of")


def test_config_shape_mismatch(tmp_path):
    path = save(mmdit_state(), tmp_path / "qwen_image_bf16.safetensors")
    refuse(load_mmdit, path, "shape", config={"joint_attention_dim": 40})


def test_failure_while_streaming_frees_the_model(tmp_path):
    """The model is built and half filled when a tensor turns out bad: nothing may survive."""
    sd = mmdit_state(layers=2)
    sd["transformer_blocks.1.img_mlp.net.2.weight"][0, 0] = float("inf")
    path = save(sd, tmp_path / "qwen_image_bf16.safetensors")
    refuse(load_mmdit, path, "inf or NaN", weight_dtype="fp8_e4m3fn")


def test_bad_arguments_are_value_errors(tmp_path):
    path = save(mmdit_state(), tmp_path / "qwen_image_bf16.safetensors")
    with pytest.raises(ValueError, match="weight_dtype"):
        load_mmdit(path, weight_dtype="int4")
    with pytest.raises(ValueError, match="compute_dtype"):
        load_mmdit(path, compute_dtype="int8")
