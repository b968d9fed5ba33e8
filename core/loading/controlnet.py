"""ControlNet files -> ready modules: InstantX Union / Inpainting and DiffSynth blockwise patches.

The InstantX files use diffusers' ``QwenImageControlNetModel`` names (our parameter names); the
DiffSynth patches use ``img_in`` + ``controlnet_blocks.N.{x_rms,y_rms,input_proj,output_proj}``.
Either may carry a prefix. ControlNets of other model families are named in the error, since
users keep all their ControlNets in one folder.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping

from ..keymaps.detect import EXPECTED, Detected
from ..errors import WeightFileError
from ..keymaps.mmdit import find_prefix
from .engine import _load, _Plan, _plan_quant
from ..formats.safetensors_io import is_gguf, open_weights

CONTROLNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "controlnet.", "model.")
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
_CN_BLOCK = re.compile(r"^controlnet_blocks\.(\d+)\.")

# (what it is, pattern some name matches), checked in order on files that are not ours.
_FOREIGN_CONTROLNETS = [
    ("a Flux ControlNet", r"(?:^|\.)controlnet_single_blocks\.\d+\.|(?:^|\.)single_transformer_blocks\.\d+\.|(?:^|\.)double_blocks\.\d+\."),
    ("an SD3 ControlNet", r"(?:^|\.)joint_blocks\.\d+\.|(?:^|\.)pos_embed_input\."),
    ("an SDXL ControlNet", r"(?:^|\.)add_embedding\.linear_1\.|(?:^|\.)label_emb\.0\.0\."),
    ("a Stable Diffusion 1.5 / 2.x ControlNet", r"(?:^|\.)controlnet_cond_embedding\.|(?:^|\.)input_hint_block\.|^control_model\."),
]


def flavour(names: Iterable[str]) -> str | None:
    """'instantx', 'diffsynth' or None, from tensor names alone."""
    names = list(names)
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
    from ..models.mmdit import MMDiTConfig, default_axes

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
    dim, fan_in = shapes["img_in.weight"]
    layers = {int(m.group(1)) for n in shapes if (m := _CN_BLOCK.match(n))}
    return dict(num_layers=max(layers) + 1, dim=dim, in_channels=64, extra_in_channels=fan_in - 64)


def _precheck(p: Path) -> None:
    """Refuse GGUF and other families' ControlNets with a sentence naming what they are."""
    if p.is_file() and is_gguf(p):
        raise WeightFileError(p, "is a GGUF file; Qwen-Image ControlNets are loaded from .safetensors.",
                              EXPECTED["qwen_image_controlnet"])
    with open_weights(p, component="controlnet") as source:
        names = list(source.keys())
    if flavour(names) is None:
        other = foreign_controlnet(names)
        if other is not None:
            raise WeightFileError(p, f"is {other}, not a Qwen-Image ControlNet.", EXPECTED["qwen_image_controlnet"])


def load_controlnet(path, weight_dtype: str = "default", device="cpu", compute_dtype=None):
    """Load an InstantX ControlNet (Union or Inpainting) or a DiffSynth blockwise patch.

    Returns ``InstantXControlNet`` or ``DiffSynthControlNet``; ``weight_dtype`` as for
    ``load.load_mmdit`` (bf16 / fp16 / fp8 files are kept as stored with "default").
    """
    from ..models.controlnet import DiffSynthControlNet, InstantXControlNet

    p = Path(path).expanduser()
    _precheck(p)

    def prepare(source, found: Detected, shapes, path_: Path):
        plan = _Plan()
        side = _plan_quant(plan, source, path_)
        names = [k for k in source.keys() if k not in side]
        kind = flavour(names)
        anchor = "controlnet_blocks.0.x_rms.weight" if kind == "diffsynth" else "controlnet_x_embedder.weight"
        prefix = find_prefix(names, anchor, CONTROLNET_PREFIXES) or ""
        for key in names:
            if key.startswith(prefix):
                plan.routes[key] = key[len(prefix):]
            else:
                plan.unexpected.append(key)
        ours = {t: tuple(shapes[k]) for k, t in plan.routes.items()}
        try:
            if kind == "diffsynth":
                kw = diffsynth_config(ours)
                return plan, lambda: DiffSynthControlNet(**kw)
            cfg, extra = instantx_config(ours, source.config)
        except (KeyError, ValueError) as e:
            raise WeightFileError(path_, f"does not describe a usable ControlNet ({type(e).__name__}: {e}).",
                                  EXPECTED["qwen_image_controlnet"]) from None
        return plan, lambda: InstantXControlNet(cfg, extra_condition_channels=extra)

    model, _ = _load(p, "controlnet", None, "qwen_image_controlnet", weight_dtype, device, compute_dtype, prepare,
                     lambda name: name.startswith(("transformer_blocks.", "controlnet_blocks.")))
    return model
