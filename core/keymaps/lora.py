"""LoRA key names: which layer a key belongs to, what role it plays, which trainer wrote it.

LoRA files for the same model come from many trainers, each spelling keys its own way:
- diffusers / PEFT: ``transformer.<layer>.lora_A.weight`` (``lora_A.default.weight`` when saved
  with the adapter name, ``lora.down.weight`` in old diffusers files), alpha in JSON metadata;
- DiffSynth-Studio (the union control LoRA): PEFT's ``<layer>.lora_A.default.weight`` with no alpha
  (scale 1), the trainer's ``pipe.dit.`` prefix removed on save (or left on);
- kohya / musubi-tuner: ``lora_unet_<layer with dots as underscores>.lora_down.weight`` + ``.alpha``;
- ComfyUI: ``diffusion_model.<layer>.lora_down.weight`` (the Lightning LoRAs: bare or prefixed
  ``<layer>.lora_down.weight`` / ``lora_up`` / ``alpha``);
- LyCORIS: the same prefixes with LoHa (``hada_w1_a`` ...) or LoKr (``lokr_w1`` ...) factors.
"""
from __future__ import annotations

import re
from typing import Iterable

# (pattern on the key's tail, role). The part before the match is the layer path.
_ROLE_PATTERNS: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), role)
    for p, role in (
        # PEFT writes the adapter name between lora_A and weight unless it strips it.
        (r"\.lora_A(?:\.[^.]+)?\.weight$", "down"),
        (r"\.lora_B(?:\.[^.]+)?\.weight$", "up"),
        (r"\.(?:lora_down|lora\.down|lora_linear_layer\.down)\.weight$", "down"),
        (r"\.(?:lora_up|lora\.up|lora_linear_layer\.up)\.weight$", "up"),
        (r"\.alpha$", "alpha"),
        (r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2)(?:\.[^.]+)?(?:\.weight)?$", None),
        (r"\.(?:dora_scale|lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?)$", "dora"),
        (r"\.diff_b$", "diff_b"),
        (r"\.diff$", "diff"),
        (r"\.lora_mid\.weight$", "mid"),
        (r"\.lora_[AB](?:\.[^.]+)?\.bias$", "lora_bias"),
    )
)

# Stripped one at a time until the path names a layer; order matters (longest first).
_PREFIXES = (
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "lora_unet_",
    "lora_transformer_",
    "lycoris_",
    "pipe.dit.",
    "model.",
)

FORMAT_NAMES = {
    "kohya": "kohya",
    "lycoris": "LyCORIS",
    "comfy": "ComfyUI",
    "diffusers": "diffusers/PEFT",
    "diffsynth": "DiffSynth/PEFT",
    "bare": "bare-key",
}


def split_key(key: str) -> tuple[str, str] | None:
    """``"a.b.lora_down.weight"`` -> ``("a.b", "down")``; None for a key no LoRA format uses."""
    for pattern, role in _ROLE_PATTERNS:
        m = pattern.search(key)
        if m:
            return key[: m.start()], role or m.group(1)
    return None


def key_format(key: str) -> str:
    """Which trainer family a key's spelling points to (a ``FORMAT_NAMES`` key)."""
    if key.startswith(("lora_unet_", "lora_transformer_")):
        return "kohya"
    if key.startswith("lycoris_"):
        return "lycoris"
    if key.startswith(("diffusion_model.", "model.diffusion_model.")):
        return "comfy"
    if key.startswith("pipe.dit.") or ".lora_A.default." in key or ".lora_B.default." in key:
        return "diffsynth"
    if key.startswith(("transformer.", "base_model.model.")) or ".lora_A" in key or ".lora_B" in key:
        return "diffusers"
    return "bare"


class LayerNames:
    """Resolves a LoRA layer path to one of a model's Linear names.

    kohya flattens ``transformer_blocks.0.attn.to_out.0`` to ``transformer_blocks_0_attn_to_out_0``;
    module names contain underscores themselves, so the only reliable inverse is a table built
    from the model's own names.
    """

    def __init__(self, names: Iterable[str]):
        self.names = set(names)
        self.flat: dict[str, str] = {}
        ambiguous = set()
        for name in self.names:
            flat = name.replace(".", "_")
            if flat in self.flat and self.flat[flat] != name:
                ambiguous.add(flat)
            self.flat[flat] = name
        for flat in ambiguous:
            del self.flat[flat]

    def resolve(self, path: str) -> str | None:
        while True:
            if path in self.names:
                return path
            if path in self.flat:
                return self.flat[path]
            for prefix in _PREFIXES:
                if path.startswith(prefix):
                    path = path[len(prefix):]
                    break
            else:
                return None


# Layer-name fragments of other model families. Checked on keys that did not resolve, so a
# Qwen-Image LoRA that also carries a text-encoder part is not mistaken for another model.
_OTHER_MODELS = (
    (("double_blocks", "single_blocks", "single_transformer_blocks", "norm1_context", "ff_context"),
     "a Flux LoRA (or another double/single-stream DiT such as SD3 or HunyuanVideo)"),
    (("joint_blocks", "context_block", "x_block"), "a Stable Diffusion 3 LoRA"),
    (("input_blocks", "output_blocks", "middle_block", "down_blocks", "up_blocks", "mid_block"),
     "a Stable Diffusion 1.x / SDXL UNet LoRA"),
    (("self_attn", "cross_attn"), "a Wan video-model LoRA"),
    (("noise_refiner", "context_refiner", "adaln_modulation"), "a Lumina 2 / Z-Image LoRA"),
)
_TEXT_ENCODER = ("lora_te", "text_encoder", "text_model", "te1_", "te2_", "lora_te1", "lora_te2")


def guess_other_model(paths: Iterable[str]) -> str | None:
    """A phrase naming the model family these unresolved layer paths belong to, or None."""
    paths = [p.lower() for p in paths if not looks_like_text_encoder([p])]
    for fragments, what in _OTHER_MODELS:
        if any(f in p for p in paths for f in fragments):
            return what
    return None


def looks_like_text_encoder(paths: Iterable[str]) -> bool:
    paths = list(paths)
    return bool(paths) and all(any(t in p.lower() for t in _TEXT_ENCODER) for p in paths)


# The union control LoRA (DiffSynth "Qwen-Image-In-Context-Control-Union"; ComfyUI's file is
# qwen_image_union_diffsynth_lora.safetensors) was trained with the control map appended as a
# reference image and is meaningless without one. Its tensors cannot tell it apart: every
# DiffSynth-trained Qwen-Image LoRA has the same keys, rank-64 factors, no alpha and no metadata.
# Only the file name can, so a renamed file is not recognised.
_UNION_WORDS = ("control", "diffsynth", "context")


def is_union_control(lora_name: str) -> bool:
    """Whether a LoRA's name in the loras folder (subfolders included, as DiffSynth's download
    ``Qwen-Image-In-Context-Control-Union/model.safetensors``) names the union control LoRA."""
    name = lora_name.lower()
    return "union" in name and any(w in name for w in _UNION_WORDS)
