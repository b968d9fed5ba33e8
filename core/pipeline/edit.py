"""Edit conditioning: image sizes, image resizing, and the text+image prompt path.

Sizes. Every input image is resized (whole frame, never cropped) to two copies:
- the VAE copy, which becomes a reference latent, at about 1024x1024 pixels of area;
- the vision copy for Qwen2.5-VL: the VAE copy itself for Edit, about 384x384 for Edit-Plus,
  then rounded to multiples of 28 by the image processor's own rule (``smart_resize``).
The output latent has the size of the last image's VAE copy, so output and reference share one
grid. Two ways to pick the VAE size:
- "reference": diffusers' ``calculate_dimensions``: width = sqrt(area * ratio), height =
  width / ratio, each rounded to a multiple of 32;
- "preserve": multiples of 16 (the least the 2x2-packed latent allows), chosen near the uniformly
  scaled size sqrt(area / (W*H)) * (W, H) so that the aspect ratio stays as close as possible.
Either way the frame maps onto the input edge to edge, so resizing the decoded image back to
the input's size (``resize_image``) lines it up with the input pixel for pixel.

Resizing is PIL's, as in the reference pipelines (Lanczos for the VAE / Edit-Plus vision copies,
bicubic inside the image processor). 8-bit images go through PIL's 8-bit path, which makes them
bit-identical to the reference; others through PIL's 32-bit float path, keeping their precision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..encoders.tokenizer import IMAGE_PAD_ID, encode_prompt_ids
from ..encoders.vision import QwenVisionTower, VisionConfig, image_to_patches, normalize_pixels

VAE_AREA = 1024 * 1024
PLUS_VISION_AREA = 384 * 384
MIN_PIXELS = 56 * 56  # 3136
MAX_PIXELS = 28 * 28 * 16384  # 12845056
MAX_ASPECT = 200.0  # the image processor refuses anything longer
SIZING_MODES = ("preserve", "reference")
KINDS = ("edit", "edit_plus")


# ---------------------------------------------------------------------------------------
# Sizes


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels at ``ratio`` = width/height, multiples of 32
    (diffusers' rule for the edit pipelines)."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return int(round(width / 32) * 32), int(round(height / 32) * 32)


def preserve_dimensions(width: int, height: int, area: int = 0, multiple: int = 16) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels (default ``VAE_AREA``), multiples of ``multiple``,
    with the aspect ratio closest to the input's among the sizes within a few steps of the
    uniformly scaled size (ties: the area closest to ``area``)."""
    area = area or VAE_AREA
    ratio = width / height
    s = math.sqrt(area / (width * height))
    best = None
    for axis in (0, 1):
        centre = (width if axis == 0 else height) * s / multiple
        for k in range(int(round(centre)) - 3, int(round(centre)) + 4):
            a = max(1, k) * multiple
            b = max(multiple, int(round((a / ratio if axis == 0 else a * ratio) / multiple)) * multiple)
            w, h = (a, b) if axis == 0 else (b, a)
            if not 0.8 * area <= w * h <= 1.25 * area and best is not None:
                continue
            key = (round(abs(math.log((w / h) / ratio)), 12), abs(w * h - area))
            if best is None or key < best[0]:
                best = (key, (w, h))
    return best[1]


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) the Qwen2-VL image processor resizes to: multiples of ``factor``, area
    within [min_pixels, max_pixels], aspect ratio kept as well as those allow."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"an image of {width}x{height} is too elongated for the vision tower (at most {MAX_ASPECT:g}:1)")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclass(frozen=True)
class ImagePlan:
    """Where one input image goes: its VAE copy and its vision copy (before the processor's
    28-rounding), as (width, height)."""
    source: tuple[int, int]
    vae: tuple[int, int]
    vision: tuple[int, int]


def plan_image(width: int, height: int, kind: str, mode: str = "preserve") -> ImagePlan:
    if kind not in KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {KINDS}")
    if mode not in SIZING_MODES:
        raise ValueError(f"unknown sizing mode {mode!r}; expected one of {SIZING_MODES}")
    ratio = width / height
    if max(ratio, 1 / ratio) > MAX_ASPECT:
        raise ValueError(f"an image of {width}x{height} is too elongated (at most {MAX_ASPECT:g}:1)")
    vae = calculate_dimensions(VAE_AREA, ratio) if mode == "reference" else preserve_dimensions(width, height)
    if min(vae) < 32:  # calculate_dimensions can round a side to 0 on extreme ratios
        vae = (max(vae[0], 32), max(vae[1], 32))
    vision = vae if kind == "edit" else calculate_dimensions(PLUS_VISION_AREA, ratio)
    vision = (max(vision[0], 28), max(vision[1], 28))
    return ImagePlan((width, height), vae, vision)


def output_size(plans: list[ImagePlan]) -> tuple[int, int]:
    """The generated image follows the last input image."""
    return plans[-1].vae


# ---------------------------------------------------------------------------------------
# Resizing (PIL, as the reference pipelines)

_RESAMPLE = {"lanczos": 1, "bicubic": 3, "bilinear": 2}  # PIL.Image.Resampling values


def is_8bit(image: torch.Tensor) -> bool:
    """True when every value is k/255, i.e. the image came from an 8-bit file."""
    scaled = image.float() * 255.0
    return bool(((scaled - scaled.round()).abs() < 1e-3).all())


def resize_image(image: torch.Tensor, width: int, height: int, method: str = "lanczos") -> torch.Tensor:
    """``[H, W, 3]`` in 0..1 -> ``[height, width, 3]``, whole frame to whole frame."""
    from PIL import Image

    if tuple(image.shape[:2]) == (height, width):
        return image.float()
    resample = _RESAMPLE[method]
    if is_8bit(image):
        arr = (image.float() * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        out = np.asarray(Image.fromarray(arr).resize((width, height), resample=resample))
        return torch.from_numpy(out.astype(np.float32) / 255.0)
    chans = []
    for c in range(image.shape[-1]):
        plane = Image.fromarray(image[..., c].float().cpu().numpy())
        chans.append(np.asarray(plane.resize((width, height), resample=resample)))
    return torch.from_numpy(np.stack(chans, axis=-1)).clamp(0, 1)


def vision_input(image: torch.Tensor, plan: ImagePlan, cfg: VisionConfig) -> tuple[torch.Tensor, int, int]:
    """The vision tower's input for one image ``[H, W, 3]``: the vision copy, resized by the
    processor's rule (bicubic to multiples of 28), CLIP-normalized and cut into patches."""
    w, h = plan.vision
    copy = resize_image(image, w, h, "lanczos")
    sh, sw = smart_resize(h, w, factor=cfg.factor)
    copy = resize_image(copy, sw, sh, "bicubic")
    return image_to_patches(normalize_pixels(copy.permute(2, 0, 1)), cfg)


# ---------------------------------------------------------------------------------------
# Prompt with images


def expand_image_tokens(ids: list[int], counts: list[int]) -> list[int]:
    """Each ``<|image_pad|>`` becomes ``counts[i]`` of them (one per merged vision token)."""
    slots = [i for i, t in enumerate(ids) if t == IMAGE_PAD_ID]
    if len(slots) != len(counts):
        raise ValueError(f"the prompt template has {len(slots)} image slots but {len(counts)} images were given")
    out: list[int] = []
    start = 0
    for slot, n in zip(slots, counts):
        out += ids[start:slot] + [IMAGE_PAD_ID] * n
        start = slot + 1
    return out + ids[start:]


def mrope_positions(ids: list[int], grids: list[tuple[int, int]]) -> torch.Tensor:
    """M-RoPE positions ``[3, 1, L]`` (temporal, height, width) for text with image runs.

    Text counts up on all three axes. An image run of gh x gw merged tokens (row-major) starts
    at the current position p: temporal p, height p + row, width p + column; the following text
    resumes at p + max(gh, gw). This is transformers' ``get_rope_index`` for still images.
    """
    pos = torch.empty(3, len(ids), dtype=torch.long)
    p = 0
    i = 0
    grid_iter = iter(grids)
    while i < len(ids):
        if ids[i] != IMAGE_PAD_ID:
            pos[:, i] = p
            p += 1
            i += 1
            continue
        try:
            gh, gw = next(grid_iter)
        except StopIteration:
            raise ValueError("more image-token runs in the prompt than images") from None
        n = gh * gw
        rows = torch.arange(gh).repeat_interleave(gw)
        cols = torch.arange(gw).repeat(gh)
        pos[0, i:i + n] = p
        pos[1, i:i + n] = p + rows
        pos[2, i:i + n] = p + cols
        p += max(gh, gw)
        i += n
    return pos[:, None, :]


@torch.no_grad()
def encode_edit_prompt(text_model, vision_tower: QwenVisionTower, tokenizer, prompt: str,
                       vision_inputs: list[tuple[torch.Tensor, int, int]], kind: str,
                       device=None, max_tokens: int = 1024) -> torch.Tensor:
    """Prompt embedding ``[1, L, hidden]`` for Edit (``kind`` "edit", one image) or Edit-Plus
    ("edit_plus", one "Picture N:" slot per image), as the reference pipelines make it: the
    vision features replace the image tokens, image tokens get 3-D positions, and the
    template's system turn is cut from the last hidden state."""
    if kind == "edit" and len(vision_inputs) != 1:
        raise ValueError(f"the Edit template takes exactly one image, got {len(vision_inputs)}; use edit_plus for several")
    if not vision_inputs:
        raise ValueError("edit conditioning needs at least one image")
    ids, drop = encode_prompt_ids(tokenizer, prompt, kind=kind, max_tokens=max_tokens, n_images=len(vision_inputs))
    merge2 = vision_tower.config.spatial_merge_size ** 2
    m = vision_tower.config.spatial_merge_size
    feats = [vision_tower(p, gh, gw) for p, gh, gw in vision_inputs]
    ids = expand_image_tokens(ids, [gh * gw // merge2 for _, gh, gw in vision_inputs])
    positions = mrope_positions(ids, [(gh // m, gw // m) for _, gh, gw in vision_inputs])

    device = device or text_model.device
    id_t = torch.tensor([ids], dtype=torch.long, device=device)
    dtype = text_model.compute_dtype
    text_model.embed_tokens.compute_dtype = dtype
    embeds = text_model.embed_tokens(id_t)
    image_rows = (id_t[0] == IMAGE_PAD_ID).nonzero().squeeze(1)
    embeds[0, image_rows] = torch.cat(feats).to(device=device, dtype=embeds.dtype)
    hidden = text_model(inputs_embeds=embeds, position_ids=positions.to(device))
    return hidden[:, drop:]
