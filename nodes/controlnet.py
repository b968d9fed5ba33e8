"""ControlNet nodes: load an InstantX ControlNet, a DiffSynth patch or a Fun ControlNet, apply it to conditioning.

The applied control travels inside the CONDITIONING (key ``"control"``: a ``ControlChain``) so
the sampler runs it; several Apply nodes in series build a chain. The Apply node gives the
positive and the negative the *same* chain object, which tells the sampler to reuse the
positive pass's residuals for the negative pass (diffusers' behaviour) and to keep running
both as one batch. A Fun ControlNet's residuals depend on the prompt (VideoX-Fun and ComfyUI run
it on each pass's own text), so applying one gives the positive and the negative chains of
their own: each pass then runs every control of its chain with its own text.

Control images of any size are fitted to the latent without distortion: centre-cropped to
the latent's aspect ratio, then resized (antialiased bilinear) to the latent's pixel size.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.pipeline import latent_format as lf
from ..core.models.controlnet import DIFFSYNTH, INSTANTX, AppliedControl, DiffSynthControlNet
from ..core.models.controlnet_fun import FUN
from ..core.keymaps.controlnet import diffsynth_config, flavour
from ..core.loading.controlnet import load_controlnet
from . import placement, runtime
from .handles import VAE_TYPE
from .latents import vae_dtype

CONTROLNET_TYPE = "QWENIMAGE_CONTROLNET"
WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp32", "fp8_e4m3fn")
FOLDER_KINDS = ("controlnet", "model_patches")
MAX_STRENGTH = 10.0


@dataclass(frozen=True)
class ControlNet:
    """A loaded ControlNet (the QWENIMAGE_CONTROLNET socket)."""

    module: torch.nn.Module
    name: str
    owners: tuple = field(default=(), compare=False, repr=False)

    @property
    def kind(self) -> str:
        return self.module.kind

    @property
    def is_inpaint(self) -> bool:
        return self.module.is_inpaint

    def describe(self) -> str:
        what = {INSTANTX: "InstantX", DIFFSYNTH: "DiffSynth patch", FUN: "Fun ControlNet"}[self.kind]
        return f"{self.name} [{what}{', inpainting' if self.is_inpaint else ''}]"


class ControlChain(tuple):
    """The controls applied to one conditioning, in order. ComfyUI's own samplers read the
    ``"control"`` key too; they get a clear message instead of an attribute error."""

    def _refuse(self, *_args, **_kwargs):
        raise ValueError("this conditioning carries a Qwen-Image ControlNet; sample it with the Qwen-Image Sampler "
                         "(ComfyUI's KSampler cannot run it)")

    previous_controlnet = property(_refuse)
    get_models = _refuse
    get_control = _refuse
    pre_run = _refuse


def chain_from(value, what: str) -> ControlChain:
    """The conditioning's control chain (empty when there is none)."""
    if value is None:
        return ControlChain()
    if isinstance(value, ControlChain):
        return value
    raise ValueError(
        f"the {what} conditioning carries a ComfyUI ControlNet ({type(value).__name__}) from a core Apply ControlNet "
        "node; Qwen-Image ControlNets are applied with 'Qwen-Image Apply ControlNet'"
    )


# ------------------------------------------------------------------------------------ loader


class QwenImageControlNetLoader:
    CATEGORY = "Qwen-Image/loaders"
    RETURN_TYPES = (CONTROLNET_TYPE,)
    RETURN_NAMES = ("controlnet",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads a Qwen-Image ControlNet: InstantX Qwen-Image-ControlNet-Union or -Inpainting, "
        "Qwen-Image-2512-Fun-Controlnet-Union (models/controlnet) or a DiffSynth blockwise patch such as "
        "qwen_image_canny_diffsynth_controlnet (models/model_patches). The kind is recognised from the file's tensors."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "controlnet_name": (runtime.file_choices(*FOLDER_KINDS, gguf=False), {"tooltip": "File in models/controlnet or models/model_patches."}),
            },
            "optional": {
                "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": "'default' keeps the file's format (bf16, fp16 or fp8)."}),
            },
        }

    def load(self, controlnet_name, weight_dtype="default"):
        path = runtime.resolve_choice(controlnet_name, *FOLDER_KINDS, what="ControlNet")
        module = load_controlnet(path, weight_dtype=weight_dtype, device=runtime.offload_device(),
                                 compute_dtype=runtime.compute_dtype(runtime.compute_device()))
        owners = tuple(o for o in [placement.manage(module)] if o is not None)
        return (ControlNet(module=module, name=Path(controlnet_name).name, owners=owners),)


# Core MODEL_PATCH (a ModelPatcher) -> our ControlNet handle, built once per patch.
_FROM_PATCH: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def from_model_patch(model_patch) -> ControlNet:
    """Our DiffSynth ControlNet with the weights of a core 'Load Model Patch' output.

    ComfyUI's DiffSynth patch module keeps the file's tensor names, which are ours too."""
    cached = _FROM_PATCH.get(model_patch)
    if cached is not None:
        return cached
    inner = model_patch.model
    state = inner.state_dict()
    names = list(state)
    if flavour(names) != DIFFSYNTH:
        raise ValueError(
            f"this MODEL_PATCH holds {type(inner).__name__}, not a Qwen-Image DiffSynth ControlNet patch; "
            "load a Qwen-Image ControlNet (qwen_image_*_diffsynth_controlnet, InstantX) with 'Load Qwen-Image ControlNet'"
        )
    module = DiffSynthControlNet(**diffsynth_config({k: tuple(v.shape) for k, v in state.items()}))
    module.load_state_dict(state, strict=True, assign=True)
    module.eval().requires_grad_(False)
    owners = tuple(o for o in [placement.manage(module)] if o is not None)
    handle = ControlNet(module=module, name=f"{type(inner).__name__} (core model patch)", owners=owners)
    _FROM_PATCH[model_patch] = handle
    return handle


# ------------------------------------------------------------------------------------ images


def control_pixels(image, what: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,3] in 0..1 -> [B,3,H,W] in -1..1. Alpha and single-channel images
    are refused: a control map's meaning depends on its colours."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        raise ValueError(f"the control {what} must be an IMAGE [batch, height, width, 3]; got {getattr(image, 'shape', type(image))}")
    if image.ndim == 3:
        image = image[None]
    c = image.shape[-1]
    if c == 4:
        raise ValueError(f"the control {what} has an alpha channel (4 channels, shape {tuple(image.shape)}); "
                         "give an RGB image (a preprocessor's output, or drop the alpha, e.g. with a 'Split Image with Alpha' node)")
    if c != 3:
        raise ValueError(f"the control {what} has {c} channel(s) (shape {tuple(image.shape)}); a control map must be an RGB "
                         "IMAGE [batch, height, width, 3] (a MASK goes to the mask input; convert grayscale with 'Convert Mask to Image')")
    if image.shape[1] < 8 or image.shape[2] < 8:
        raise ValueError(f"the control {what} is {image.shape[2]}x{image.shape[1]} pixels; it needs at least 8x8")
    return image.float().permute(0, 3, 1, 2).mul(2.0).sub(1.0).clamp(-1, 1)


def mask_tensor(mask) -> torch.Tensor:
    """ComfyUI MASK ([H,W], [B,H,W] or [B,1,H,W], 1 = repaint) -> [B,1,H,W] float in 0..1."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3, 4) or (mask.ndim == 4 and mask.shape[1] != 1):
        raise ValueError(f"mask must be a MASK [batch, height, width]; got {getattr(mask, 'shape', type(mask))}")
    m = mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 3:
        m = m[:, None]
    return m.clamp(0, 1)


def fit(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre-crop ``[B,C,H,W]`` to the aspect ratio of ``height`` x ``width``, then resize to it
    (antialiased bilinear): the whole target is covered and nothing is stretched."""
    H, W = pixels.shape[-2:]
    if (H, W) == (height, width):
        return pixels
    if W * height > width * H:  # wider than the target: trim the sides
        cw = max(1, round(H * width / height))
        x0 = (W - cw) // 2
        pixels = pixels[..., :, x0 : x0 + cw]
    elif W * height < width * H:  # taller: trim top and bottom
        ch = max(1, round(W * height / width))
        y0 = (H - ch) // 2
        pixels = pixels[..., y0 : y0 + ch, :]
    return F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def _encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Raw latents (the distribution's mode) of ``[B,3,H,W]`` pixels in -1..1."""
    device = runtime.compute_device()
    out = []
    with placement.on_device(vae.module, device), torch.inference_mode():
        for i in range(pixels.shape[0]):
            xi = pixels[i : i + 1].to(device=device, dtype=vae_dtype(vae))
            out.append(vae.module.encode_auto(xi).float().cpu())
            runtime.check_interrupt()
    return torch.cat(out)


def make_hint_fn(controlnet: ControlNet, vae, pixels: torch.Tensor, mask: torch.Tensor | None):
    """``(h, w) -> normalized control latent`` for a latent of ``h`` x ``w``.

    InstantX inpainting (as diffusers' QwenImageControlNetInpaintPipeline): pixels under the mask
    (> 0.5) become -1 before encoding; the extra channel is 1 - mask, nearest-downsampled.
    DiffSynth inpainting (as ComfyUI): the image is encoded as is; the extra channel is 1 - mask,
    bilinear-downsampled. No mask: the extra channel is all ones (nothing to repaint).
    """
    if mask is not None and tuple(mask.shape[-2:]) != tuple(pixels.shape[-2:]):
        mask = F.interpolate(mask, size=tuple(pixels.shape[-2:]), mode="bilinear", align_corners=False)
    net = controlnet.module

    def hint(h: int, w: int) -> torch.Tensor:
        px = fit(pixels, h * lf.SPATIAL_FACTOR, w * lf.SPATIAL_FACTOR)
        m = None if mask is None else fit(mask, h * lf.SPATIAL_FACTOR, w * lf.SPATIAL_FACTOR).clamp(0, 1)
        if m is not None and net.kind == INSTANTX:
            m = m.repeat(px.shape[0] // m.shape[0], 1, 1, 1) if m.shape[0] < px.shape[0] else m
            px = px.repeat(m.shape[0] // px.shape[0], 1, 1, 1) if px.shape[0] < m.shape[0] else px
            px = px.masked_fill(m > 0.5, -1.0)
        z = lf.normalize(_encode(vae, px))
        if not net.is_inpaint:
            return z
        if m is None:
            keep = torch.ones(z.shape[0], 1, h, w)
        elif net.kind == INSTANTX:
            keep = 1.0 - F.interpolate(m, size=(h, w), mode="nearest")
        else:
            keep = F.interpolate(1.0 - m, size=(h, w), mode="bilinear", align_corners=False)
        if keep.shape[0] != z.shape[0]:
            n = max(keep.shape[0], z.shape[0])
            if n % keep.shape[0] or n % z.shape[0]:
                raise ValueError(f"the mask batch ({keep.shape[0]}) and the image batch ({z.shape[0]}) do not match")
            keep, z = keep.repeat(n // keep.shape[0], 1, 1, 1), z.repeat(n // z.shape[0], 1, 1, 1)
        return torch.cat([z, keep], dim=1)

    return hint


# ------------------------------------------------------------------------------------ apply


def _check_number(value, name: str, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number between {lo} and {hi}; got {value!r}") from None
    if not math.isfinite(v) or v < lo or v > hi:
        raise ValueError(f"{name} must be between {lo} and {hi}; got {value}")
    return v


def _with_control(conditioning, chain_of_old, control: AppliedControl, what: str):
    out = []
    for entry in conditioning:
        if not (isinstance(entry, (list, tuple)) and len(entry) >= 2):
            raise ValueError(f"{what} conditioning is not in ComfyUI's [[tensor, dict], ...] format")
        extra = dict(entry[1] or {})
        old = chain_from(extra.get("control"), what)
        extra["control"] = chain_of_old(old, control)
        out.append([entry[0], extra])
    return out


class QwenImageControlNetApply:
    CATEGORY = "Qwen-Image/conditioning"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply"
    DESCRIPTION = (
        "Applies a Qwen-Image ControlNet (InstantX Union / Inpainting, the 2512 Fun ControlNet or a DiffSynth patch) "
        "to the conditioning; the Qwen-Image Sampler runs it. Chain several Apply nodes to combine controls. The control "
        "image is centre-cropped to the latent's aspect ratio and resized to its size. The mask (inpainting models only) "
        "marks the area to repaint. Strength scales the residuals linearly (the Fun ControlNet's authors' "
        "control_context_scale; ComfyUI's own Apply ControlNet uses the square root of its strength for that model)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "controlnet": (f"{CONTROLNET_TYPE},MODEL_PATCH", {"tooltip": "From 'Load Qwen-Image ControlNet', or a DiffSynth patch from core 'Load Model Patch'."}),
                "vae": (VAE_TYPE,),
                "image": ("IMAGE", {"tooltip": "Control map (canny, depth, pose, ...) or, for inpainting, the image to repaint."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": MAX_STRENGTH, "step": 0.01}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            },
            "optional": {"mask": ("MASK", {"tooltip": "Inpainting ControlNets only: 1 = repaint."})},
        }

    def apply(self, positive, negative, controlnet, vae, image, strength, start_percent, end_percent, mask=None):
        if runtime.is_comfy_model(controlnet):
            controlnet = from_model_patch(controlnet)
        if not isinstance(controlnet, ControlNet):
            raise ValueError("controlnet must come from 'Load Qwen-Image ControlNet' (a ComfyUI CONTROL_NET does not fit here)")
        strength = _check_number(strength, "strength", 0.0, MAX_STRENGTH)
        start = _check_number(start_percent, "start_percent", 0.0, 1.0)
        end = _check_number(end_percent, "end_percent", 0.0, 1.0)
        if start > end:
            raise ValueError(f"start_percent ({start}) must not be after end_percent ({end})")
        pixels = control_pixels(image)
        m = None
        if mask is not None:
            if controlnet.kind == FUN:
                raise ValueError(f"a mask was connected, but {controlnet.describe()} is applied here as a control map only: "
                                 "its inpainting (a mask plus the image to repaint) is not wired into this node; "
                                 "disconnect the mask (its mask and inpaint channels then stay empty, as in ComfyUI)")
            if not controlnet.is_inpaint:
                raise ValueError(f"a mask was connected, but {controlnet.describe()} is not an inpainting ControlNet; "
                                 "disconnect the mask or load Qwen-Image-InstantX-ControlNet-Inpainting "
                                 "(or the DiffSynth inpaint patch)")
            m = mask_tensor(mask)
            if 1 not in (m.shape[0], pixels.shape[0]) and m.shape[0] != pixels.shape[0]:
                raise ValueError(f"the mask holds {m.shape[0]} masks but the image batch holds {pixels.shape[0]} images; "
                                 "give one mask, or one per image")
        elif controlnet.is_inpaint:
            runtime.warn(f"{controlnet.describe()} is an inpainting ControlNet but no mask is connected; nothing is repainted by it")
        control = AppliedControl(controlnet.module, make_hint_fn(controlnet, vae, pixels, m), strength, start, end)

        shared: dict = {}

        def extender(side: str):
            def extend(old: ControlChain, ctl) -> ControlChain:
                # One new chain per old chain (all empty ones alike), so a positive and negative that
                # shared one still do (a Fun control: one per side); the old chain is kept alive so
                # its id stays unique.
                key = (id(old) if old else None, side if controlnet.kind == FUN else None)
                if key not in shared:
                    shared[key] = (old, ControlChain(old + (ctl,)))
                return shared[key][1]

            return extend

        return (_with_control(positive, extender("positive"), control, "positive"),
                _with_control(negative, extender("negative"), control, "negative"))


# ------------------------------------------------------------------------------------ sampling


def conds_controls(conds) -> list[AppliedControl]:
    seen: dict[int, AppliedControl] = {}
    for c in conds:
        for ctl in c.control or ():
            seen.setdefault(id(ctl), ctl)
    return list(seen.values())


def prepared(conds, height: int, width: int) -> list:
    """Encode every control image for this latent size; returns the control models to place
    on the device next to the diffusion model (loaded together, so neither evicts the other)."""
    controls = conds_controls(conds)
    for ctl in controls:
        ctl.prepare(height, width)
    return list(dict.fromkeys(ctl.net for ctl in controls))


NODE_CLASS_MAPPINGS = {
    "QwenImageControlNetLoader": QwenImageControlNetLoader,
    "QwenImageControlNetApply": QwenImageControlNetApply,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QwenImageControlNetLoader": "Load Qwen-Image ControlNet",
    "QwenImageControlNetApply": "Qwen-Image Apply ControlNet",
}
