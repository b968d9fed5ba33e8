"""What the names in a Qwen-Image ControlNet file mean: which kind it is, and its config.

The InstantX files (Union, Inpainting) use diffusers' ``QwenImageControlNetModel`` names (our
parameter names); the DiffSynth patches use ``img_in`` + ``controlnet_blocks.N.{x_rms,y_rms,
input_proj,output_proj}``; the Fun ControlNet (VideoX-Fun, Qwen-Image-2512-Fun-Controlnet-Union)
uses ``control_img_in`` + ``control_blocks.N`` (MMDiT blocks with ``after_proj``, ``before_proj`` on
block 0). Any of them may carry a prefix. ControlNets of other model families are
recognised so the error can name them: users keep all their ControlNets in one folder.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from ..models.mmdit import MMDiTConfig, default_axes

CONTROLNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "controlnet.", "model.")
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
_CN_BLOCK = re.compile(r"^controlnet_blocks\.(\d+)\.")
_FUN_BLOCK = re.compile(r"^control_blocks\.(\d+)\.")
_FUN_AFTER = re.compile(r"(?:^|\.)control_blocks\.\d+\.after_proj\.weight$")

# (what it is, pattern some name matches), checked in order on files that are not ours.
_FOREIGN_CONTROLNETS = [
    ("a Flux ControlNet", r"(?:^|\.)controlnet_single_blocks\.\d+\.|(?:^|\.)single_transformer_blocks\.\d+\.|(?:^|\.)double_blocks\.\d+\."),
    ("a Z-Image Fun ControlNet", r"(?:^|\.)control_all_x_embedder\.|(?:^|\.)control_noise_refiner\."),
    ("a Hunyuan-DiT ControlNet", r"(?:^|\.)after_proj_list\.\d+\."),
    ("an SD3 ControlNet", r"(?:^|\.)joint_blocks\.\d+\.|(?:^|\.)pos_embed_input\."),
    ("an SDXL ControlNet", r"(?:^|\.)add_embedding\.linear_1\.|(?:^|\.)label_emb\.0\.0\."),
    ("a Stable Diffusion 1.5 / 2.x ControlNet", r"(?:^|\.)controlnet_cond_embedding\.|(?:^|\.)input_hint_block\.|^control_model\."),
]


def flavour(names: Iterable[str]) -> str | None:
    """'instantx', 'diffsynth', 'fun' or None, from tensor names alone."""
    names = list(names)
    if any(n.endswith("control_img_in.weight") for n in names) and any(_FUN_AFTER.search(n) for n in names):
        return "fun"
    if any(n.endswith("controlnet_blocks.0.x_rms.weight") or n.endswith("controlnet_blocks.0.input_proj.weight") for n in names):
        return "diffsynth"
    if any(n.endswith("controlnet_x_embedder.weight") for n in names) and any(n.endswith("txt_norm.weight") for n in names):
        return "instantx"
    return None


def foreign_controlnet(names: Iterable[str]) -> str | None:
    names = list(names)
    for what, pattern in _FOREIGN_CONTROLNETS:
        rx = re.compile(pattern)
        if any(rx.search(n) for n in names):
            return what
    return None


def instantx_config(shapes: Mapping[str, tuple], file_config: dict | None = None):
    """``(MMDiTConfig, extra_condition_channels)`` from prefix-free shapes (or a diffusers config)."""
    if file_config:
        cfg = MMDiTConfig.from_diffusers_config({k: v for k, v in file_config.items() if k != "out_channels"})
        return cfg, int(file_config.get("extra_condition_channels") or 0)
    inner, in_channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    layers = {int(m.group(1)) for n in shapes if (m := _BLOCK.match(n))}
    if inner % head_dim:
        raise ValueError(f"hidden size {inner} is not a multiple of the head size {head_dim}")
    cfg = MMDiTConfig(patch_size=2, in_channels=in_channels, out_channels=in_channels // 4,
                      num_layers=max(layers) + 1, attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
                      joint_attention_dim=shapes["txt_norm.weight"][0], axes_dims_rope=default_axes(head_dim))
    extra = shapes["controlnet_x_embedder.weight"][1] - in_channels
    return cfg, extra


def diffsynth_config(shapes: Mapping[str, tuple]) -> dict:
    """``DiffSynthControlNet`` keyword arguments from prefix-free shapes."""
    dim, fan_in = shapes["img_in.weight"]
    layers = {int(m.group(1)) for n in shapes if (m := _CN_BLOCK.match(n))}
    return dict(num_layers=max(layers) + 1, dim=dim, in_channels=64, extra_in_channels=fan_in - 64)


def fun_config(shapes: Mapping[str, tuple]) -> dict:
    """``FunControlNet`` keyword arguments from prefix-free shapes: the number of control blocks,
    the width, the heads (``to_q`` rows / ``norm_q`` size) and the hint features (132: 33 latent
    channels packed 2x2). Which main blocks they feed follows from the main model at run time."""
    dim, in_features = shapes["control_img_in.weight"]
    head_dim = shapes["control_blocks.0.attn.norm_q.weight"][0]
    q_rows = shapes["control_blocks.0.attn.to_q.weight"][0]
    if q_rows != dim or dim % head_dim:
        raise ValueError(f"control blocks of width {q_rows} with heads of {head_dim} do not fit control_img_in's width {dim}")
    if in_features % 4:
        raise ValueError(f"control_img_in takes {in_features} features, which are not 2x2 patches of latent channels")
    blocks = {int(m.group(1)) for n in shapes if (m := _FUN_BLOCK.match(n))}
    return dict(num_blocks=max(blocks) + 1, dim=dim, num_attention_heads=dim // head_dim, attention_head_dim=head_dim,
                in_features=in_features)
