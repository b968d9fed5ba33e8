"""Text encoding into ComfyUI CONDITIONING, and control images attached to it as reference latents."""
from __future__ import annotations

import torch

from ..core.encoders import text_encoder as te
from . import placement, runtime
from .handles import TEXT_ENCODER_TYPE, VAE_TYPE, conditioning_entries
from .latents import QwenImageVAEEncode

VAE_STEP = 8  # pixels per latent pixel: the control image is cropped to a multiple, as ComfyUI's VAEEncode does
LARGE_CONTROL = 4 * 1024 * 1024


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


def with_reference(conditioning, latent: torch.Tensor, what: str) -> list:
    """``conditioning`` with ``latent`` appended to each entry's ``reference_latents`` (ComfyUI's
    ReferenceLatent: the entries' dicts are copied, earlier references kept)."""
    out = []
    for ctx, extra in conditioning_entries(conditioning, what):
        extra = dict(extra)
        extra["reference_latents"] = list(extra.get("reference_latents") or []) + [latent]
        out.append([ctx, extra])
    return out


def crop_to_vae_grid(image: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` centre-cropped to multiples of 8 pixels (ComfyUI's VAEEncode does the same)."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        raise ValueError(f"image: expected an IMAGE [batch, height, width, channels], got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    if image.ndim == 3:
        image = image[None]
    h, w = image.shape[1:3]
    if min(h, w) < 2 * VAE_STEP:
        raise ValueError(f"image: the control image is {w}x{h} pixels; it must be at least 16x16 (about 1 megapixel "
                         "works best: scale it with ImageScaleToTotalPixels first, as the official workflow does)")
    ch, cw = h // VAE_STEP * VAE_STEP, w // VAE_STEP * VAE_STEP
    if h * w > LARGE_CONTROL:
        runtime.warn(f"the control image is {w}x{h} ({h * w / 1e6:.0f} MP) and sets the output size; Qwen-Image works "
                     "near 1 megapixel: scale it first (ImageScaleToTotalPixels, 1 megapixel)")
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[:, top:top + ch, left:left + cw]


class QwenImageControlReference:
    CATEGORY = "Qwen-Image/conditioning"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "apply"
    DESCRIPTION = (
        "Attaches a control image (canny, depth, pose, lineart, softedge, normal, or any RGB map) to the positive "
        "and negative conditioning as a reference latent: what the union control LoRA "
        "(qwen_image_union_diffsynth_lora) reads. The image is VAE-encoded at its own size (cropped to a multiple "
        "of 8 pixels) and sets the output size: sample into 'latent'. Same as VAE Encode -> ReferenceLatent on "
        "both prompts in ComfyUI's template."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "vae": (VAE_TYPE,),
                "image": ("IMAGE", {"tooltip": "The control map, e.g. Canny's output; about 1 megapixel "
                                               "(ImageScaleToTotalPixels before the preprocessor)."}),
            },
        }

    def apply(self, positive, negative, vae, image):
        pixels = crop_to_vae_grid(image)
        latent = QwenImageVAEEncode().encode(vae, pixels)[0]["samples"]
        pos = with_reference(positive, latent, "positive")
        neg = with_reference(negative, latent, "negative")
        return pos, neg, {"samples": torch.zeros_like(latent)}


NODE_CLASS_MAPPINGS = {
    "QwenImageTextEncode": QwenImageTextEncode,
    "QwenImageControlReference": QwenImageControlReference,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QwenImageTextEncode": "Qwen-Image Text Encode",
    "QwenImageControlReference": "Qwen-Image Control Reference",
}
