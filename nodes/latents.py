"""Empty latents and the VAE: ComfyUI IMAGE <-> raw Qwen-Image LATENT.

Qwen-Image-Layered: its LATENT is ``[B,16,L+1,h,w]`` (frame 0 the composite image, then L RGBA
layers; ComfyUI's EmptyQwenImageLayeredLatentImage makes the same), and its VAE has 4 pixel
channels (RGBA). Decoding gives RGBA images; ``QwenImageDecodeLayers`` splits them into an
RGB batch and the alpha MASK. A Layered latent and a 3-channel VAE (or the other way round) are
refused with the file to connect.
"""
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
MAX_LAYERS = 64

LAYERED_VAE_FILE = "qwen_image_layered_vae.safetensors"
PLAIN_VAE_FILE = "qwen_image_vae.safetensors"
LAYERED_MODEL_FILE = "qwen_image_layered_bf16.safetensors"


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


class QwenImageEmptyLayeredLatent:
    CATEGORY = "Qwen-Image/latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    DESCRIPTION = (
        "An empty Qwen-Image-Layered latent [batch, 16, layers+1, height/8, width/8]: frame 0 is the composite "
        "image, frames 1..layers the RGBA layers (ComfyUI's 'Empty Qwen Image Layered Latent' makes the same). "
        "Use the input image's size; 640 px is what the model was trained at."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "width": ("INT", {"default": 640, "min": 16, "max": MAX_SIDE, "step": 16}),
                "height": ("INT", {"default": 640, "min": 16, "max": MAX_SIDE, "step": 16}),
                "layers": ("INT", {"default": 3, "min": 0, "max": MAX_LAYERS, "tooltip": "RGBA layers to make, besides the composite (frame 0). 0: one image (Layered-Control extracts one layer)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            },
            "optional": {
                "size_from": ("LATENT", {"tooltip": "The input image's latent (VAE Encode): when connected, width and "
                                                    "height are taken from it, so the layers line up with the "
                                                    "image pixel for pixel."}),
            },
        }

    def generate(self, width, height, layers, batch_size, size_from=None):
        layers = int(layers)
        if not 0 <= layers <= MAX_LAYERS:
            raise ValueError(f"layers must be between 0 and {MAX_LAYERS}; got {layers}")
        # Like ComfyUI's node: pixels // 8, not rounded to 16. The official template feeds it the input
        # image's size (a 640 x 427 image encodes to 53 latent rows), and the layers must have the
        # reference's grid to line up with it; the MMDiT pads an odd grid itself.
        if size_from is not None:  # the decomposed image's own latent size
            rows, cols = (int(n) for n in size_from["samples"].shape[-2:])
        else:
            rows, cols = max(2, int(height) // 8), max(2, int(width) // 8)
        samples = torch.zeros(int(batch_size), lf.LATENT_CHANNELS, layers + 1, rows, cols)
        return ({"samples": lf.tag_layered(samples, True)},)


def vae_is_rgba(vae) -> bool:
    """The Qwen-Image-Layered VAE (4 pixel channels)."""
    return getattr(getattr(vae.module, "config", None), "input_channels", 3) == 4


def check_latent_for_vae(samples: torch.Tensor, vae) -> None:
    """Refuse a Layered latent with the 3-channel VAE, and a plain one with the RGBA VAE, naming the file."""
    layered = lf.layered_tag(samples)
    if layered is None and lf.has_frames(samples):
        layered = True
    rgba = vae_is_rgba(vae)
    if layered and not rgba:
        raise ValueError(
            f"this latent holds Qwen-Image-Layered layers (shape {list(samples.shape)}), but the connected VAE is the "
            f"3-channel Qwen-Image VAE ({vae.name}), which has no alpha: load {LAYERED_VAE_FILE} with "
            "'Load Qwen-Image VAE' and connect it to this node's vae input"
        )
    if layered is False and rgba:
        raise ValueError(
            f"this latent was made by a Qwen-Image model that is not Layered, but the connected VAE is the RGBA "
            f"Qwen-Image-Layered VAE ({vae.name}): connect the Qwen-Image VAE ({PLAIN_VAE_FILE}), or sample with a "
            f"Qwen-Image-Layered model ({LAYERED_MODEL_FILE})"
        )


def layered_latent_error(shape, model_name: str) -> ValueError:
    """What to connect when a plain model gets a latent of several frames (ours and the core bridge)."""
    return ValueError(
        f"this latent has {shape[2]} frames ({list(shape)}): a Qwen-Image-Layered latent (composite + layers), but "
        f"{model_name} is not a Qwen-Image-Layered model. Load {LAYERED_MODEL_FILE} to make layers, or use a "
        "one-frame latent (Qwen-Image Empty Latent, or ComfyUI's EmptySD3LatentImage)"
    )


def check_latents_for_model(latents, layered_model: bool, what: str) -> None:
    """Refuse latents the other VAE family encoded (see ``lf.LAYERED_TAG``) for this model, naming the file."""
    for z in latents:
        tag = lf.layered_tag(z)
        if tag is False and layered_model:
            raise ValueError(
                f"this Qwen-Image-Layered model got a {what} encoded by the 3-channel Qwen-Image VAE: load "
                f"{LAYERED_VAE_FILE} (the RGBA VAE) with 'Load Qwen-Image VAE' and connect it to the VAE Encode "
                "node that makes it"
            )
        if tag is True and not layered_model:
            raise ValueError(
                f"this Qwen-Image model is not Layered, but it got a {what} from Qwen-Image-Layered (its RGBA VAE or "
                f"its layered latent): connect the Qwen-Image VAE ({PLAIN_VAE_FILE}) and a plain empty latent, or load "
                f"a Qwen-Image-Layered model ({LAYERED_MODEL_FILE})"
            )


def frames_to_batch(samples: torch.Tensor) -> torch.Tensor:
    """``[B,16,F,h,w]`` -> ``[B*F,16,h,w]``, frames of each item together, composite first
    (ComfyUI's LatentCutToBatch(dim t, slice 1) order); 4-D and single-frame latents as ``lf.to_4d``."""
    if lf.has_frames(samples):
        b, c, f, h, w = samples.shape
        return samples.transpose(1, 2).reshape(b * f, c, h, w)
    return lf.to_4d(samples)[0]


def vae_dtype(vae) -> torch.dtype:
    for p in vae.module.parameters():
        return p.dtype
    return torch.float32


class QwenImageVAEDecode:
    CATEGORY = "Qwen-Image/latent"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    DESCRIPTION = (
        "Decodes a Qwen-Image latent to an image; large images are decoded in tiles (and automatically on "
        "out-of-memory). With the Qwen-Image-Layered VAE the images are RGBA, and a layered latent gives every "
        "frame, composite first (Qwen-Image Decode Layers splits off the alpha)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"vae": (VAE_TYPE,), "samples": ("LATENT",)},
            "optional": {"tiled": (["auto", "always", "never"], {"default": "auto"})},
        }

    def decode(self, vae, samples, tiled="auto"):
        return (decode_images(vae, samples["samples"], tiled),)


def decode_images(vae, samples: torch.Tensor, tiled: str = "auto") -> torch.Tensor:
    """LATENT samples -> IMAGE ``[N,H,W,C]`` in 0..1 (C = 4 with the RGBA VAE; a layered latent
    gives its frames as images, see ``frames_to_batch``)."""
    check_latent_for_vae(samples, vae)
    z = frames_to_batch(samples)
    lf.check_channels(z)
    px = _per_image(vae, z, {"always": "decode_tiled", "never": "decode"}.get(tiled, "decode_auto"))
    return ((px.clamp(-1, 1) + 1.0) * 0.5).permute(0, 2, 3, 1).contiguous()


class QwenImageDecodeLayers:
    CATEGORY = "Qwen-Image/latent"
    RETURN_TYPES = ("IMAGE", "MASK", "IMAGE")
    RETURN_NAMES = ("layers", "mask", "rgba")
    OUTPUT_TOOLTIPS = (
        "The layers' colours, RGB, one image per layer (batch item by batch item, layer 1 first).",
        "Each layer's alpha as a ComfyUI MASK, the way Load Image and Split Image with Alpha give it: 1 where the "
        "layer is transparent, 0 where opaque (mask = 1 - alpha). Join Image with Alpha and Porter-Duff Image "
        "Composite take it as it is; for Image Composite Masked put Invert Mask in between.",
        "The layers as RGBA images: Save Image writes them as transparent PNGs.",
    )
    FUNCTION = "decode"
    DESCRIPTION = (
        "Decodes a Qwen-Image-Layered latent [B,16,layers+1,h,w] with the Qwen-Image-Layered VAE "
        "(qwen_image_layered_vae.safetensors) into its RGBA layers: their colours as an IMAGE batch, their alpha "
        "as a MASK batch (ComfyUI's convention, 1 - alpha, as Split Image with Alpha gives it), and both together "
        "as RGBA images. Frame 0 (the composite of the input image) is left out unless include_composite is on."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"vae": (VAE_TYPE,), "samples": ("LATENT",)},
            "optional": {
                "include_composite": ("BOOLEAN", {"default": False, "tooltip": "Also output frame 0, the composite image, first in each batch item. Applies to the sampler's layered latent as it comes out; single frames (e.g. after a batch cut) are all decoded."}),
                "tiled": (["auto", "always", "never"], {"default": "auto"}),
            },
        }

    def decode(self, vae, samples, include_composite=False, tiled="auto"):
        z = samples["samples"]
        if not vae_is_rgba(vae):
            raise ValueError(
                f"Qwen-Image Decode Layers needs the RGBA Qwen-Image-Layered VAE, but the connected VAE is the "
                f"3-channel Qwen-Image VAE ({vae.name}): load {LAYERED_VAE_FILE} with 'Load Qwen-Image VAE' and "
                "connect it to the vae input"
            )
        check_latent_for_vae(z, vae)
        # Frame 0 of a sampled layered latent is the composite. A latent of one frame (layers 0, or
        # frames cut into a batch item by item) is decoded whole: nothing here can tell a cut-out
        # composite from a layer, so connect the sampler's latent directly to drop the composite.
        if lf.has_frames(z) and not include_composite:
            z = z[:, :, 1:]
        images = decode_images(vae, z, tiled)
        return (images[..., :3].contiguous(), 1.0 - images[..., 3], images)


class QwenImageVAEEncode:
    CATEGORY = "Qwen-Image/latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    DESCRIPTION = (
        "Encodes an image into a raw Qwen-Image latent (for img2img, inpainting and references). With the "
        "Qwen-Image-Layered VAE the image's alpha is encoded too (an RGB image counts as opaque)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"vae": (VAE_TYPE,), "pixels": ("IMAGE",)},
            "optional": {"tiled": (["auto", "always", "never"], {"default": "auto"})},
        }

    def encode(self, vae, pixels, tiled="auto"):
        rgba = vae_is_rgba(vae)
        px = image_to_vae_input(pixels, 4 if rgba else 3)
        z = _per_image(vae, px, {"always": "encode_tiled", "never": "encode"}.get(tiled, "encode_auto"))
        return ({"samples": lf.tag_layered(z, rgba)},)


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


def image_to_vae_input(pixels: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] in 0..1 -> [B,3,H,W] in -1..1, with alpha dropped and gray expanded.

    ``channels`` 4 (the Qwen-Image-Layered VAE): [B,4,H,W], the image's alpha kept, an opaque one
    (1, as ComfyUI pads it) added to RGB and gray images."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim not in (3, 4):
        raise ValueError(f"expected an IMAGE tensor [B,H,W,3]; got {getattr(pixels, 'shape', type(pixels))}")
    if pixels.ndim == 3:
        pixels = pixels[None]
    c = pixels.shape[-1]
    if channels == 4 and c in (1, 3):
        rgb = pixels.expand(*pixels.shape[:-1], 3) if c == 1 else pixels
        pixels = torch.cat([rgb, torch.ones_like(rgb[..., :1])], dim=-1)
    elif channels == 4 and c == 4:
        pass
    elif c == 4:
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
    "QwenImageEmptyLayeredLatent": QwenImageEmptyLayeredLatent,
    "QwenImageDecodeLayers": QwenImageDecodeLayers,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QwenImageEmptyLatent": "Qwen-Image Empty Latent",
    "QwenImageVAEDecode": "Qwen-Image VAE Decode",
    "QwenImageVAEEncode": "Qwen-Image VAE Encode",
    "QwenImageEmptyLayeredLatent": "Qwen-Image Empty Layered Latent",
    "QwenImageDecodeLayers": "Qwen-Image Decode Layers",
}
