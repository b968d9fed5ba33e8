"""Empty latents and the VAE: ComfyUI IMAGE <-> raw Qwen-Image LATENT."""
from __future__ import annotations

import torch

from ..core.pipeline import latent_format as lf
from . import placement, runtime
from .handles import VAE_TYPE

# The official Qwen-Image sizes (width x height).
ASPECT_PRESETS = {
    "1:1 (1328x1328)": (1328, 1328),
    "16:9 (1664x928)": (1664, 928),
    "9:16 (928x1664)": (928, 1664),
    "4:3 (1472x1104)": (1472, 1104),
    "3:4 (1104x1472)": (1104, 1472),
    "3:2 (1584x1056)": (1584, 1056),
    "2:3 (1056x1584)": (1056, 1584),
}
CUSTOM = "custom"
MAX_SIDE = 8192


def round16(value: int, what: str) -> int:
    """The MMDiT packs 2x2 latent pixels, so images are made in steps of 16 pixels."""
    value = int(value)
    rounded = max(16, int(value / 16.0 + 0.5) * 16)  # half up: 1000 -> 1008
    if rounded != value:
        runtime.warn(f"{what} {value} is not a multiple of 16; using {rounded}")
    return rounded


class QwenImageEmptyLatent:
    CATEGORY = "Qwen-Image/latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    DESCRIPTION = "An empty latent at one of Qwen-Image's official sizes, or any size in steps of 16."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "width": ("INT", {"default": 1328, "min": 16, "max": MAX_SIDE, "step": 16}),
                "height": ("INT", {"default": 1328, "min": 16, "max": MAX_SIDE, "step": 16}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            },
            "optional": {
                "aspect_ratio": ([CUSTOM] + list(ASPECT_PRESETS), {"default": CUSTOM, "tooltip": "A preset overrides width and height."}),
            },
        }

    def generate(self, width, height, batch_size, aspect_ratio=CUSTOM):
        if aspect_ratio != CUSTOM:
            if aspect_ratio not in ASPECT_PRESETS:
                raise ValueError(f"unknown aspect_ratio {aspect_ratio!r}; choose one of {[CUSTOM] + list(ASPECT_PRESETS)}")
            width, height = ASPECT_PRESETS[aspect_ratio]
        width, height = round16(width, "width"), round16(height, "height")
        samples = torch.zeros(int(batch_size), lf.LATENT_CHANNELS, height // 8, width // 8)
        return ({"samples": samples},)


def vae_dtype(vae) -> torch.dtype:
    for p in vae.module.parameters():
        return p.dtype
    return torch.float32


class QwenImageVAEDecode:
    CATEGORY = "Qwen-Image/latent"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    DESCRIPTION = "Decodes a Qwen-Image latent to an image; large images are decoded in tiles (and automatically on out-of-memory)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"vae": (VAE_TYPE,), "samples": ("LATENT",)},
            "optional": {"tiled": (["auto", "always", "never"], {"default": "auto"})},
        }

    def decode(self, vae, samples, tiled="auto"):
        z, _ = lf.to_4d(samples["samples"])
        lf.check_channels(z)
        px = _per_image(vae, z, {"always": "decode_tiled", "never": "decode"}.get(tiled, "decode_auto"))
        return (((px.clamp(-1, 1) + 1.0) * 0.5).permute(0, 2, 3, 1).contiguous(),)


class QwenImageVAEEncode:
    CATEGORY = "Qwen-Image/latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    DESCRIPTION = "Encodes an image into a raw Qwen-Image latent (for img2img, inpainting and references)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"vae": (VAE_TYPE,), "pixels": ("IMAGE",)},
            "optional": {"tiled": (["auto", "always", "never"], {"default": "auto"})},
        }

    def encode(self, vae, pixels, tiled="auto"):
        px = image_to_vae_input(pixels)
        z = _per_image(vae, px, {"always": "encode_tiled", "never": "encode"}.get(tiled, "encode_auto"))
        return ({"samples": z},)


def _per_image(vae, batch: torch.Tensor, method: str) -> torch.Tensor:
    """Run ``vae.module.<method>`` on each item of ``batch`` on the compute device (the VAE's
    activations, not its weights, dominate memory), returning float32 results on the CPU."""
    device = runtime.compute_device()
    out = []
    with placement.on_device(vae.module, device), torch.inference_mode():
        fn = getattr(vae.module, method)
        for i in range(batch.shape[0]):
            out.append(fn(batch[i : i + 1].to(device=device, dtype=vae_dtype(vae))).float().cpu())
            runtime.check_interrupt()
    return torch.cat(out)


def image_to_vae_input(pixels: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] in 0..1 -> [B,3,H,W] in -1..1, with alpha dropped and gray expanded."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim not in (3, 4):
        raise ValueError(f"expected an IMAGE tensor [B,H,W,3]; got {getattr(pixels, 'shape', type(pixels))}")
    if pixels.ndim == 3:
        pixels = pixels[None]
    c = pixels.shape[-1]
    if c == 4:
        pixels = pixels[..., :3]
    elif c == 1:
        pixels = pixels.expand(*pixels.shape[:-1], 3)
    elif c != 3:
        raise ValueError(f"expected an IMAGE with 1, 3 or 4 channels in the last dimension; got shape {tuple(pixels.shape)}")
    h, w = pixels.shape[1:3]
    if h < 8 or w < 8:
        raise ValueError(f"the image is {w}x{h} pixels; the VAE needs at least 8x8 (Qwen-Image works best near 1 megapixel)")
    return pixels.float().permute(0, 3, 1, 2).mul(2.0).sub(1.0).clamp(-1, 1)


NODE_CLASS_MAPPINGS = {
    "QwenImageEmptyLatent": QwenImageEmptyLatent,
    "QwenImageVAEDecode": QwenImageVAEDecode,
    "QwenImageVAEEncode": QwenImageVAEEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QwenImageEmptyLatent": "Qwen-Image Empty Latent",
    "QwenImageVAEDecode": "Qwen-Image VAE Decode",
    "QwenImageVAEEncode": "Qwen-Image VAE Encode",
}
