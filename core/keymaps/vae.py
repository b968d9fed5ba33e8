"""Key names of the Wan-2.1 / Qwen-Image VAE: diffusers layout -> original Wan layout.

Two layouts exist in the wild (FACTS section 3). ``WanVAE`` uses the original Wan names, so
original files load as they are and diffusers ``vae/`` folders go through ``vae_key``.
Everything here works on names only, so a streaming loader can rename tensors one at a time.

The one structural difference: diffusers groups the decoder into ``up_blocks.N`` of
``num_res_blocks + 1`` resnets plus one upsampler, while Wan keeps a flat ``upsamples`` list;
mapping between them needs ``num_res_blocks`` (2 in every published checkpoint).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, TypeVar

from ..errors import WeightFileError
from ..encoders.vae import VAEConfig

T = TypeVar("T")

DEFAULT_NUM_RES_BLOCKS = 2

_WAN_MARKERS = (
    ("encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma", "encoder.middle.1.to_qkv.weight"),
    ("decoder.conv1.weight", "decoder.upsamples.0.residual.0.gamma", "decoder.middle.1.to_qkv.weight"),
)
# ``down_blocks.0.norm1`` (not ``down_blocks.0.resnets.0.norm1``) rules out the Wan-2.2 style
# VAEs, whose blocks are nested and whose latents are not Qwen-Image latents.
_DIFFUSERS_MARKERS = (
    ("encoder.conv_in.weight", "encoder.down_blocks.0.norm1.gamma", "encoder.mid_block.attentions.0.to_qkv.weight"),
    ("decoder.conv_in.weight", "decoder.up_blocks.0.resnets.0.norm1.gamma", "decoder.mid_block.attentions.0.to_qkv.weight"),
)

_DIFFUSERS_PARTS = re.compile(r"(^|\.)(conv_in|down_blocks|mid_block|up_blocks|norm_out|conv_out|quant_conv|post_quant_conv)(\.|$)")

# Inside a residual block: diffusers child name -> Wan child name.
_RESNET_CHILDREN = {
    "norm1.": "residual.0.",
    "conv1.": "residual.2.",
    "norm2.": "residual.3.",
    "conv2.": "residual.6.",
    "conv_shortcut.": "shortcut.",
}

_PREFIXES = {
    "encoder.conv_in.": "encoder.conv1.",
    "decoder.conv_in.": "decoder.conv1.",
    "encoder.norm_out.": "encoder.head.0.",
    "decoder.norm_out.": "decoder.head.0.",
    "encoder.conv_out.": "encoder.head.2.",
    "decoder.conv_out.": "decoder.head.2.",
    "quant_conv.": "conv1.",
    "post_quant_conv.": "conv2.",
}

_UP_BLOCK = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$")
_MID_BLOCK = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)$")
_DOWN_BLOCK = re.compile(r"^encoder\.down_blocks\.(\d+)\.(.*)$")


def is_diffusers_name(name: str) -> bool:
    return bool(_DIFFUSERS_PARTS.search(name))


def _resnet_child(rest: str) -> str:
    for old, new in _RESNET_CHILDREN.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    # Attention and resample children have the same names in both layouts.
    return rest


def vae_key(name: str, num_res_blocks: int = DEFAULT_NUM_RES_BLOCKS) -> str:
    """The original Wan name of a VAE tensor given in either layout (Wan names are returned as is)."""
    if not is_diffusers_name(name):
        return name
    for old, new in _PREFIXES.items():
        if name.startswith(old):
            return new + name[len(old):]

    m = _MID_BLOCK.match(name)
    if m:
        side, kind, idx, rest = m.groups()
        # Wan's middle is [resnet, attention, resnet]: resnets at even places, attentions between.
        if kind == "resnets":
            return f"{side}.middle.{2 * int(idx)}.{_resnet_child(rest)}"
        return f"{side}.middle.{2 * int(idx) + 1}.{rest}"

    m = _DOWN_BLOCK.match(name)
    if m:
        # Both layouts keep the encoder flat, so only the children are renamed.
        idx, rest = m.groups()
        return f"encoder.downsamples.{idx}.{_resnet_child(rest)}"

    m = _UP_BLOCK.match(name)
    if m:
        block, kind, idx, rest = m.groups()
        first = int(block) * (num_res_blocks + 2)
        if kind == "resnets":
            return f"decoder.upsamples.{first + int(idx)}.{_resnet_child(rest)}"
        return f"decoder.upsamples.{first + num_res_blocks + 1 + int(idx)}.{rest}"

    raise ValueError(f"unknown diffusers VAE tensor name {name!r}")


def infer_num_res_blocks(keys: Iterable[str]) -> int:
    """``num_res_blocks`` of a diffusers-layout VAE from its names alone (default if undecidable)."""
    keys = list(keys)
    up = [int(m.group(1)) for k in keys if (m := re.match(r"^decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))]
    if up:
        return max(up)  # the decoder block holds num_res_blocks + 1 resnets
    # Without a decoder: the first encoder resample comes right after num_res_blocks resnets.
    resamples = [int(m.group(1)) for k in keys if (m := re.match(r"^encoder\.down_blocks\.(\d+)\.resample\.", k))]
    if resamples:
        return min(resamples)
    return DEFAULT_NUM_RES_BLOCKS


def convert_vae_keys(state_dict: Mapping[str, T], num_res_blocks: int | None = None) -> dict[str, T]:
    """A new dict with every name in the original Wan layout; values are passed through untouched."""
    if num_res_blocks is None:
        num_res_blocks = infer_num_res_blocks(k for k in state_dict if is_diffusers_name(k))
    out: dict[str, T] = {}
    for name, value in state_dict.items():
        new = vae_key(name, num_res_blocks)
        if new in out:
            raise ValueError(f"VAE tensor names {name!r} and another both map to {new!r}: mixed key layouts")
        out[new] = value
    return out


def vae_key_layout(keys: Iterable[str]) -> str | None:
    """``"wan"``, ``"diffusers"`` or None when the names are not a Wan-2.1 / Qwen-Image VAE."""
    keys = set(keys)
    if any(all(k in keys for k in group) for group in _WAN_MARKERS):
        return "wan"
    if any(all(k in keys for k in group) for group in _DIFFUSERS_MARKERS):
        return "diffusers"
    return None


def is_vae_keys(keys: Iterable[str]) -> bool:
    """True for a Wan-2.1 / Qwen-Image VAE in either layout (encoder or decoder part suffices)."""
    return vae_key_layout(keys) is not None


def vae_config(shapes: Mapping[str, Any], path=None) -> VAEConfig:
    """The VAE's config from tensor names -> shapes (or tensors), in either key layout; ``path``
    names the file in errors."""
    s = {k: tuple(getattr(v, "shape", v)) for k, v in convert_vae_keys(shapes).items()}
    expected = "a Wan-2.1 / Qwen-Image VAE with an encoder (encoder.conv1, encoder.downsamples.N, conv1, conv2)"

    conv_in = s.get("encoder.conv1.weight")
    if conv_in is None:
        raise WeightFileError(path, "VAE tensor 'encoder.conv1.weight' is missing.", expected)
    if len(conv_in) != 5 or conv_in[1] not in (3, 4):
        raise WeightFileError(
            path, f"'encoder.conv1.weight' has shape {list(conv_in)}.",
            "a 5-D causal conv [C, 3, 3, 3, 3] (RGB), or [C, 4, 3, 3, 3] for the Qwen-Image-Layered RGBA VAE",
        )
    base, channels = conv_in[0], conv_in[1]
    head = s.get("decoder.head.2.weight")
    if head is not None and head[0] != channels:
        raise WeightFileError(
            path, f"the encoder takes {channels} pixel channels but the decoder gives {head[0]} "
            "('decoder.head.2.weight').", "an encoder and decoder of the same VAE (3 channels, or 4 for RGBA)",
        )
    if "conv2.weight" in s:
        z_dim = s["conv2.weight"][0]
    elif "conv1.weight" in s:
        z_dim = s["conv1.weight"][0] // 2
    else:
        raise WeightFileError(path, "VAE tensors 'conv1.weight' / 'conv2.weight' are missing.", expected)

    pattern = re.compile(r"^encoder\.downsamples\.(\d+)\.")
    indices = sorted({int(m.group(1)) for k in s if (m := pattern.match(k))})
    if indices != list(range(len(indices))) or not indices:
        raise WeightFileError(path, f"encoder.downsamples indices are {indices}.", "0, 1, 2, ... without gaps")
    stages: list[list[int]] = [[]]
    temporal: list[bool] = []
    for i in indices:
        p = f"encoder.downsamples.{i}."
        if p + "resample.1.weight" in s:
            temporal.append(p + "time_conv.weight" in s)
            stages.append([])
        elif p + "residual.6.weight" in s:
            stages[-1].append(s[p + "residual.6.weight"][0])
        else:
            raise WeightFileError(
                path,
                f"encoder.downsamples.{i} is neither a residual block nor a resample.",
                "the Wan-2.1 VAE layout (attention inside the down path is not supported)",
            )
    counts = {len(st) for st in stages}
    if len(counts) != 1 or 0 in counts or any(st[-1] % base for st in stages):
        raise WeightFileError(
            path, f"encoder down path has an irregular structure (channels per stage {stages}).", expected
        )
    return VAEConfig(
        base_dim=base,
        z_dim=z_dim,
        dim_mult=tuple(st[-1] // base for st in stages),
        num_res_blocks=len(stages[0]),
        temporal_downsample=tuple(temporal),
        input_channels=channels,
    )
