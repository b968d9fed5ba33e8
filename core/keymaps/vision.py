"""The vision tower's names in llama.cpp mmproj GGUF files -> HF ``visual.*`` names.

llama.cpp's convert_hf_to_gguf splits Qwen2(.5)-VL's fused qkv projection into attn_q/k/v and
the Conv3d patch embedding into two Conv2d slices; both are undone here, so the text-encoder
loader builds the tower from the same names as from a safetensors file.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..errors import WeightFileError
from ..quant.gguf_dequant import dequantize
from ..layers.linear import QuantizedTensor

_VISION_LAYER = re.compile(r"^v\.blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_VISION_LAYER_PARTS_25 = {
    "attn_qkv": "attn.qkv",
    "attn_out": "attn.proj",
    "ln1": "norm1",
    "ln2": "norm2",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Qwen2-VL (not 2.5) has a two-layer GELU MLP named fc1/fc2.
_VISION_LAYER_PARTS_2 = dict(_VISION_LAYER_PARTS_25, ffn_up="mlp.fc1", ffn_down="mlp.fc2")
_VISION_TOP = {"v.post_ln": "visual.merger.ln_q", "mm.0": "visual.merger.mlp.0", "mm.2": "visual.merger.mlp.2"}


def _to_float(t, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if isinstance(t, QuantizedTensor):
        return dequantize(t.blocks, t.qtype, math.prod(t.shape[1:]), dtype).reshape(t.shape)
    return t


def _concat_rows(parts: list) -> torch.Tensor | QuantizedTensor:
    """Stack q, k, v along rows, keeping blocks when all three share one quantized type."""
    if all(isinstance(p, QuantizedTensor) for p in parts) and len({(p.qtype, p.shape[1:]) for p in parts}) == 1:
        blocks = torch.cat([p.blocks for p in parts], dim=0)
        return QuantizedTensor(blocks, parts[0].qtype, (blocks.shape[0],) + tuple(parts[0].shape[1:]))
    dense = [_to_float(p) for p in parts]
    dtype = dense[0].dtype
    for d in dense[1:]:
        dtype = torch.promote_types(dtype, d.dtype)
    return torch.cat([d.to(dtype) for d in dense], dim=0)


def vision_names_from_mmproj(path: str, tensors: dict, projector: str) -> dict:
    """An mmproj GGUF's tensors under HF ``visual.*`` names (best effort: llama.cpp's splits undone)."""
    parts = _VISION_LAYER_PARTS_2 if projector == "qwen2vl_merger" else _VISION_LAYER_PARTS_25
    out: dict = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("v.patch_embd."):
            continue
        m = _VISION_LAYER.match(name)
        if m:
            block, part, kind = m.groups()
            if part in ("attn_q", "attn_k", "attn_v"):
                qkv.setdefault((block, kind), {})[part] = t
                continue
            if part in parts:
                out[f"visual.blocks.{block}.{parts[part]}.{kind}"] = t
                continue
        base, _, kind = name.rpartition(".")
        if base in _VISION_TOP:
            out[f"{_VISION_TOP[base]}.{kind}"] = t
        else:
            out[name] = t
    for (block, kind), got in sorted(qkv.items()):
        missing = [p for p in ("attn_q", "attn_k", "attn_v") if p not in got]
        if missing:
            raise WeightFileError(path, f"block {block} lacks v.blk.{block}.{missing[0]}.{kind}.",
                                  "q, k and v projections for every vision block")
        out[f"visual.blocks.{block}.attn.qkv.{kind}"] = _concat_rows([got["attn_q"], got["attn_k"], got["attn_v"]])
    w0, w1 = tensors.get("v.patch_embd.weight"), tensors.get("v.patch_embd.weight.1")
    if w0 is not None:
        if w1 is None:
            raise WeightFileError(path, "has v.patch_embd.weight but not its second temporal slice "
                                  "v.patch_embd.weight.1.", "both slices of the Conv3d patch embedding")
        # [out, in, kh, kw] x 2 -> Conv3d weight [out, in, 2, kh, kw]
        w0, w1 = _to_float(w0), _to_float(w1)
        dtype = torch.promote_types(w0.dtype, w1.dtype)
        out["visual.patch_embed.proj.weight"] = torch.stack((w0.to(dtype), w1.to(dtype)), dim=2)
    if "v.patch_embd.bias" in tensors:
        out["visual.patch_embed.proj.bias"] = tensors["v.patch_embd.bias"]
    return out


def quantized_linear_shape(name: str, stored: tuple[int, int], shapes: dict[str, tuple]) -> tuple[int, int]:
    """Dense ``[out, in]`` of the tower's Linear ``name`` (``<layer>.weight``, names inside the
    tower), whose ComfyUI-quantized file weight decodes to ``stored`` rows and columns.

    nvfp4 / mxfp8 pad both to 16 / 32 with zeros that leave no trace in the file, and the tower's
    MLP width (3420 in Qwen2.5-VL-7B) is not such a multiple. So ``out`` is the layer's bias
    length, and ``in`` the width of what feeds it: the block's norm (hidden size) for the
    attention and the MLP's first projections, the MLP's width for its last one, the merger's
    first layer (square) for its second. ``shapes`` has every tensor of the tower by name."""
    layer = name[: -len(".weight")] if name.endswith(".weight") else name
    bias = shapes.get(layer + ".bias")
    out = int(bias[0]) if bias else stored[0]
    feeder = None
    block = re.match(r"^(blocks\.\d+)\.(.+)$", layer)
    if block is not None:
        prefix, part = block.groups()
        last = {"mlp.down_proj": "mlp.up_proj", "mlp.fc2": "mlp.fc1"}.get(part)
        feeder = f"{prefix}.{last}.bias" if last else f"{prefix}.norm1.weight"
    elif layer == "merger.mlp.2":
        feeder = "merger.mlp.0.bias"
    elif layer == "merger.mlp.0":
        return out, out
    fed = shapes.get(feeder) if feeder else None
    return out, int(fed[0]) if fed else stored[1]

