"""DFloat11 MMDiT files through load_mmdit and the DiT loader node, on the CPU.

The files are written as the dfloat11 package's ``compress_model(save_single_file=True)`` writes
them: each ``transformer_blocks.N`` of a bf16 diffusers ``QwenImageTransformer2DModel`` gets the
six tensors of its 14 Linear weights (the package's own encoder, in pattern_dict order) and
loses those weights; the state dict goes to ``diffusion_pytorch_model.safetensors`` next to the
published ``config.json``. Loaded, the model must hold the compressed tensors as stored, decode
them bit-exactly, compute exactly what the model loaded from the bf16 file computes (alone, with
a LoRA, with a ControlNet, streamed, compiled) and match diffusers; bad files are refused naming
file and block, leaving nothing behind.
"""
from __future__ import annotations

import copy
import gc
import json
import re
import shutil

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import references as refs

pytest.importorskip("diffusers")
from test_dfloat11 import QWEN_PATTERN, compress  # noqa: E402  (skips this module without the dfloat11 package)
from test_load_mmdit import inputs, ref  # noqa: E402,F401  (the shared tiny model and its inputs: fixtures)
from test_load_mmdit import run_ref as run_diffusers  # noqa: E402
from diffusers import QwenImageTransformer2DModel  # noqa: E402

from qwenimage_pack.core.errors import WeightFileError  # noqa: E402
from qwenimage_pack.core.keymaps.detect import detect  # noqa: E402
from qwenimage_pack.core.layers import file_views, fold, host_memory  # noqa: E402
from qwenimage_pack.core.layers.lora_patch import apply_loras  # noqa: E402
from qwenimage_pack.core.loading.load import inspect_file, load_mmdit  # noqa: E402
from qwenimage_pack.core.loading.lora import load_lora_file, parse_lora  # noqa: E402
from qwenimage_pack.core.models.controlnet import AppliedControl, DiffSynthControlNet  # noqa: E402
from qwenimage_pack.core.models.mmdit import QwenImageMMDiT  # noqa: E402
from qwenimage_pack.core.pipeline import compile as block_compile  # noqa: E402
from qwenimage_pack.core.pipeline import streaming  # noqa: E402
from qwenimage_pack.core.quant import dfloat11, gguf_kernels  # noqa: E402
from qwenimage_pack.core.quant.dfloat11 import DF11Group  # noqa: E402

TINY = refs.TINY_MMDIT
BLOCK_PATTERN = r"transformer_blocks\.\d+"
# config.json of DFloat11/Qwen-Image-Edit-DF11, verbatim
PUBLISHED_CONFIG = {"dfloat11_config": {"bytes_per_thread": 8, "pattern_dict": {BLOCK_PATTERN: list(QWEN_PATTERN)},
                                        "threads_per_block": [512], "version": "0.3.2"},
                    "model_type": "qwen2_5_vl"}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # fancy indexing slows down 10-100x with 2 threads here (notes/dfloat11.md)
    yield
    torch.set_num_threads(n)


def compress_like_upstream(model: nn.Module, pattern_dict: dict) -> None:
    """What compress_model does to a model before saving it: for every module matching a
    pattern, the listed layers' weights (bf16, in list order) become one group of six buffers
    on that module, and the weights are deleted."""
    for pattern, names in pattern_dict.items():
        for full_name, sub in model.named_modules():
            if re.fullmatch(pattern, full_name):
                layers = [sub.get_submodule(n) for n in names]
                tensors = compress([layer.weight.data for layer in layers])
                for layer in layers:
                    delattr(layer, "weight")
                for k, v in tensors.items():
                    sub.register_buffer(k, v)


def write_df11(folder, sd16: dict, config: dict | None = PUBLISHED_CONFIG, file="diffusion_pytorch_model.safetensors"):
    """A DFloat11 folder (config.json + one safetensors file) for the bf16 state ``sd16``."""
    model = QwenImageTransformer2DModel(**TINY).to(torch.bfloat16)
    model.load_state_dict(sd16)
    compress_like_upstream(model, {BLOCK_PATTERN: list(QWEN_PATTERN)})
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / file))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("df11")
    sd16 = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in ref.state_dict().items()}
    save_file(sd16, str(root / "qwen_image_bf16.safetensors"))
    folder = write_df11(root / "Qwen-Image-DF11", sd16)
    return dict(root=root, sd16=sd16, bf16=root / "qwen_image_bf16.safetensors", df11=folder)


def run(model, inputs, **kw):
    with torch.no_grad():
        return model(*inputs, **kw)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


@pytest.fixture(scope="module")
def loaded(files):
    return load_mmdit(files["df11"]), load_mmdit(files["bf16"])


def placeholders(block) -> bool:
    return all(block.get_submodule(n).weight.is_meta and "weight" not in block.get_submodule(n)._parameters
               for n in QWEN_PATTERN)


# -- recognition and construction --------------------------------------------------------------


def test_the_published_layout_is_recognised(files):
    names = list(load_file(str(files["df11"] / "diffusion_pytorch_model.safetensors")))
    assert "transformer_blocks.0.encoded_exponent" in names and "transformer_blocks.0.attn.to_q.weight" not in names
    assert "transformer_blocks.0.attn.to_q.bias" in names  # biases stay bf16
    found = detect(names)
    assert found.kind == "qwen_image_mmdit" and "DFloat11" in found.detail and "2 layers" in found.detail
    summary = inspect_file(files["df11"])
    assert summary.kind == "qwen_image_mmdit" and "DFloat11" in summary.detail and summary.dtypes["uint8"] == 10
    assert detect(list(load_file(str(files["bf16"])))).detail.find("DFloat11") < 0


def test_blocks_stay_compressed_and_decode_bit_exactly(files, loaded):
    model, _ = loaded
    sd16 = files["sd16"]
    assert isinstance(model, QwenImageMMDiT) and model.config.num_layers == 2
    assert model.config.axes_dims_rope == tuple(TINY["axes_dims_rope"]) and model.compute_dtype == torch.bfloat16
    for i, block in enumerate(model.transformer_blocks):
        group = block.df11
        assert isinstance(group, DF11Group) and placeholders(block)
        assert group.origin == (str(files["df11"] / "diffusion_pytorch_model.safetensors"), f"transformer_blocks.{i}")
        decoded = group.decode(check=True)
        for (name, _), w in zip(group.layout, decoded):
            assert torch.equal(bits(w), bits(sd16[f"transformer_blocks.{i}.{name}.weight"])), name
        # the compressed tensors are the file's own memory, kept as views of its mapping
        assert all(file_views.file_view(group, k) is not None for k in ("luts", "encoded_exponent", "sign_mantissa"))
        assert group.encoded_exponent.data_ptr() == file_views.file_view(group, "encoded_exponent").data_ptr()
    sd = model.state_dict()
    assert "transformer_blocks.0.attn.to_q.weight" not in sd and "transformer_blocks.0.df11.luts" in sd
    assert torch.equal(bits(model.img_in.weight), bits(sd16["img_in.weight"]))
    bias = sd16["transformer_blocks.1.attn.to_q.bias"]
    assert torch.equal(bits(model.transformer_blocks[1].attn.to_q.bias), bits(bias))


def test_same_output_as_the_bf16_file_and_diffusers(ref, files, loaded, inputs):
    model, plain = loaded
    assert torch.equal(run(model, inputs), run(plain, inputs))  # bf16 compute
    model32 = load_mmdit(files["df11"], compute_dtype=torch.float32)
    plain32 = load_mmdit(files["bf16"], compute_dtype=torch.float32)
    out = run(model32, inputs)
    assert torch.equal(out, run(plain32, inputs))
    rounded = copy.deepcopy(ref)
    rounded.load_state_dict({k: v.float() for k, v in files["sd16"].items()})
    expected = run_diffusers(rounded, *inputs)
    assert ((out - expected).norm() / expected.norm()).item() <= 1e-5
    assert all(placeholders(b) for b in model32.transformer_blocks)  # nothing kept decoded after the forward


def test_a_file_without_its_config_uses_the_published_pattern(files, loaded, inputs, tmp_path):
    single = tmp_path / "qwen_image_df11.safetensors"  # on its own: no config.json, dims from the tensors
    shutil.copy(files["df11"] / "diffusion_pytorch_model.safetensors", single)
    model = load_mmdit(single)
    assert model.config.num_layers == 2 and all(placeholders(b) for b in model.transformer_blocks)
    assert torch.equal(run(model, inputs), run(loaded[1], inputs))
    # re-saved with ComfyUI's prefix
    prefixed = tmp_path / "qwen_image_df11_comfy.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in load_file(str(single)).items()}, str(prefixed))
    again = load_mmdit(prefixed)
    assert "prefix 'model.diffusion_model.'" in inspect_file(prefixed).detail
    assert torch.equal(run(again, inputs), run(loaded[1], inputs))


def test_a_diffusers_config_with_dfloat11_config_is_read(ref, files, loaded, inputs, tmp_path):
    """compress_model(save_single_file=False) adds dfloat11_config to the model's own config.json."""
    folder = shutil.copytree(files["df11"], tmp_path / "df11")
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(ref.config).items()}
    (folder / "config.json").write_text(json.dumps({**config, "zero_cond_t": True,
                                                    "dfloat11_config": PUBLISHED_CONFIG["dfloat11_config"]}))
    model = load_mmdit(folder)
    assert model.config.zero_cond_t  # read from the file, not inferred from shapes
    model.config.zero_cond_t = False
    assert torch.equal(run(model, inputs), run(loaded[1], inputs))


def test_a_folder_saved_block_by_block_loads(files, loaded, inputs, tmp_path):
    """compress_model(save_single_file=False): each block in transformer_blocks_N.safetensors,
    the rest in diffusion_pytorch_model.safetensors, config.json with dfloat11_config. A
    tensor in two files is refused naming the file."""
    folder = tmp_path / "Qwen-Image-DF11-blocks"
    folder.mkdir()
    shutil.copy(files["df11"] / "config.json", folder / "config.json")
    sd = load_file(str(files["df11"] / "diffusion_pytorch_model.safetensors"))
    blocks = {}
    for k in list(sd):
        if k.startswith("transformer_blocks."):
            blocks.setdefault(k.split(".")[1], {})[k] = sd.pop(k)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    for i, part in blocks.items():
        save_file(part, str(folder / f"transformer_blocks_{i}.safetensors"))
    model = load_mmdit(folder)
    assert all(isinstance(b.df11, DF11Group) for b in model.transformer_blocks)
    assert torch.equal(run(model, inputs), run(loaded[0], inputs))
    save_file({"transformer_blocks.0.luts": blocks["0"]["transformer_blocks.0.luts"]},
              str(folder / "transformer_blocks_extra.safetensors"))
    refuse(folder, "transformer_blocks_extra.safetensors", "another file of the folder")


def test_the_dit_loader_node_lists_and_loads_the_folder(files, loaded, inputs):
    from qwenimage_pack.nodes import loaders

    root = files["root"] / "models"
    (root / "diffusion_models").mkdir(parents=True, exist_ok=True)
    target = root / "diffusion_models" / "Qwen-Image-Edit-DF11"
    if not target.exists():
        shutil.copytree(files["df11"], target)
    with refs.models_dir(root):
        choices = loaders.QwenImageDiTLoader.INPUT_TYPES()["required"]["model_name"][0]
        assert "Qwen-Image-Edit-DF11" in choices
        handle = loaders.QwenImageDiTLoader().load("Qwen-Image-Edit-DF11", "default")[0]
        with pytest.raises(WeightFileError, match="weight_dtype 'default'"):
            loaders.QwenImageDiTLoader().load("Qwen-Image-Edit-DF11", "fp8_e4m3fn")
    assert handle.weight_format == "dfloat11" and handle.variant == "edit"
    module = handle.module
    assert isinstance(module.transformer_blocks[0].df11, DF11Group)
    module.compute_dtype = None
    assert torch.equal(run(module, inputs), run(loaded[1], inputs))


# -- everything else keeps working -------------------------------------------------------------


def test_a_lora_on_the_compressed_model_equals_it_on_the_bf16_model(ref, files, loaded, inputs, tmp_path):
    from test_lora import lora_factors, write_lora

    shapes = {n: tuple(m.weight.shape) for n, m in ref.named_modules() if isinstance(m, nn.Linear)}
    path = write_lora(tmp_path, lora_factors(shapes, seed=5), "peft")
    model, plain = (copy.deepcopy(m) for m in loaded)
    for m in (model, plain):
        apply_loras(m, [(parse_lora(load_lora_file(path), m, path), 0.8)])
    assert model.transformer_blocks[0].attn.to_q.patches  # the compressed layers take patches too
    out = run(model, inputs)
    assert torch.equal(out, run(plain, inputs))
    assert not torch.equal(out, run(loaded[1], inputs))
    assert not fold.can_fold(model.transformer_blocks[0].attn.to_q, allow_cpu=True)  # nothing to fold into
    apply_loras(model, [])
    assert torch.equal(run(model, inputs), run(loaded[1], inputs))


def test_a_controlnet_on_the_compressed_model(loaded, inputs):
    g = torch.Generator().manual_seed(11)
    net = DiffSynthControlNet(num_layers=2, dim=refs.TINY_INNER_DIM).eval()
    net.load_state_dict(refs.diffsynth_patch_state(g, 2))
    net.to(torch.bfloat16)
    hint = torch.randn(1, 16, 8, 10, generator=g)
    outs = []
    for m in loaded:
        control = AppliedControl(net, lambda h, w: hint, strength=0.7)
        x, sigma, ctx = inputs
        outs.append(run(m, inputs, control=control.hook(m, x, sigma, ctx, None, 0, 1)))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], run(loaded[1], inputs))


def test_streaming_gives_the_same_output_and_returns_to_the_file(loaded, inputs):
    model = copy.deepcopy(loaded[0])
    views = [file_views.file_view(b.df11, "encoded_exponent") for b in model.transformer_blocks]
    assert all(v is not None for v in views)
    streamer = streaming.BlockStreamer(model.transformer_blocks, "cpu", "cpu", prefetch=1,
                                       pin_copy=lambda t: t.clone())  # stand-in pinning: fresh copies
    with streamer:
        assert model.transformer_blocks[0].df11.encoded_exponent.data_ptr() != views[0].data_ptr()
        out = run(model, inputs)
    assert torch.equal(out, run(loaded[1], inputs)) and streamer.stats.uploads >= 2
    for block, view in zip(model.transformer_blocks, views):  # back to the file's memory, no copy kept
        assert block.df11.encoded_exponent.data_ptr() == view.data_ptr() and placeholders(block)


def test_compiled_blocks_give_the_same_output(loaded, inputs):
    model = copy.deepcopy(loaded[0])
    settings = block_compile.CompileSettings("eager")
    block_compile.reset()
    try:
        with block_compile.compiled(model, settings) as on:
            assert on
            out = run(model, inputs)
        assert block_compile.failure(settings) is None
    finally:
        block_compile.reset()
    assert torch.equal(out, run(loaded[1], inputs))


def test_sizes_count_the_compressed_bytes_and_weight_paths_skip_the_blocks(loaded):
    from qwenimage_pack.nodes import patcher

    model, plain = loaded
    groups = [b.df11 for b in model.transformer_blocks]
    compressed = sum(2 * g.n for g in groups)  # bf16 bytes the groups stand for
    stored = sum(g.nbytes for g in groups)
    assert host_memory.module_bytes(model) == host_memory.module_bytes(plain) - compressed + stored
    assert host_memory.module_bytes(model) < host_memory.module_bytes(plain)
    block = model.transformer_blocks[0]
    assert streaming.block_bytes(block) == block.df11.nbytes + sum(p.numel() * 2 for p in block.parameters())
    assert gguf_kernels.prepare(model) == 0
    assert fold.fold(copy.deepcopy(model), allow_cpu=True) == 0
    assert patcher._weight_format(block.attn.to_q, block.attn.to_q.weight) == "DFloat11"
    # One block's bf16 weights exist while it runs: working memory the patcher reports to ComfyUI.
    assert dfloat11.decode_bytes(model) == max(2 * g.n for g in groups) and dfloat11.decode_bytes(plain) == 0
    moved = copy.deepcopy(model)
    host_memory.move(moved, "cpu")
    assert all(isinstance(b.df11, DF11Group) and placeholders(b) for b in moved.transformer_blocks)


# -- bad input ---------------------------------------------------------------------------------


def live() -> int:
    gc.collect()
    return sum(isinstance(o, (QwenImageMMDiT, DF11Group)) for o in gc.get_objects())


def refuse(path, *words, **kw) -> str:
    before = live()
    with pytest.raises(WeightFileError) as info:
        load_mmdit(path, **kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    del info
    assert live() == before  # nothing half-loaded survives
    return msg


def rewrite(folder, change) -> None:
    file = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(file))
    change(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(file))


def test_every_other_weight_dtype_is_refused_before_reading(files):
    for dtype in ("bf16", "fp16", "fp32", "fp8_e4m3fn"):
        refuse(files["df11"], str(files["df11"]), "DFloat11", f"weight_dtype {dtype!r}", "weight_dtype 'default'",
               weight_dtype=dtype)


def _set(t, index, value):
    t[index] = value
    return t


@pytest.mark.parametrize("tensor,change,words", [
    ("luts", lambda t: _set(t, (-1, int(t[-1].argmax())), 33), ["code length 33"]),
    ("luts", lambda t: _set(t, (0, 0), 256 - t.shape[0]), ["pointer names"]),
    ("output_positions", lambda t: t[:-4], ["output_positions"]),
    ("split_positions", lambda t: t + 1, ["split_positions"]),
    ("sign_mantissa", lambda t: t[:-1], ["sign_mantissa holds"]),
], ids=["code-too-long", "bad-pointer", "positions", "split", "values-missing"])
def test_malformed_tables_name_the_file_and_block(files, tmp_path, tensor, change, words):
    folder = shutil.copytree(files["df11"], tmp_path / "bad")
    key = f"transformer_blocks.1.{tensor}"
    rewrite(folder, lambda sd: sd.__setitem__(key, change(sd[key].clone())))
    msg = refuse(folder, str(folder / "diffusion_pytorch_model.safetensors"), "block transformer_blocks.1", *words)
    assert "transformer_blocks\\\\.\\\\d+" in msg  # what is supported


@pytest.mark.parametrize("tensor", ["gaps", "encoded_exponent"])
def test_a_missing_group_tensor_is_named(files, tmp_path, tensor):
    """Any of the six missing, encoded_exponent included (a block is known by any of them)."""
    folder = shutil.copytree(files["df11"], tmp_path / "bad")
    rewrite(folder, lambda sd: sd.pop(f"transformer_blocks.1.{tensor}"))
    refuse(folder, "block transformer_blocks.1", f"lacks {tensor}")


@pytest.mark.parametrize("pattern,words", [
    ({BLOCK_PATTERN: list(QWEN_PATTERN[:-1])}, ["block transformer_blocks.0", "pattern_dict", "hold"]),
    ({BLOCK_PATTERN: ["attn.to_q", "img_mod.1"] + list(QWEN_PATTERN[2:])}, ["block transformer_blocks.0",
                                                                            "split_positions"]),
    ({BLOCK_PATTERN: ["attn.to_x"] + list(QWEN_PATTERN[1:])}, ["to_x", "lacks"]),
    ({r"single_transformer_blocks\.\d+": list(QWEN_PATTERN)}, ["does not match the transformer blocks"]),
    ({BLOCK_PATTERN: list(QWEN_PATTERN), "proj_out": []}, ["one group per transformer block"]),
], ids=["missing-layer", "wrong-order", "unknown-layer", "other-modules", "two-patterns"])
def test_a_wrong_pattern_is_a_clear_error(files, tmp_path, pattern, words):
    folder = shutil.copytree(files["df11"], tmp_path / "bad")
    config = copy.deepcopy(PUBLISHED_CONFIG)
    config["dfloat11_config"]["pattern_dict"] = pattern
    (folder / "config.json").write_text(json.dumps(config))
    refuse(folder, str(folder), "DFloat11", *words)


def test_unsupported_thread_layout_is_refused(files, tmp_path):
    folder = shutil.copytree(files["df11"], tmp_path / "bad")
    config = copy.deepcopy(PUBLISHED_CONFIG)
    config["dfloat11_config"]["bytes_per_thread"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    refuse(folder, "bytes_per_thread 4")


def test_a_corrupt_stream_fails_the_first_forward_naming_file_and_block(files, tmp_path, inputs):
    folder = shutil.copytree(files["df11"], tmp_path / "bad")
    key = "transformer_blocks.1.encoded_exponent"
    rewrite(folder, lambda sd: sd.__setitem__(key, _set(sd[key].clone(), slice(100, 4000), 0xFF)))
    model = load_mmdit(folder)  # structurally fine: the stream is checked by its first decode
    with pytest.raises(WeightFileError) as info:
        run(model, inputs)
    msg = str(info.value)
    assert str(folder / "diffusion_pytorch_model.safetensors") in msg and "block transformer_blocks.1" in msg
    assert "output_positions" in msg and all(placeholders(b) for b in model.transformer_blocks)
