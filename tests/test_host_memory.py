"""Weights read unchanged from a file go back to the file's memory mapping when they leave the
GPU, instead of becoming a fresh copy in process memory. (No GPU here: a copy of each weight in
fresh memory stands in for its GPU copy.)"""
from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file

import references as refs
from gguf_writer_util import write_gguf, encode
from qwenimage_pack.core.layers import file_views, host_memory
from qwenimage_pack.core.loading.load import load_mmdit
from gguf import GGMLQuantizationType as T


def _forward(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 8, generator=g)
    ctx = torch.randn(1, 5, refs.TINY_MMDIT["joint_attention_dim"], generator=g)
    with torch.inference_mode():
        return model(x, torch.tensor([0.5]), ctx)


def _views(model):
    return {f"{m}.{n}" if m else n: file_views.file_view(mod, n)
            for m, mod in model.named_modules() for n in mod._parameters}


def _round_trip(model):
    """To the stand-in GPU (fresh memory) and back through host_memory.move, as placement does."""
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.data = p.data.clone()
    assert all(p.data_ptr() != before[n] for n, p in model.named_parameters())
    host_memory.move(model, "cpu")
    return before, {n: p.data_ptr() for n, p in model.named_parameters()}


def test_safetensors_weights_return_to_the_file_mapping(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in refs.tiny_mmdit_bf16_state().items()}, path)
    model = load_mmdit(path)
    views = _views(model)
    assert len(views) == len(dict(model.named_parameters())) and all(v is not None for v in views.values())
    expected = _forward(model)
    before, after = _round_trip(model)
    assert after == before  # the same file memory: nothing was copied
    assert torch.equal(_forward(model), expected)


def test_converted_weights_are_copied_as_before(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in refs.tiny_mmdit_bf16_state().items()}, path)
    model = load_mmdit(path, weight_dtype="fp32")  # converted: not the file's memory
    assert all(v is None for v in _views(model).values())


def test_gguf_blocks_return_to_the_file_mapping(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {}
    for name, t in refs.tiny_mmdit_bf16_state().items():
        qtype = T.Q8_0 if t.dim() == 2 and "transformer_blocks" in name and t.shape[1] % 32 == 0 else T.F32
        data, raw_dtype, _ = encode(t.float().numpy(), qtype, rng)
        tensors[name] = (data, raw_dtype)
    path = write_gguf(tmp_path / "tiny-Q8_0.gguf", "qwen_image", tensors)
    model = load_mmdit(path)
    quantized = [m for m in model.modules() if getattr(m, "quant_type", None) is not None]
    assert quantized and all(file_views.file_view(m, "weight") is not None for m in quantized)
    expected = _forward(model)
    before, after = _round_trip(model)
    blocks = [n for n in before if n.endswith(".weight") and model.get_submodule(n[:-7]) in quantized]
    assert blocks and all(after[n] == before[n] for n in blocks)  # the quantized blocks: file memory
    assert torch.equal(_forward(model), expected)


def test_only_a_matching_weight_is_swapped_back():
    lin = torch.nn.Linear(4, 4, bias=False)
    file_views.keep_file_view(lin, "weight")
    view = file_views.file_view(lin, "weight")
    lin.weight.data = torch.zeros(2, 4)  # not the same tensor any more: left as it is
    host_memory.move(lin, "cpu")
    assert lin.weight.shape == (2, 4)
    lin.weight.data = view.clone().double()
    host_memory.move(lin, "cpu")
    assert lin.weight.dtype == torch.float64
    lin.weight.data = view.clone()
    host_memory.move(lin, "cpu")
    assert lin.weight.data_ptr() == view.data_ptr()
