"""LoRA loader node: patches a Qwen-Image model handle without touching the loaded weights."""
from __future__ import annotations

import weakref
from pathlib import Path

from ..core.loading import lora
from . import runtime
from .handles import MODEL_TYPE


# module -> {path: (mtime, LoraWeights)}: re-parsing a 1.7 GB Lightning LoRA for every strength
# change would be wasteful, and the entry goes away with the model.
_PARSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def parsed_lora(path: Path, module) -> "lora.LoraWeights":
    per_model = _PARSED.setdefault(module, {})
    mtime = path.stat().st_mtime
    hit = per_model.get(str(path))
    if hit is not None and hit[0] == mtime:
        return hit[1]
    state = lora.load_lora_file(path)
    weights = lora.parse_lora(state, module, path.name, getattr(state, "metadata", None))
    per_model[str(path)] = (mtime, weights)
    return weights


class QwenImageLoraLoader:
    CATEGORY = "Qwen-Image/loaders"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = (
        "Adds a LoRA (Lightning 4/8-step, style, ...) to a Qwen-Image model. Chain several. Works on bf16, fp8 and "
        "GGUF models; changing the strength or removing the LoRA never reloads the model. Lightning: sample with "
        "4 or 8 steps, cfg 1, shift_mode constant, shift 3."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE,),
                "lora_name": (runtime.file_choices("loras", gguf=False), {"tooltip": "File in models/loras."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
            }
        }

    def apply(self, model, lora_name, strength):
        path = runtime.resolve_choice(lora_name, "loras", what="LoRA")
        weights = parsed_lora(path, model.module)
        runtime.log.info("LoRA %s", lora.lora_summary(weights))
        if strength == 0:
            return (model,)
        return (model.with_lora(str(path), weights, strength),)


NODE_CLASS_MAPPINGS = {"QwenImageLoraLoader": QwenImageLoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"QwenImageLoraLoader": "Load Qwen-Image LoRA"}
