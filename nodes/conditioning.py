"""Text encoding into ComfyUI CONDITIONING."""
from __future__ import annotations

import torch

from ..core.models import text_encoder as te
from . import placement, runtime
from .handles import TEXT_ENCODER_TYPE


def make_conditioning(embeds: torch.Tensor, mask: torch.Tensor | None = None) -> list:
    """ComfyUI's CONDITIONING: a list of [tensor [1,L,3584], dict]; core samplers accept it too."""
    extra: dict = {"pooled_output": None}
    if mask is not None and not bool(mask.all()):
        extra["attention_mask"] = mask
    return [[embeds, extra]]


class QwenImageTextEncode:
    CATEGORY = "Qwen-Image/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    DESCRIPTION = (
        "Encodes a prompt with Qwen2.5-VL using Qwen-Image's text-to-image template. Use it for the "
        "positive prompt and, with ' ' or what to avoid, for the negative."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (TEXT_ENCODER_TYPE,),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": ""}),
            }
        }

    def encode(self, text_encoder, prompt):
        device = runtime.compute_device()
        with placement.on_device(text_encoder.module, device, stream_blocks="layers"), torch.inference_mode():
            embeds = te.encode_text(text_encoder.module, text_encoder.tokenizer, prompt, kind="t2i", device=device)
        return (make_conditioning(embeds.float().cpu()),)


NODE_CLASS_MAPPINGS = {"QwenImageTextEncode": QwenImageTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"QwenImageTextEncode": "Qwen-Image Text Encode"}
