"""Converting a bf16 file to float8 at load leaves nothing of the model in the file's mapping.

safetensors maps the whole file once and hands out views into that one mapping, so a single
tensor kept as a view (a norm, a bias) keeps the whole file mapped, and its pages counted
against the process, for as long as the model lives. After a float8 conversion the model
must own all of its memory and the mapping must be gone. A load that converts nothing keeps
its weights as file views (host_memory's design), and so does an fp8 file loaded as fp8.
The values are checked against diffusers in test_load_mmdit; the float8 values here against
torch's own cast of the amax/448-scaled weight.

Also runs the CPU benchmark bench/bench_fp8_convert.py in --smoke mode.
"""
from __future__ import annotations

import gc
import importlib
import sys

import torch
from safetensors.torch import save_file

import references as refs
from conftest import ROOT
from qwenimage_pack.core.layers import file_views, host_memory
from qwenimage_pack.core.loading.load import load_mmdit

FP8 = torch.float8_e4m3fn


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of this process that map ``path`` (/proc/self/maps)."""
    target = str(path.resolve())
    ranges = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == target:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def _tensors(model):
    return dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if b is not None}


def _in_mapping(model, path) -> list[str]:
    ranges = _mapped_ranges(path)
    return [n for n, t in _tensors(model).items()
            if any(lo <= t.untyped_storage().data_ptr() < hi for lo, hi in ranges)]


def _is_block_weight(name: str) -> bool:
    return name.startswith("transformer_blocks.") and name.endswith(".weight") and "norm" not in name


def test_fp8_conversion_leaves_the_file_unmapped(tmp_path):
    path = tmp_path / "bf16.safetensors"
    state = refs.tiny_mmdit_bf16_state()
    save_file(state, str(path))
    model = load_mmdit(path, weight_dtype="fp8_e4m3fn")
    gc.collect()
    tensors = _tensors(model)
    assert not _in_mapping(model, path)
    assert _mapped_ranges(path) == []  # nothing else holds it either: the mapping is closed
    assert all(file_views.file_view(m, n) is None for m in model.modules() for n in m._parameters)
    # The float8 weights are torch's cast of the amax / 448-scaled values; the rest as stored.
    for name, t in tensors.items():
        if name.endswith(".weight_scale"):  # the float8 weights' scales, checked with them
            continue
        src = state[name]
        if _is_block_weight(name):
            scale = src.abs().amax().float() / 448
            assert torch.equal(tensors[name + "_scale"], scale)
            assert t.dtype == FP8 and torch.equal(t.view(torch.uint8), (src.float() / scale).to(FP8).view(torch.uint8))
        else:
            assert t.dtype == torch.bfloat16 and torch.equal(t, src), name


def test_unconverted_loads_keep_their_file_views(tmp_path):
    path = tmp_path / "bf16.safetensors"
    save_file(refs.tiny_mmdit_bf16_state(), str(path))
    model = load_mmdit(path)  # nothing converted: every weight is the file's own memory
    assert len(_in_mapping(model, path)) == len(_tensors(model))

    # An fp8 file loaded as fp8: its weights are used as stored, so they stay file views too.
    fp8_path = tmp_path / "fp8.safetensors"
    state = {k: (v.to(FP8) if _is_block_weight(k) else v) for k, v in refs.tiny_mmdit_bf16_state().items()}
    save_file(state, str(fp8_path))
    fp8 = load_mmdit(fp8_path, weight_dtype="fp8_e4m3fn")
    block = fp8.transformer_blocks[0].attn.to_q
    assert block.weight.dtype == FP8 and file_views.file_view(block, "weight") is not None
    assert len(_in_mapping(fp8, fp8_path)) == len(_tensors(fp8))


def test_bench_fp8_convert_smoke(capsys):
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    module = importlib.import_module("bench_fp8_convert")
    results = module.main(["--smoke"])
    out = capsys.readouterr().out
    assert out.startswith("date ") and "smoke run" in out and "|---" in out
    assert not results["ours"]["mapped"]  # the converted model left the file unmapped
