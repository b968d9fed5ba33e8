"""Edit conditioning (Qwen-Image-Edit, Edit-2509, Edit-2511) and the geometry helpers around it."""
from __future__ import annotations

import weakref

import torch

from ..core.pipeline import edit as E
from ..core.pipeline import latent_format as lf
from ..core.encoders.vision import QwenVisionTower, build_vision_tower
from . import placement, runtime
from .conditioning import make_conditioning
from .handles import MODEL_TYPE, TEXT_ENCODER_TYPE, VAE_TYPE
from .latents import vae_dtype

VARIANTS = ("auto", "edit", "edit-plus")
# diffusion-model variant -> the prompt template it was trained with
MODEL_TEMPLATE = {"edit": "edit", "edit-2509": "edit-plus", "edit-2511": "edit-plus"}
SIZING = ("preserve", "reference")
MIN_SIDE = 16
LARGE_PIXELS = 16 * E.VAE_AREA  # above this an input is mostly detail the model never sees

# text-encoder module -> its vision tower, built once from the loader's vision tensors
_TOWERS: "weakref.WeakKeyDictionary[torch.nn.Module, QwenVisionTower]" = weakref.WeakKeyDictionary()


def vision_tower_for(text_encoder) -> QwenVisionTower:
    vision = text_encoder.vision
    if isinstance(vision, QwenVisionTower):
        return vision
    if not vision:
        raise ValueError(
            f"The text encoder '{text_encoder.name}' has no vision tower, which Qwen-Image-Edit needs to see the "
            "input image. Load qwen_2.5_vl_7b_fp8_scaled.safetensors or qwen_2.5_vl_7b.safetensors (they include "
            "it), or, for a GGUF text encoder, choose its mmproj file (e.g. mmproj-Qwen2.5-VL-7B-Instruct-f16.gguf) "
            "as mmproj_name in the text-encoder loader."
        )
    tower = _TOWERS.get(text_encoder.module)
    if tower is None:
        tower = build_vision_tower(vision, source=f"text encoder '{text_encoder.name}'")
        _TOWERS[text_encoder.module] = tower
    return tower


def prepare_image(image, name: str) -> torch.Tensor:
    """A ComfyUI IMAGE -> one RGB image ``[H, W, 3]`` float in 0..1; odd inputs are handled
    here with a notice or refused with a message naming the input."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        raise ValueError(f"{name}: expected an IMAGE [batch, height, width, channels], got {getattr(image, 'shape', type(image).__name__)}")
    if image.ndim == 3:
        image = image[None]
    if image.shape[0] == 0:
        raise ValueError(f"{name}: the IMAGE batch is empty")
    if image.shape[0] > 1:
        runtime.warn(f"{name} holds a batch of {image.shape[0]} images; only the first is used "
                     "(connect further images to image2 / image3)")
    img = image[0]
    if not img.is_floating_point():  # integer samples (8- or 16-bit): full scale is white
        img = img.float() / float(torch.iinfo(img.dtype).max)
    else:
        img = img.float()
    c = img.shape[-1]
    if c in (1, 2):  # gray, gray + alpha
        img = img[..., :1].expand(*img.shape[:-1], 3)
    elif c == 4:  # alpha is dropped: the model sees colour only
        img = img[..., :3]
    elif c != 3:
        raise ValueError(f"{name}: expected 1, 3 or 4 channels in the last dimension, got shape {tuple(image.shape)}")
    h, w = img.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"{name} is {w}x{h} pixels; edit images must be at least {MIN_SIDE}x{MIN_SIDE}")
    if not bool(torch.isfinite(img).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(img.min()), float(img.max())
    if lo < 0.0 or hi > 1.0:
        runtime.warn(f"{name} has values from {lo:.3g} to {hi:.3g}; clamped to 0..1")
        img = img.clamp(0.0, 1.0)
    if h * w > LARGE_PIXELS:
        runtime.warn(f"{name} is {w}x{h} ({h * w / 1e6:.0f} MP); Qwen-Image-Edit works at about 1 MP, so it is "
                     "scaled down to that. Crop to the region you want to edit to keep more detail.")
    return img.contiguous()


def pick_kind(variant: str, n_images: int) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "edit":
        if n_images > 1:
            raise ValueError(f"variant 'edit' (the original Qwen-Image-Edit) takes one image, got {n_images}; "
                             "use 'edit-plus' (Edit-2509 / Edit-2511) for several")
        return "edit"
    if variant == "edit-plus":
        return "edit_plus"
    return "edit_plus" if n_images > 1 else "edit"


def encode_references(vae, images: list[torch.Tensor], plans: list[E.ImagePlan], device) -> list[torch.Tensor]:
    """Raw VAE latents ``[1, 16, h, w]`` of each image's VAE copy (the mean, as the reference uses)."""
    out = []
    with placement.on_device(vae.module, device), torch.inference_mode():
        for img, plan in zip(images, plans):
            px = E.resize_image(img, *plan.vae, "lanczos")
            x = px.permute(2, 0, 1)[None].mul(2.0).sub(1.0).to(device=device, dtype=vae_dtype(vae))
            out.append(vae.module.encode_auto(x).float().cpu())
            runtime.check_interrupt()
    return out


def edit_conditioning(text_encoder, vae, prompt: str, images: list, variant: str = "auto",
                      sizing: str = "preserve", device=None):
    """(CONDITIONING, LATENT): the node's work, also usable from scripts."""
    if sizing not in SIZING:
        raise ValueError(f"sizing must be one of {SIZING}, got {sizing!r}")
    named = [(f"image{i + 1}", im) for i, im in enumerate(images) if im is not None]
    if not named:
        raise ValueError("connect at least image1")
    tower = vision_tower_for(text_encoder)
    pics = [prepare_image(im, name) for name, im in named]
    kind = pick_kind(variant, len(pics))
    plans = [E.plan_image(p.shape[1], p.shape[0], kind, sizing) for p in pics]
    vis = [E.vision_input(p, plan, tower.config) for p, plan in zip(pics, plans)]

    device = torch.device(device) if device is not None else runtime.compute_device()
    module = text_encoder.module
    # Loaded together: loading one must not evict the other.
    with placement.on_devices(device, (module, "layers"), (tower, "blocks")), torch.inference_mode():
        embeds = E.encode_edit_prompt(module, tower, text_encoder.tokenizer, prompt, vis, kind, device=device)
    refs = encode_references(vae, pics, plans, device)

    cond = make_conditioning(embeds.float().cpu())
    cond[0][1]["reference_latents"] = refs
    w, h = E.output_size(plans)
    latent = {"samples": torch.zeros(1, lf.LATENT_CHANNELS, h // 8, w // 8)}
    return cond, latent


class QwenImageEditEncode:
    CATEGORY = "Qwen-Image/conditioning"
    RETURN_TYPES = ("CONDITIONING", "LATENT")
    RETURN_NAMES = ("conditioning", "latent")
    FUNCTION = "encode"
    DESCRIPTION = (
        "Prompt + input images for Qwen-Image-Edit / Edit-2509 / Edit-2511. The images are seen by the "
        "vision tower and passed to the model as reference latents. Use one node for the positive prompt and "
        "another with the same images and prompt ' ' for the negative. 'latent' is the empty latent the "
        "output should be made at (it follows the last image); decode, then 'Qwen-Image Match Size' returns "
        "the result at the input's exact size."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (TEXT_ENCODER_TYPE,),
                "vae": (VAE_TYPE,),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": ""}),
                "image1": ("IMAGE",),
            },
            "optional": {
                "image2": ("IMAGE",),
                "image3": ("IMAGE",),
                "variant": (list(VARIANTS), {"default": "auto", "tooltip": (
                    "edit: the original Qwen-Image-Edit template (one image). edit-plus: Edit-2509 / Edit-2511 "
                    "('Picture 1: ...' per image, smaller vision copies); pick it for those models even with one "
                    "image. auto: follows the connected model's variant when 'model' is connected, else edit-plus "
                    "when more than one image is connected, else edit.")}),
                "sizing": (list(SIZING), {"default": "preserve", "tooltip": (
                    "preserve: images scaled uniformly to about 1 MP, sides rounded to 16, so the output lines up "
                    "with the input. reference: diffusers' sizes (sides rounded to 32), for identical results.")}),
                "model": (MODEL_TYPE, {"tooltip": "Optional: the diffusion model, so variant 'auto' picks the template its variant was trained with."}),
            },
        }

    def encode(self, text_encoder, vae, prompt, image1, image2=None, image3=None, variant="auto", sizing="preserve",
               model=None):
        if variant == "auto" and model is not None:
            variant = MODEL_TEMPLATE.get(getattr(model, "variant", None), "auto")
        return edit_conditioning(text_encoder, vae, prompt, [image1, image2, image3], variant, sizing)


class QwenImageMatchSize:
    CATEGORY = "Qwen-Image/image"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "match"
    DESCRIPTION = (
        "Resizes images (whole frame, Lanczos) to the size of a reference image, e.g. an edit result back "
        "to the input photo's exact size. Nothing is cropped, so the result lines up with the reference."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "reference": ("IMAGE",)}}

    def match(self, images, reference):
        if not isinstance(reference, torch.Tensor) or reference.ndim not in (3, 4):
            raise ValueError(f"reference: expected an IMAGE, got {getattr(reference, 'shape', type(reference).__name__)}")
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"images: expected an IMAGE [batch, height, width, channels], got {getattr(images, 'shape', type(images).__name__)}")
        h, w = reference.shape[-3:-1]
        if tuple(images.shape[1:3]) == (h, w):
            return (images,)
        out = [E.resize_image(prepare_image(im[None], "images"), w, h, "lanczos") for im in images]
        return (torch.stack(out),)


# The mask LoadImage returns for a picture without alpha (ComfyUI's nodes.py: torch.zeros((64, 64))).
LOADIMAGE_EMPTY_MASK = (64, 64)


class QwenImageInpaintMask:
    CATEGORY = "Qwen-Image/latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "apply"
    DESCRIPTION = (
        "Limits the sampler's changes to a mask (white = regenerate), like SetLatentNoiseMask, but checks "
        "that the mask belongs to the encoded image: its shape must match the image's aspect ratio."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    def apply(self, samples, mask):
        z, _ = lf.to_4d(samples["samples"])
        if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
            raise ValueError(f"mask: expected a MASK [height, width] or [batch, height, width], got {getattr(mask, 'shape', type(mask).__name__)}")
        m = mask if mask.ndim == 3 else mask[None]
        mh, mw = m.shape[-2:]
        lh, lw = z.shape[-2:]
        # LoadImage hands out a 64x64 all-zero MASK when the picture has no alpha channel and nothing
        # was painted; saying "wrong image" then would blame the right connection.
        if (mh, mw) == LOADIMAGE_EMPTY_MASK and (lh * 8, lw * 8) != LOADIMAGE_EMPTY_MASK and not bool(m.any()):
            raise ValueError(
                f"mask is empty: the image has no alpha channel and no mask was painted, so LoadImage's MASK is a "
                f"64x64 placeholder and nothing of the {lw * 8}x{lh * 8} image would be regenerated. Paint the area to "
                "change: right-click the LoadImage node > Open in MaskEditor, paint, Save (or load a PNG whose "
                "transparent pixels mark the area)"
            )
        if abs(mw / mh - lw / lh) > 0.02 * (lw / lh) + 1.0 / min(lh, lw):
            raise ValueError(
                f"mask is {mw}x{mh} pixels but the latent is for a {lw * 8}x{lh * 8} image (different shape); "
                "use the mask of the image that was encoded (LoadImage's MASK output), or resize it to that image"
            )
        if m.shape[0] not in (1, z.shape[0]):
            raise ValueError(f"mask has a batch of {m.shape[0]}, the latent {z.shape[0]}")
        out = dict(samples)
        out["noise_mask"] = m[:, None].float().clamp(0, 1)
        return (out,)


NODE_CLASS_MAPPINGS = {
    "QwenImageEditEncode": QwenImageEditEncode,
    "QwenImageMatchSize": QwenImageMatchSize,
    "QwenImageInpaintMask": QwenImageInpaintMask,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QwenImageEditEncode": "Qwen-Image Edit Encode",
    "QwenImageMatchSize": "Qwen-Image Match Size",
    "QwenImageInpaintMask": "Qwen-Image Inpaint Mask",
}
