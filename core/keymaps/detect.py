"""Recognise what a set of tensor names is, so a loader can say what it was given.

Users put files in the wrong folder all the time (a Flux model in the diffusion-model
loader, the text encoder in the VAE loader). ``detect`` looks only at names and shapes and
``mismatch_message`` turns the result into a sentence that tells them what to do instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from .dfloat11 import is_dfloat11

QWEN_KINDS = ("qwen_image_mmdit", "qwen25vl_text_encoder", "wan_vae", "qwen_image_controlnet")

FRIENDLY = {
    "qwen_image_mmdit": "a Qwen-Image diffusion model (MMDiT)",
    "qwen25vl_text_encoder": "the Qwen2.5-VL text encoder",
    "wan_vae": "the Qwen-Image VAE (Wan-2.1)",
    "qwen_image_controlnet": "a Qwen-Image ControlNet",
    "qwen25vl_vision": "a Qwen2.5-VL vision tower on its own (mmproj)",
    "lora": "a LoRA",
    "flux": "a Flux diffusion model",
    "sd1": "a Stable Diffusion 1.x/2.x checkpoint",
    "sdxl": "a Stable Diffusion XL checkpoint",
    "sd3": "a Stable Diffusion 3 diffusion model",
    "wan_dit": "a Wan video diffusion model",
    "wan22_vae": "the Wan-2.2 VAE (48 latent channels)",
    "qwen3_text_encoder": "a Qwen3 text encoder (Z-Image / Lumina style)",
    "llama_text_encoder": "a Llama-style text encoder",
    "clip_text": "a CLIP text encoder",
    "t5_text": "a T5 text encoder",
    "other_vae": "a VAE of another model family (SD / SDXL / Flux)",
    "unknown": "not a model this pack recognises",
}

# What each loader wants, in words a user can act on.
EXPECTED = {
    "qwen_image_mmdit": "a Qwen-Image MMDiT (qwen_image_bf16.safetensors, qwen_image_fp8_e4m3fn.safetensors, "
                        "a qwen-image GGUF, a diffusers transformer/ folder or a DFloat11 folder)",
    "qwen25vl_text_encoder": "the Qwen2.5-VL-7B text encoder (qwen_2.5_vl_7b.safetensors, "
                             "qwen_2.5_vl_7b_fp8_scaled.safetensors, a Qwen2.5-VL-7B GGUF or a diffusers text_encoder/ folder)",
    "wan_vae": "the Qwen-Image VAE (qwen_image_vae.safetensors, qwen_image_layered_vae.safetensors for "
               "Qwen-Image-Layered, or a diffusers vae/ folder)",
    "qwen_image_controlnet": "a Qwen-Image ControlNet (InstantX Qwen-Image-ControlNet-Union/-Inpainting, "
                             "Qwen-Image-2512-Fun-Controlnet-Union or a DiffSynth patch)",
}

LOADER_FOR = {
    "qwen_image_mmdit": "the Qwen-Image diffusion-model loader",
    "qwen25vl_text_encoder": "the text-encoder loader",
    "wan_vae": "the VAE loader",
    "qwen_image_controlnet": "the ControlNet loader",
    "lora": "the LoRA loader",
    "qwen25vl_vision": "it as the mmproj of the text-encoder loader",
}


@dataclass(frozen=True)
class Detected:
    kind: str
    detail: str = ""
    # Qwen components found in the same file (a bundled "all-in-one" checkpoint has several).
    components: tuple[str, ...] = ()

    @property
    def friendly(self) -> str:
        text = FRIENDLY.get(self.kind, self.kind)
        return f"{text} ({self.detail})" if self.detail else text

    @property
    def is_qwen(self) -> bool:
        return self.kind in QWEN_KINDS

    def has(self, kind: str) -> bool:
        return kind == self.kind or kind in self.components


def _search(names: list[str], pattern: str) -> re.Match | None:
    rx = re.compile(pattern)
    for n in names:
        m = rx.search(n)
        if m:
            return m
    return None


def _any(names: list[str], pattern: str) -> bool:
    return _search(names, pattern) is not None


def _count_blocks(names: list[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for n in names if (m := rx.search(n))})


def _prefix_of(name: str, tail: str) -> str:
    return name[: len(name) - len(tail)] if name.endswith(tail) else ""


def _shape(shapes: Mapping, name: str | None):
    if name is None or not shapes:
        return None
    s = shapes.get(name)
    return tuple(s) if s is not None else None


def _mmdit(names, shapes) -> Detected | None:
    m = _search(names, r"(?:^|\.)txt_norm\.weight$")
    # A DFloat11 file holds each block's compressed group (encoded_exponent, ...) instead of its weights.
    block_key = r"(?:^|\.)transformer_blocks\.(\d+)\.(?:img_mod\.1\.weight|encoded_exponent)$"
    if m is None or not _any(names, block_key):
        return None
    key = m.string
    prefix = _prefix_of(key, "txt_norm.weight")
    if _any(names, r"(?:^|\.)controlnet_blocks\.\d+\.weight$|(?:^|\.)controlnet_x_embedder\.weight$"):
        emb = _shape(shapes, next((n for n in names if n.endswith("controlnet_x_embedder.weight")), None))
        flavour = "inpainting" if emb and emb[-1] == 68 else "union"
        return Detected("qwen_image_controlnet", f"InstantX {flavour}")
    layers = _count_blocks(names, block_key)
    parts = [f"{layers} layers"]
    hidden = _shape(shapes, prefix + "img_in.weight")
    if hidden:
        parts.append(f"hidden {hidden[0]}")
    if prefix:
        parts.append(f"prefix '{prefix}'")
    if is_dfloat11(names):
        parts.append("DFloat11")
    if prefix + "time_text_embed.addition_t_embedding.weight" in set(names):
        parts.append("Qwen-Image-Layered")
    return Detected("qwen_image_mmdit", ", ".join(parts))


def _text(names, shapes, arch) -> Detected | None:
    if arch in ("qwen2vl", "qwen2", "qwen25vl") or (
        _any(names, r"^blk\.\d+\.attn_q\.weight$") and _any(names, r"^token_embd\.weight$")
    ):
        if arch and arch not in ("qwen2vl", "qwen2", "qwen25vl"):
            return Detected("llama_text_encoder", f"GGUF architecture '{arch}'")
        return Detected("qwen25vl_text_encoder", "llama.cpp GGUF layout")
    m = _search(names, r"(?:^|\.)layers\.0\.self_attn\.q_proj\.weight$")
    if m is None:
        return None
    base = m.string[: -len("0.self_attn.q_proj.weight")]
    if _any(names, r"(?:^|\.)layers\.\d+\.self_attn\.q_norm\.weight$"):
        return Detected("qwen3_text_encoder")
    if _any(names, r"(?:^|\.)encoder\.layers\.\d+\.self_attn\.q_proj") and not _any(names, r"mlp\.gate_proj"):
        return None  # CLIP-like; checked later
    if base + "0.self_attn.q_proj.bias" not in set(names):
        return Detected("llama_text_encoder", "no attention biases")
    layers = _count_blocks(names, r"(?:^|\.)layers\.(\d+)\.self_attn\.q_proj\.weight$")
    parts = [f"{layers} layers"]
    emb = _shape(shapes, next((n for n in names if n.endswith("embed_tokens.weight")), None))
    if emb:
        parts.append(f"hidden {emb[-1]}")
    if _any(names, r"(?:^|\.)visual\.blocks\.\d+\."):
        parts.append("with vision tower")
    return Detected("qwen25vl_text_encoder", ", ".join(parts))


def _vae(names, shapes) -> Detected | None:
    wan = _search(names, r"(?:^|\.)encoder\.conv1\.weight$")
    if wan is not None and _any(names, r"(?:^|\.)decoder\.upsamples\.\d+\."):
        prefix = _prefix_of(wan.string, "encoder.conv1.weight")
        z2 = _shape(shapes, prefix + "conv1.weight")
        return _wan_vae_kind(z2, "Wan layout", _shape(shapes, wan.string))
    dif = _search(names, r"(?:^|\.)encoder\.conv_in\.weight$")
    if dif is not None and _any(names, r"(?:^|\.)decoder\.up_blocks\.\d+\."):
        s = _shape(shapes, dif.string)
        if s is not None and len(s) != 5:
            return Detected("other_vae", "diffusers AutoencoderKL")
        prefix = _prefix_of(dif.string, "encoder.conv_in.weight")
        z2 = _shape(shapes, prefix + "quant_conv.weight")
        if s is None and z2 is None and _any(names, r"(?:^|\.)encoder\.down_blocks\.\d+\.resnets\."):
            return Detected("other_vae", "diffusers AutoencoderKL")
        return _wan_vae_kind(z2, "diffusers layout", s)
    return None


def _wan_vae_kind(z2, layout: str, conv_in=None) -> Detected:
    if z2 and z2[0] == 96:
        return Detected("wan22_vae")
    detail = layout + (f", {z2[0] // 2} latent channels" if z2 else "")
    if conv_in is not None and len(conv_in) == 5 and conv_in[1] == 4:
        detail += ", RGBA (Qwen-Image-Layered)"
    return Detected("wan_vae", detail)


# (kind, detail, pattern that must match some name); checked in order after the Qwen kinds.
_FOREIGN = [
    ("flux", "", r"(?:^|\.)double_blocks\.\d+\.|(?:^|\.)single_blocks\.\d+\."),
    ("flux", "diffusers layout", r"(?:^|\.)single_transformer_blocks\.\d+\."),
    ("sd3", "", r"(?:^|\.)joint_blocks\.\d+\."),
    ("sdxl", "", r"^conditioner\.embedders\.|(?:^|\.)diffusion_model\.label_emb\."),
    ("sd1", "", r"(?:^|\.)input_blocks\.\d+\.|^cond_stage_model\."),
    ("wan_dit", "", r"(?:^|\.)blocks\.\d+\.self_attn\.q\.weight$|(?:^|\.)patch_embedding\.weight$"),
    ("clip_text", "", r"(?:^|\.)text_model\.encoder\.layers\.\d+\."),
    ("t5_text", "", r"(?:^|\.)encoder\.block\.\d+\.layer\."),
    ("other_vae", "", r"^first_stage_model\.|(?:^|\.)encoder\.down\.\d+\.block\."),
]

_LORA = r"lora_[AB]\.|lora_(?:down|up)\.|^lora_unet_|^lora_te\d?_|\.hada_w1_a$|\.lokr_w1$"


def detect(names: Iterable[str], shapes: Mapping[str, tuple] | None = None, arch: str | None = None) -> Detected:
    """Say what a state dict is from its tensor names (and shapes where given).

    ``arch`` is a GGUF ``general.architecture`` when known.
    """
    names = list(names)
    shapes = shapes or {}
    if not names:
        return Detected("unknown", "no tensors")
    if _any(names, _LORA):
        return Detected("lora")
    if arch == "clip" or _any(names, r"^v\.blk\.\d+\.") or (
        _any(names, r"(?:^|\.)visual\.blocks\.\d+\.") and not _any(names, r"(?:^|\.)layers\.\d+\.self_attn\.")
    ):
        if not _any(names, r"(?:^|\.)txt_norm\.weight$"):
            return Detected("qwen25vl_vision")

    if _any(names, r"(?:^|\.)controlnet_blocks\.\d+\.x_rms\.|(?:^|\.)controlnet_blocks\.\d+\.input_proj\."):
        return Detected("qwen_image_controlnet", "DiffSynth blockwise patch")
    if _any(names, r"(?:^|\.)control_blocks\.\d+\.after_proj\.weight$") and _any(names, r"(?:^|\.)control_img_in\.weight$"):
        return Detected("qwen_image_controlnet", "Fun ControlNet")
    found = [d for d in (_mmdit(names, shapes), _text(names, shapes, arch), _vae(names, shapes)) if d is not None]
    qwen = [d for d in found if d.is_qwen]
    if qwen:
        first = qwen[0]
        comps = tuple(d.kind for d in qwen)
        return Detected(first.kind, first.detail, comps if len(comps) > 1 else ())
    for kind, detail, pattern in _FOREIGN:
        if _any(names, pattern):
            return Detected(kind, detail)
    if found:
        return found[0]
    if arch:
        return Detected("unknown", f"GGUF architecture '{arch}'")
    sample = ", ".join(names[:3])
    return Detected("unknown", f"{len(names)} tensors, e.g. {sample}")


def mismatch_message(found: Detected, wanted: str) -> str:
    """One sentence for a file of kind ``found`` given to the loader of ``wanted``."""
    expected = EXPECTED.get(wanted, FRIENDLY.get(wanted, wanted))
    if found.kind == "unknown":
        return f"this is {found.friendly}; put {expected} here."
    if found.kind in LOADER_FOR:
        return f"this is {found.friendly}; use {LOADER_FOR[found.kind]}, and put {expected} here."
    if found.kind in ("wan22_vae",):
        return f"this is {found.friendly}, not the one Qwen-Image uses; put {expected} here."
    return f"this is {found.friendly}, not Qwen-Image; put {expected} here."
