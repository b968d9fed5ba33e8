"""load_mmdit on tiny files written in every layout users have, each loaded model checked
against diffusers' QwenImageTransformer2DModel holding the same (rounded) weights."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import references as refs
from safetensors.torch import save_file

from qwenimage_pack.core.models.mmdit import QwenImageMMDiT
from qwenimage_pack.core.layers.linear import Linear
from qwenimage_pack.core.loading.load import inspect_file, load_mmdit

diffusers = pytest.importorskip("diffusers")
from diffusers import QwenImageTransformer2DModel  # noqa: E402
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline  # noqa: E402

TINY = refs.TINY_MMDIT
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # default init leaves biases 0 and norm gains 1: make every tensor count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, 8, 10, generator=g), torch.tensor([0.6]), torch.randn(1, 7, 48, generator=g)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def with_weights(ref, sd: dict) -> QwenImageTransformer2DModel:
    other = copy.deepcopy(ref)
    other.load_state_dict({k: v.float() for k, v in sd.items()})
    return other


def run_ref(model, x, sigma, ctx) -> torch.Tensor:
    b, c, h, w = x.shape
    with torch.no_grad():
        out = model(hidden_states=QwenImagePipeline._pack_latents(x, b, c, h, w), encoder_hidden_states=ctx,
                    timestep=sigma, img_shapes=[[(1, h // 2, w // 2)]], return_dict=False)[0]
    return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]


def run_ours(model, x, sigma, ctx) -> torch.Tensor:
    with torch.no_grad():
        return model(x, sigma, ctx).float()


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def diffusers_low_precision_error(ref, inputs, dtype) -> float:
    """How far diffusers itself lands from its fp32 result when run in ``dtype``: the tiny random
    model amplifies rounding, so low-precision checks are relative to this."""
    low = copy.deepcopy(ref).to(dtype)
    x, sigma, ctx = inputs
    return rel_err(run_ref(low, x.to(dtype), sigma.to(dtype), ctx.to(dtype)), run_ref(ref, *inputs))


def is_linear_weight(name: str) -> bool:
    return name.endswith(".weight") and "norm" not in name  # every 2-D weight of the MMDiT is a Linear


def fp8_quantize(w: torch.Tensor):
    scale = w.float().abs().max() / 448.0
    return (w.float() / scale).to(FP8), scale


@pytest.mark.parametrize("prefix,dtype", [
    ("", torch.bfloat16),
    ("model.diffusion_model.", torch.float32),
    ("transformer.", torch.float32),
    ("diffusion_model.", torch.float16),
], ids=["bare-bf16", "comfy-prefix-fp32", "transformer-prefix-fp32", "diffusion_model-prefix-fp16"])
def test_single_file_layouts(ref, inputs, tmp_path, prefix, dtype):
    sd = {k: v.to(dtype) for k, v in state(ref).items()}
    path = tmp_path / "qwen_image.safetensors"
    save_file({prefix + k: v for k, v in sd.items()}, str(path))

    model = load_mmdit(path, compute_dtype=torch.float32)
    assert isinstance(model, QwenImageMMDiT) and model.config.num_layers == 2
    assert model.transformer_blocks[1].attn.to_q.weight.dtype == dtype  # stored as in the file
    assert all(p.device.type == "cpu" and not p.requires_grad for p in model.parameters())
    expected = run_ref(with_weights(ref, sd), *inputs)
    assert rel_err(run_ours(model, *inputs), expected) <= 1e-5
    summary = inspect_file(path)
    assert summary.kind == "qwen_image_mmdit" and summary.n_tensors == len(sd)
    assert summary.dtypes == {str(dtype).replace("torch.", ""): len(sd)}


def test_bf16_file_computes_in_bf16(ref, inputs, tmp_path):
    path = tmp_path / "qwen_image_bf16.safetensors"
    save_file({k: v.bfloat16() for k, v in state(ref).items()}, str(path))
    model = load_mmdit(path)
    assert model.compute_dtype == torch.bfloat16
    budget = 1.5 * diffusers_low_precision_error(ref, inputs, torch.bfloat16)
    assert rel_err(run_ours(model, *inputs), run_ref(ref, *inputs)) <= budget


def test_plain_fp8_cast_file(ref, inputs, tmp_path):
    """qwen_image_fp8_e4m3fn.safetensors: weights cast to fp8 without scales."""
    sd = {k: (v.to(FP8) if is_linear_weight(k) else v.bfloat16()) for k, v in state(ref).items()}
    path = tmp_path / "qwen_image_fp8_e4m3fn.safetensors"
    save_file(sd, str(path))
    model = load_mmdit(path, compute_dtype=torch.float32)
    k = model.transformer_blocks[0].attn.to_k
    assert k.weight.dtype == FP8 and k.weight_scale is None
    assert model.proj_out.weight.dtype == FP8 and model.proj_out.bias.dtype == torch.float32
    assert rel_err(run_ours(model, *inputs), run_ref(with_weights(ref, sd), *inputs)) <= 1e-5


def test_fp8_scaled_file(ref, inputs, tmp_path):
    """ComfyUI 'scaled fp8': <layer>.scale_weight, <layer>.scale_input, marker 'scaled_fp8'."""
    out, dequantized = {}, {}
    for k, v in state(ref).items():
        if is_linear_weight(k):
            q, s = fp8_quantize(v)
            layer = k[: -len(".weight")]
            out[k], out[layer + ".scale_weight"], out[layer + ".scale_input"] = q, s.reshape(()), torch.ones(())
            dequantized[k] = q.float() * s
        else:
            out[k] = dequantized[k] = v.bfloat16()
    out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    path = tmp_path / "qwen_image_fp8_scaled.safetensors"
    save_file({"model.diffusion_model." + k if k != "scaled_fp8" else k: v for k, v in out.items()}, str(path))

    model = load_mmdit(path, compute_dtype=torch.float32)
    lin = model.transformer_blocks[1].txt_mod[1]
    assert isinstance(lin, Linear) and lin.weight.dtype == FP8 and lin.weight_scale is not None
    assert rel_err(run_ours(model, *inputs), run_ref(with_weights(ref, dequantized), *inputs)) <= 1e-5
    assert "scaled fp8" in inspect_file(path).layout

    # Asking for fp8 again keeps the file's scales instead of quantizing twice.
    again = load_mmdit(path, weight_dtype="fp8_e4m3fn", compute_dtype=torch.float32)
    assert torch.equal(again.transformer_blocks[1].txt_mod[1].weight_scale, lin.weight_scale)


def test_comfy_quant_file(ref, inputs, tmp_path):
    """Newer ComfyUI files: <layer>.comfy_quant (JSON bytes) + <layer>.weight_scale."""
    conf = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    out, dequantized = {}, {}
    for i, (k, v) in enumerate(state(ref).items()):
        if is_linear_weight(k) and k.startswith("transformer_blocks."):
            q, s = fp8_quantize(v)
            layer = k[: -len(".weight")]
            # One layer keeps its fp8 bytes in a uint8 container, as some writers do.
            out[k] = q.view(torch.uint8) if i % 7 == 0 else q
            out[layer + ".weight_scale"], out[layer + ".comfy_quant"] = s.reshape(()), conf.clone()
            out[layer + ".input_scale"] = torch.ones(())
            dequantized[k] = q.float() * s
        else:
            out[k] = dequantized[k] = v.bfloat16()
    assert any(v.dtype == torch.uint8 and k.endswith(".weight") for k, v in out.items())
    path = tmp_path / "qwen_image_comfy_quant.safetensors"
    save_file(out, str(path))
    model = load_mmdit(path, compute_dtype=torch.float32)
    assert all(b.attn.to_v.weight.dtype == FP8 for b in model.transformer_blocks)
    assert rel_err(run_ours(model, *inputs), run_ref(with_weights(ref, dequantized), *inputs)) <= 1e-5


def test_diffusers_sharded_folder(ref, inputs, tmp_path):
    pipeline = tmp_path / "Qwen-Image"
    ref.save_pretrained(pipeline / "transformer", max_shard_size="150KB")
    (pipeline / "vae").mkdir()
    (pipeline / "text_encoder").mkdir()
    folder = pipeline / "transformer"
    assert len(list(folder.glob("*.safetensors"))) >= 2
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (folder / "config.json").is_file()

    expected = run_ref(ref, *inputs)
    for target in (pipeline, folder):
        model = load_mmdit(target)
        assert model.config.axes_dims_rope == (4, 14, 14)
        assert rel_err(run_ours(model, *inputs), expected) <= 1e-5
    summary = inspect_file(pipeline, component="transformer")
    assert summary.kind == "qwen_image_mmdit" and "shards" in summary.layout


def test_weight_dtype_conversions(ref, inputs, tmp_path):
    fp32_path = tmp_path / "fp32.safetensors"
    bf16_path = tmp_path / "bf16.safetensors"
    sd = state(ref)
    save_file(sd, str(fp32_path))
    save_file({k: v.bfloat16() for k, v in sd.items()}, str(bf16_path))
    expected = run_ref(ref, *inputs)

    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model = load_mmdit(fp32_path, weight_dtype=name)
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert model.compute_dtype == dtype
        budget = max(1e-3, 1.5 * diffusers_low_precision_error(ref, inputs, dtype))
        assert rel_err(run_ours(model, *inputs), expected) <= budget

    model = load_mmdit(bf16_path, weight_dtype="fp32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    bf16_rounded = {k: v.bfloat16() for k, v in sd.items()}
    assert rel_err(run_ours(model, *inputs), run_ref(with_weights(ref, bf16_rounded), *inputs)) <= 1e-5

    fp8 = load_mmdit(bf16_path, weight_dtype="fp8_e4m3fn")
    block = fp8.transformer_blocks[0]
    for lin in (block.attn.to_q, block.attn.to_add_out, block.img_mod[1]):
        assert lin.weight.dtype == FP8 and lin.weight_scale is not None
        assert lin.bias.dtype == torch.bfloat16
    for lin in (fp8.img_in, fp8.txt_in, fp8.proj_out, fp8.norm_out.linear, fp8.time_text_embed.timestep_embedder.linear_1):
        assert lin.weight.dtype == torch.bfloat16
    assert block.attn.norm_q.weight.dtype == torch.bfloat16
    assert rel_err(run_ours(fp8, *inputs), expected) <= 0.2  # fp8 weights and bf16 activations
    # Standard per-tensor amax/448 scales: equal to diffusers holding the same rounded weights.
    rounded = {}
    for k, v in bf16_rounded.items():
        if is_linear_weight(k) and k.startswith("transformer_blocks."):
            q, s = fp8_quantize(v)
            rounded[k] = q.float() * s
        else:
            rounded[k] = v
    fp8_32 = load_mmdit(bf16_path, weight_dtype="fp8_e4m3fn", compute_dtype=torch.float32)
    assert rel_err(run_ours(fp8_32, *inputs), run_ref(with_weights(ref, rounded), *inputs)) <= 1e-5


def test_config_override_and_bundled_checkpoint(ref, inputs, tmp_path):
    """An all-in-one checkpoint: only model.diffusion_model.* is the MMDiT; zero_cond_t comes
    from the caller, not the file."""
    out = {"model.diffusion_model." + k: v for k, v in state(ref).items()}
    out["text_encoders.qwen25_7b.transformer.model.norm.weight"] = torch.ones(48)
    out["vae.encoder.conv1.weight"] = torch.zeros(8, 3, 3, 3, 3)
    path = tmp_path / "qwen_image_aio.safetensors"
    save_file(out, str(path))
    model = load_mmdit(path, config={"zero_cond_t": True})
    assert model.config.zero_cond_t is True and model.config.num_layers == 2
    plain = load_mmdit(path)
    assert plain.config.zero_cond_t is False
    assert rel_err(run_ours(plain, *inputs), run_ref(ref, *inputs)) <= 1e-5


def test_gguf_q8_0(ref, inputs, tmp_path):
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as T

    writer = gguf.GGUFWriter(str(tmp_path / "qwen-image-Q8_0.gguf"), "qwen_image")
    dequantized = {}
    for k, v in state(ref).items():
        arr = v.float().numpy()
        if k.startswith("transformer_blocks.") and arr.ndim == 2:
            data = gguf.quants.quantize(arr, T.Q8_0)
            writer.add_tensor(k, data, raw_dtype=T.Q8_0)
            dequantized[k] = torch.from_numpy(gguf.quants.dequantize(data, T.Q8_0).reshape(arr.shape).copy())
        else:
            writer.add_tensor(k, arr)
            dequantized[k] = v
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path = tmp_path / "qwen-image-Q8_0.gguf"

    model = load_mmdit(path, compute_dtype=torch.float32)
    assert model.transformer_blocks[0].attn.to_q.is_quantized
    assert not model.img_in.is_quantized
    assert rel_err(run_ours(model, *inputs), run_ref(with_weights(ref, dequantized), *inputs)) <= 1e-5
    summary = inspect_file(path)
    assert summary.kind == "qwen_image_mmdit" and summary.dtypes["Q8_0"] > 0 and summary.layout.startswith("GGUF")
    assert np.isfinite(run_ours(model, *inputs).numpy()).all()


def test_edit_2511_marker_turns_on_zero_timestep_references(ref, tmp_path):
    """ComfyUI's Edit-2511 files carry an empty ``__index_timestep_zero__`` tensor: not a weight,
    but the variant's switch to condition reference tokens on t=0."""
    sd = {k: v.bfloat16() for k, v in state(ref).items()}
    path = tmp_path / "qwen_image_edit_bf16.safetensors"
    save_file({**sd, "__index_timestep_zero__": torch.tensor([])}, str(path))
    assert load_mmdit(path).config.zero_cond_t
    save_file(sd, str(path))
    assert not load_mmdit(path).config.zero_cond_t
