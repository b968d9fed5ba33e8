"""The sampler node: rectified-flow Euler with Qwen-Image's schedule and true CFG."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.pipeline import latent_format as lf
from ..core.pipeline import sampling as fm
from ..core.pipeline import schedule
from ..core.models.controlnet import step_hook
from ..core.models.mmdit import REF_METHODS
from ..core.layers import fold
from ..core.quant import comfy_quant_kernels, gguf_kernels
from . import controlnet as control_nodes
from . import lora as lora_nodes
from . import placement, runtime
from .latents import check_latents_for_model, layered_latent_error
from .handles import MODEL_TYPE, conditioning_entries
from .options import speed_settings

SAMPLERS = ("euler",)


@dataclass(eq=False)
class Cond:
    """One CONDITIONING entry, ready for the model."""

    context: torch.Tensor  # [1 or B, L, D]
    mask: torch.Tensor | None  # [1 or B, L] bool, None = all real tokens
    refs: list  # normalized reference latents [1 or B,16,h,w]
    control: object = None  # a nodes.controlnet.ControlChain, None when uncontrolled
    # How the references are placed (ComfyUI's "Edit Model Reference Method"); None: the model's default.
    ref_method: str | None = None


def _as_conds(conditioning, what: str) -> list[Cond]:
    out = []
    for ctx, extra in conditioning_entries(conditioning, what):
        if ctx.ndim != 3:
            raise ValueError(f"{what} conditioning tensor must be [batch, tokens, features]; got {tuple(ctx.shape)}")
        mask = extra.get("attention_mask")
        if mask is not None:
            mask = mask.reshape(mask.shape[0], -1).bool()
            if bool(mask.all()):
                mask = None
        refs = [lf.normalize(lf.to_4d(r)[0].float()) for r in (extra.get("reference_latents") or [])]
        control = control_nodes.chain_from(extra.get("control"), what) or None
        out.append(Cond(context=ctx, mask=mask, refs=refs, control=control,
                        ref_method=_ref_method(extra, bool(refs), what)))
    return out


def _ref_method(extra: dict, has_refs: bool, what: str) -> str | None:
    """The conditioning's reference method (ComfyUI's "Edit Model Reference Method"), checked here
    so a wrong one is named before the model loads; without references it means nothing."""
    method = extra.get("reference_latents_method")
    if method is not None and has_refs and method not in REF_METHODS:
        raise ValueError(f"{what} conditioning has reference_latents_method {method!r}; Qwen-Image models take "
                         f"{', '.join(REF_METHODS)}")
    return method if has_refs else None


def _check_context(cond: Cond, module: torch.nn.Module, what: str) -> None:
    want = getattr(getattr(module, "config", None), "joint_attention_dim", None)
    if want is not None and cond.context.shape[-1] != want:
        raise ValueError(
            f"{what} conditioning has {cond.context.shape[-1]} features per token but this Qwen-Image model "
            f"expects {want}: it was made by a different text encoder (use Qwen2.5-VL-7B)"
        )


def _expand(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"conditioning batch {t.shape[0]} does not match the latent batch {batch}")


def _pad_tokens(ctx: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, n = ctx.shape[:2]
    m = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=ctx.device)
    if n < length:
        ctx = F.pad(ctx, (0, 0, 0, length - n))
        m = F.pad(m, (0, length - n), value=False)
    return ctx, m


class _Guided:
    """velocity(x, sigma) for one model, positive / negative conditioning and a CFG scale.

    ``sigmas`` (the run's schedule) lets ControlNets know the step for their start/end window.
    ``options``: the handle's RunOptions, passed into every call of ``module`` (None: its defaults).
    """

    def __init__(self, module, device, pos: list[Cond], neg: list[Cond] | None, cfg: float, batch_cfg: bool = True,
                 sigmas=None, options=None):
        self.module, self.device = module, device
        self.options = options
        self.pos, self.neg, self.cfg = pos, neg, cfg
        self.batch_cfg = batch_cfg
        self.sigmas = [] if sigmas is None else [float(s) for s in sigmas[:-1]]
        self._step = 0
        self._hooks: dict[int, object] = {}  # id(control chain) -> this step's hook

    def _control(self, x, sigma, c: Cond):
        """This step's hook for ``c``'s controls; a chain shared by positive and negative is run
        once (on the first conditioning asking), so both passes get the same residuals."""
        if c.control is None:
            return None
        key = id(c.control)
        if key not in self._hooks:
            b = x.shape[0]
            mask = None if c.mask is None else _expand(c.mask, b).to(self.device)
            self._hooks[key] = step_hook(
                c.control, self.module, x, sigma, _expand(c.context, b).to(self.device), mask,
                self._step, max(1, len(self.sigmas)),
            )
        return self._hooks[key]

    def _forward(self, x, sigma, ctx, mask, refs, control, ref_method=None):
        kwargs = {}
        if mask is not None:
            kwargs["context_mask"] = mask.to(self.device)
        if refs:
            kwargs["ref_latents"] = [r.to(self.device) for r in refs]
            if ref_method is not None:  # as ComfyUI: the method only matters with references
                kwargs["ref_method"] = ref_method
        if control is not None:
            kwargs["control"] = control
        if self.options is not None:
            kwargs["options"] = self.options
        return self.module(x, sigma, ctx.to(self.device), **kwargs).float()

    def _one(self, x, sigma, c: Cond):
        b = x.shape[0]
        mask = None if c.mask is None else _expand(c.mask, b)
        return self._forward(x, sigma, _expand(c.context, b), mask, [_expand(r, b) for r in c.refs],
                             self._control(x, sigma, c), c.ref_method)

    def _mean(self, x, sigma, conds: list[Cond]):
        out = self._one(x, sigma, conds[0])
        for c in conds[1:]:
            out = out + self._one(x, sigma, c)
        return out / len(conds)

    def _can_batch(self) -> bool:
        if not self.batch_cfg or len(self.pos) != 1 or len(self.neg) != 1:
            return False
        p, n = self.pos[0], self.neg[0]
        # One call places every reference one way (ComfyUI, too, batches only equal methods).
        if p.control is not n.control or p.ref_method != n.ref_method or len(p.refs) != len(n.refs):
            return False
        return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(p.refs, n.refs))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        runtime.check_interrupt()
        x = x.to(self.device)
        sigma = sigma.to(self.device)
        self._hooks = {}
        if self.sigmas:
            s = float(sigma.reshape(-1)[0])
            self._step = min(range(len(self.sigmas)), key=lambda i: abs(self.sigmas[i] - s))
        if self.neg is None:
            return self._mean(x, sigma, self.pos)
        if self._can_batch():
            cond, uncond = self._batched(x, sigma)
        else:
            cond, uncond = self._mean(x, sigma, self.pos), self._mean(x, sigma, self.neg)
        return fm.true_cfg(cond, uncond, self.cfg)

    def _batched(self, x, sigma):
        """Positive and negative in one forward pass (the GPU is better used by one batch of 2B)."""
        b = x.shape[0]
        p, n = self.pos[0], self.neg[0]
        pc, nc = _expand(p.context, b), _expand(n.context, b)
        pm = None if p.mask is None else _expand(p.mask, b)
        nm = None if n.mask is None else _expand(n.mask, b)
        if pc.shape[1] == nc.shape[1] and pm is None and nm is None:
            ctx, mask = torch.cat([pc, nc]), None
        else:
            length = max(pc.shape[1], nc.shape[1])
            pc, pm = _pad_tokens(pc, pm, length)
            nc, nm = _pad_tokens(nc, nm, length)
            ctx, mask = torch.cat([pc, nc]), torch.cat([pm, nm])
        refs = [torch.cat([_expand(r, b)] * 2) for r in p.refs]
        control = self._control(x, sigma, p)  # residuals for b rows, repeated over the 2b
        out = self._forward(torch.cat([x, x]), torch.cat([sigma, sigma]), ctx, mask, refs, control, p.ref_method)
        return out[:b], out[b:]


def sample(
    model,
    positive,
    latent_image: dict,
    seed: int,
    steps: int,
    cfg: float,
    shift_mode: str = "dynamic",
    shift: float = 3.0,
    sampler_name: str = "euler",
    denoise: float = 1.0,
    negative=None,
    device: torch.device | None = None,
) -> dict:
    """Run the sampler; the node and scripts share this function."""
    if runtime.is_comfy_model(model):
        raise ValueError(
            f"this sampler takes a Qwen-Image model from 'Load Qwen-Image Diffusion Model', but got a ComfyUI MODEL "
            f"({type(model.model).__name__}); sample a ComfyUI MODEL with KSampler, or load the Qwen-Image file with "
            "our loader"
        )
    if sampler_name not in SAMPLERS:
        raise ValueError(f"sampler_name must be one of {SAMPLERS}; got {sampler_name!r}")
    if not isinstance(latent_image, dict) or "samples" not in latent_image:
        raise ValueError("latent_image must be a LATENT ({'samples': tensor})")
    module = model.module
    layered = bool(getattr(getattr(module, "config", None), "layered", False))
    samples = latent_image["samples"]
    frames = None  # Qwen-Image-Layered: the frames (composite + layers) denoised together
    if lf.has_frames(samples):
        if not layered:
            raise layered_latent_error(samples.shape, model.name)
        raw, five_d, frames = samples, True, samples.shape[2]
        b, _, _, h, w = raw.shape
    else:
        raw, five_d = lf.to_4d(samples)
        b, _, h, w = raw.shape
    lf.check_channels(raw)
    check_latents_for_model([samples], layered, "latent_image")
    for conditioning in (positive, negative):
        for entry in conditioning or []:
            extra = entry[1] if isinstance(entry, (list, tuple)) and len(entry) >= 2 else None
            if isinstance(extra, dict):
                check_latents_for_model(extra.get("reference_latents") or [], layered, "reference latent")

    pos = _as_conds(positive, "positive")
    neg = None
    if negative is not None and cfg > 1.0:
        neg = _as_conds(negative, "negative")
    elif cfg > 1.0:
        runtime.warn(f"cfg is {cfg} but no negative conditioning is connected; running without guidance (cfg 1)")
    for what, conds in (("positive", pos), ("negative", neg or [])):
        for c in conds:
            _check_context(c, module, what)
    lora_nodes.check_control_reference(model, any(c.refs for c in pos),
                                       None if neg is None else all(c.refs for c in neg))

    if frames is not None and any(c.control is not None for c in pos + (neg or [])):
        raise ValueError("ControlNets do not take Qwen-Image-Layered latents (several frames); "
                         "disconnect the ControlNet from the conditioning")
    seq_len = schedule.image_seq_len(h, w)
    # Layered: QwenImageLayeredPipeline's exponent sqrt(tokens / 256) for the dynamic shift.
    mu = schedule.layered_mu(seq_len) if layered else None
    sigmas = schedule.flow_sigmas(steps, shift_mode, shift, seq_len, mu=mu)
    sigmas = sigmas[schedule.denoise_start(steps, denoise):]
    out = dict(latent_image)
    if len(sigmas) < 2:
        return out

    clean = lf.normalize(raw.float())
    noise = batch_noise(seed, b, h, w, frames, latent_image.get("batch_index"))
    mask = None
    if latent_image.get("noise_mask") is not None:
        mask = fm.latent_mask(latent_image["noise_mask"], b, h, w)
        if frames is not None:
            mask = mask[:, :, None]  # the same area in every frame

    device = torch.device(device) if device is not None else runtime.compute_device()
    progress = runtime.Progress(len(sigmas) - 1)
    previews = runtime.previews_enabled()

    def on_step(i, total, x, x0):
        image = None
        if previews:
            from PIL import Image

            image = Image.fromarray(lf.preview_rgb(x0 if x0.ndim == 4 else x0[:, :, 0]).numpy())
        progress.update(i + 1, image)

    _sync_loras(model)
    if device.type == "cuda":
        gguf_kernels.prepare(module)  # this model's GGUF weight shapes get the compiled kernels
        comfy_quant_kernels.prepare(module)  # and its ComfyUI-format ones
    nets = control_nodes.prepared(pos + (neg or []), h, w)
    with placement.on_devices(device, (module, "transformer_blocks"), *[(net, None) for net in nets]) as placed, \
            torch.inference_mode(), speed_settings(model, device) as run_options:
        if placed[0] == "resident" and model.loras:
            fold.fold(module)  # dense GPU weights take the LoRA once instead of every step
        velocity = _Guided(module, device, pos, neg, cfg, sigmas=sigmas, options=run_options)
        x = fm.euler_sample(
            velocity,
            clean.to(device),
            noise.to(device),
            sigmas.to(device),
            mask=None if mask is None else mask.to(device),
            callback=on_step,
        )
    x = lf.denormalize(x).cpu()
    out["samples"] = lf.tag_layered(x if frames is not None else lf.from_4d(x, five_d), layered)
    return out


def batch_noise(seed: int, b: int, h: int, w: int, frames: int | None = None, batch_index=None) -> torch.Tensor:
    """The initial noise of ``b`` items; with a LATENT's ``batch_index`` (Latent From Batch, Repeat
    Latent Batch) item i gets the noise of index ``batch_index[i]``, as ComfyUI's KSampler gives it,
    so one item of a batch can be re-run alone. An item's noise is the i-th draw of one generator
    and does not depend on the batch size: drawing ``max + 1`` items and picking is exact."""
    if batch_index is None:
        return fm.initial_noise(seed, b, h, w, frames=frames)
    index = [int(i) for i in batch_index]
    if len(index) != b or min(index) < 0:
        raise ValueError(f"the latent's batch_index {index} does not fit its batch of {b}: it needs one index >= 0 "
                         "per item (the node that changed the batch left a stale batch_index)")
    return fm.initial_noise(seed, max(index) + 1, h, w, frames=frames)[index]


def _sync_loras(model) -> None:
    """Attach exactly this handle's LoRAs to the shared module (other handles may have left theirs)."""
    if not model.loras and not _has_patches(model.module):
        return
    from ..core.layers import lora_patch as lora

    lora.apply_loras(model.module, [(weights, strength) for _, weights, strength in model.loras])


def _has_patches(module: torch.nn.Module) -> bool:
    return any(getattr(m, "patches", None) for m in module.modules())


class QwenImageSampler:
    CATEGORY = "Qwen-Image/sampling"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"
    DESCRIPTION = (
        "Samples a Qwen-Image latent. Official settings: 50 steps, cfg 4, shift_mode dynamic. "
        "Lightning LoRAs: 4 or 8 steps, cfg 1, shift_mode constant, shift 3. For a seed the noise equals "
        "diffusers' QwenImagePipeline, so results reproduce the reference. denoise < 1 keeps the input "
        "latent's content (img2img); a LATENT noise_mask limits changes to the mask. Qwen-Image-Layered: give it a "
        "layered latent (Qwen-Image Empty Layered Latent or ComfyUI's Empty Qwen Image Layered Latent) and the input "
        "image as a reference latent (its VAE Encode through ReferenceLatent) on positive and negative; dynamic "
        "follows diffusers' Layered pipeline, ComfyUI's template uses constant shift 1, 20 steps, cfg 2.5."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE,),
                "positive": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
                "cfg": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 30.0, "step": 0.1, "round": 0.01, "tooltip": "True CFG scale; 1 = one pass, no negative needed."}),
                "shift_mode": (list(schedule.SHIFT_MODES), {"default": "dynamic", "tooltip": "dynamic: diffusers' resolution-dependent shift (its Layered pipeline's for Qwen-Image-Layered). constant: the shift value below (Lightning: 3)."}),
                "shift": ("FLOAT", {"default": 3.0, "min": 0.01, "max": 100.0, "step": 0.01, "tooltip": "Used by shift_mode constant."}),
                "sampler_name": (list(SAMPLERS), {"default": "euler"}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            },
            "optional": {"negative": ("CONDITIONING",)},
        }

    def run(self, model, positive, latent_image, seed, steps, cfg, shift_mode, shift, sampler_name, denoise, negative=None):
        return (
            sample(model, positive, latent_image, seed, steps, cfg, shift_mode, shift, sampler_name, denoise, negative),
        )


NODE_CLASS_MAPPINGS = {"QwenImageSampler": QwenImageSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"QwenImageSampler": "Qwen-Image Sampler"}
