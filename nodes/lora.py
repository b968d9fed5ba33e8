"""LoRA loader node: patches a Qwen-Image model handle without touching the loaded weights."""
from __future__ import annotations

import weakref
from pathlib import Path

from ..core.keymaps.lora import is_union_control
from ..core.loading import lora
from . import runtime
from .handles import MODEL_TYPE


# module -> {path: (mtime, LoraWeights)}: re-parsing a 1.7 GB Lightning LoRA for every strength
# change would be wasteful, and the entry goes away with the model.
_PARSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# LoraWeights loaded under a union-control-LoRA name: the sampler wants a control image for them.
_UNION_CONTROL: "weakref.WeakSet" = weakref.WeakSet()
CONTROL_NODE = "Qwen-Image Control Reference"


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
        "Adds a LoRA (Lightning 4/8-step, style, union control, ...) to a Qwen-Image model. Chain several. Works on "
        "bf16, fp8 and GGUF models; changing the strength or removing the LoRA never reloads the model. Lightning: "
        "sample with 4 or 8 steps, cfg 1, shift_mode constant, shift 3. The union control LoRA "
        f"(qwen_image_union_diffsynth_lora) needs its control image connected through '{CONTROL_NODE}'."
    )
    LORA_TOOLTIP = (
        "File in models/loras. A union control LoRA (qwen_image_union_diffsynth_lora) needs the control map (canny, "
        f"depth, pose, lineart, ...) connected through '{CONTROL_NODE}'. It is recognised only by its name ('union' "
        "with 'control', 'diffsynth' or 'context'); its tensors look like any DiffSynth LoRA, so under another name "
        "nothing checks that the control image is connected."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE,),
                "lora_name": (runtime.file_choices("loras", gguf=False), {"tooltip": cls.LORA_TOOLTIP}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
            }
        }

    def apply(self, model, lora_name, strength):
        path = runtime.resolve_choice(lora_name, "loras", what="LoRA")
        weights = parsed_lora(path, model.module)
        runtime.log.info("LoRA %s", lora.lora_summary(weights))
        if is_union_control(lora_name):
            _UNION_CONTROL.add(weights)
        if strength == 0:
            return (model,)
        return (model.with_lora(str(path), weights, strength),)


def check_control_reference(model, positive_has_reference: bool, negative_has_reference: bool | None) -> None:
    """Refuses a model carrying a union control LoRA when the positive conditioning has no reference
    latent (the control image); warns when a negative in use has none. ``negative_has_reference``
    is None when no negative is used (cfg 1)."""
    names = [Path(lora_id).name for lora_id, weights, strength in getattr(model, "loras", ())
             if strength and weights in _UNION_CONTROL]
    if not names:
        return
    if not positive_has_reference:
        raise ValueError(
            f"the union control LoRA {names[0]} needs a control image, but the positive conditioning carries none. "
            f"Connect the control map (canny, depth, pose, lineart, ... as an IMAGE) to a '{CONTROL_NODE}' node "
            "(inputs positive, negative, vae, image) and its positive / negative / latent outputs to the sampler; "
            "or VAE-encode it and attach it with ReferenceLatent to both the positive and the negative. Without a "
            "control image, remove the LoRA or set its strength to 0"
        )
    if negative_has_reference is False:
        runtime.warn(
            f"the union control LoRA {names[0]} has its control image on the positive conditioning only; the "
            f"official workflow gives it to the negative too (connect the negative through '{CONTROL_NODE}')"
        )


NODE_CLASS_MAPPINGS = {"QwenImageLoraLoader": QwenImageLoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"QwenImageLoraLoader": "Load Qwen-Image LoRA"}
