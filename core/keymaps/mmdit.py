"""MMDiT key layout, and the per-layer quantization side tensors every loader shares.

Our MMDiT's parameter names are diffusers' names, so the only renaming is dropping the
prefix a file was saved with. What needs care are the side tensors ComfyUI writes next to
compact weights:

- "scaled fp8" files: ``<layer>.scale_weight`` (per-tensor scale), ``<layer>.scale_input``
  (activation scale, unused here) and a marker tensor ``scaled_fp8``;
- newer files: ``<layer>.comfy_quant`` (uint8 bytes of a JSON object naming the format), or the
  same per-layer dicts in the safetensors metadata entry ``_quantization_metadata``. Per-tensor
  float8 layers (``weight_scale``, ``input_scale``) take the float8 path; the other formats
  (nvfp4, mxfp8, int8, ConvRot w4a4, w4a8) keep their side tensors (``quant/comfy_quant.py``);
- Edit-2511 files: an empty ``__index_timestep_zero__`` marker (reference tokens at t=0).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from ..errors import WeightFileError
from ..quant import comfy_quant

MMDIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")

SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
QUANT_CONFIG_SUFFIX = ".comfy_quant"
MARKER_KEYS = ("scaled_fp8", "__index_timestep_zero__")
# ComfyUI's Edit-2511 files carry this empty marker: reference tokens are conditioned on t=0.
ZERO_COND_T_MARKER = "__index_timestep_zero__"

# comfy_quant format -> storage dtype of the weight; anything else is refused with a message.
SUPPORTED_QUANT_FORMATS = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


def find_prefix(names: Iterable[str], anchor: str, known: tuple[str, ...] = ()) -> str | None:
    """The prefix in front of ``anchor`` (a full tensor name such as ``txt_norm.weight``).

    Known prefixes win; otherwise the shortest prefix ending in '.' is taken, which also finds
    a component inside a bundled checkpoint. ``None`` if the anchor is absent.
    """
    found = []
    for n in names:
        if n == anchor:
            found.append("")
        elif n.endswith("." + anchor):
            found.append(n[: -len(anchor)])
    if not found:
        return None
    for p in ("",) + tuple(known):
        if p in found:
            return p
    return min(found, key=len)


def mmdit_prefix(names: Iterable[str]) -> str | None:
    return find_prefix(names, "txt_norm.weight", MMDIT_PREFIXES)


def mmdit_key(name: str, prefix: str) -> str | None:
    """Our parameter name for a file key, or ``None`` when the key is outside the model."""
    if prefix and not name.startswith(prefix):
        return None
    return name[len(prefix):]


@dataclass
class QuantSideTensors:
    """How the side tensors of a file attach to its weights (all names are file keys)."""

    scales: dict[str, str] = field(default_factory=dict)  # weight key -> scale key
    configs: dict[str, str] = field(default_factory=dict)  # weight key -> comfy_quant key
    meta_configs: dict[str, dict] = field(default_factory=dict)  # weight key -> comfy_quant dict from the header
    ignored: set[str] = field(default_factory=set)  # markers and activation scales

    @property
    def side_keys(self) -> set[str]:
        return set(self.scales.values()) | set(self.configs.values()) | self.ignored


def quant_side_tensors(names: Iterable[str], metadata: Mapping[str, str] | None = None) -> QuantSideTensors:
    names = set(names)
    side = QuantSideTensors()
    for n in names:
        if n.rsplit(".", 1)[-1] in MARKER_KEYS:
            side.ignored.add(n)
            continue
        for suffix in SCALE_SUFFIXES:
            if n.endswith(suffix):
                weight = n[: -len(suffix)] + ".weight"
                if weight in names:
                    side.scales[weight] = n
        for suffix in INPUT_SCALE_SUFFIXES:
            if n.endswith(suffix) and n[: -len(suffix)] + ".weight" in names:
                side.ignored.add(n)
        if n.endswith(QUANT_CONFIG_SUFFIX):
            weight = n[: -len(QUANT_CONFIG_SUFFIX)] + ".weight"
            if weight in names:
                side.configs[weight] = n
    raw = (metadata or {}).get("_quantization_metadata")
    if raw:
        try:
            layers = json.loads(raw).get("layers", {})
        except (json.JSONDecodeError, AttributeError):
            layers = {}
        prefixes = _model_prefixes(names)
        for layer, conf in layers.items():
            weight = _header_weight_key(layer, names, prefixes)
            if weight is not None:
                side.meta_configs[weight] = conf if isinstance(conf, dict) else {"format": conf}
    return side


def _model_prefixes(names: set[str]) -> tuple[str, ...]:
    """Prefixes a header's layer names may leave out: the MMDiT's detected one, then the known ones."""
    found = mmdit_prefix(names)
    return tuple(dict.fromkeys(p for p in (found, *MMDIT_PREFIXES) if p))


def _header_weight_key(layer: str, names: set[str], prefixes: Iterable[str] = ()) -> str | None:
    """The file key of the weight of ``_quantization_metadata`` layer ``layer``: its own name, or
    with a model prefix in front. ComfyUI applies the header to the state dict before and after it
    strips the diffusion model's prefix, so a header written for the bare model (no prefix) marks
    the layers of a prefixed file too. None when the file has no such weight."""
    for prefix in ("", *prefixes):
        if prefix + layer + ".weight" in names:
            return prefix + layer + ".weight"
    return None


def scaled_fp8_full_precision(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None) -> bool:
    """Whether a legacy "scaled fp8" file asks for its float8 layers to be computed on their decoded
    weights: ComfyUI reads a two-element ``scaled_fp8`` marker (in a file without a header
    ``_quantization_metadata``) as ``full_precision_matrix_mult`` on every layer with a scale."""
    if "_quantization_metadata" in (metadata or {}):
        return False
    return any(k.rsplit(".", 1)[-1] == "scaled_fp8" and math.prod(shape) == 2 for k, shape in shapes.items())


def layer_quant(raw, key: str, path) -> comfy_quant.LayerQuant:
    """What a ``comfy_quant`` entry (uint8 JSON tensor, or the header's dict) says about layer ``key``."""
    try:
        return comfy_quant.parse_layer_config(raw)
    except ValueError as e:
        raise WeightFileError(path, f"has a quantized layer '{key}' it cannot describe: {e}.",
                              f"layers in one of ComfyUI's formats ({', '.join(comfy_quant.SUPPORTED)}), "
                              "or use a bf16, fp8 or GGUF version of the model") from None


def float8_storage(quant: comfy_quant.LayerQuant) -> torch.dtype | None:
    """The float8 dtype of a per-tensor float8 layer (kept on the float8 path: scaled matmuls),
    None for the other formats (kept as ComfyUI stores them, decoded in the layer)."""
    return SUPPORTED_QUANT_FORMATS.get(quant.format)


_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
# Qwen-Image-Layered's only extra tensor (an nn.Embedding(2, hidden) added to the timestep embedding).
LAYERED_KEY = "time_text_embed.addition_t_embedding.weight"


def mmdit_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """A diffusers-style config for the MMDiT whose (prefix-free) tensors have ``shapes``.

    Leaves out ``axes_dims_rope`` (a function of the head size the model class knows) and
    ``zero_cond_t`` (a property of the checkpoint variant, not of its tensors). A Qwen-Image-Layered
    file is told by its one extra tensor, ``time_text_embed.addition_t_embedding.weight``: it sets
    ``use_additional_t_cond`` and ``use_layer3d_rope`` (as ComfyUI's detection does).
    """
    def need(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise KeyError(name)
        return tuple(shapes[name])

    layers = {int(m.group(1)) for n in shapes if (m := _BLOCK.match(n))}
    inner, in_channels = need("img_in.weight")
    head_dim = need("transformer_blocks.0.attn.norm_q.weight")[0]
    if inner % head_dim:
        raise ValueError(f"hidden size {inner} is not a multiple of the head size {head_dim}")
    patch = 2
    out_channels = need("proj_out.weight")[0] // (patch * patch)
    layered = LAYERED_KEY in shapes
    if layered and tuple(shapes[LAYERED_KEY]) != (2, inner):
        raise ValueError(f"{LAYERED_KEY} has shape {list(shapes[LAYERED_KEY])}, expected [2, {inner}]")
    extra = {"use_additional_t_cond": True, "use_layer3d_rope": True} if layered else {}
    return {
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_layers": (max(layers) + 1) if layers else 0,
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": need("txt_norm.weight")[0],
        **extra,
    }


def strip_mmdit_prefix(name: str) -> str:
    """``name`` without the container prefix a GGUF conversion may have put in front."""
    for prefix in MMDIT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name
