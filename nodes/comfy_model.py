"""Our MMDiT as a ComfyUI MODEL, so every core sampler path runs it.

``QwenImageComfyModel`` is a genuine subclass of ComfyUI's own Qwen-Image model class
(``comfy.model_base.QwenImage``): its model sampling, latent format, conditioning (reference
latents, attention masks), memory estimate and every member ComfyUI reads are ComfyUI's. Only
the diffusion model is ours: ``diffusion_model`` is our MMDiT (its parameter names are
diffusers' keys, which are also ComfyUI's, so core LoRA loaders find their weights), and
``_apply_model`` calls it with our exact math (odd-grid RoPE, fp8 matmul, GGUF kernels, our
LoRA patches). What ComfyUI threads through a diffusion model is honoured:

- ``DIFFUSION_MODEL`` wrappers (EasyCache, ...) wrap our forward as they wrap ComfyUI's;
- ``double_block`` patches (core ``QwenImageDiffsynthControlnet``) get the image and text streams
  after each block and core ControlNet residuals (``control["input"]``) are added, as ComfyUI does;
- block replacement (``patches_replace["dit"]``) is refused by name; other patch types
  (``post_input``, ``attn1_patch``: FluxKVCache) are skipped with one warning per type;
- the conditioning's reference method (ComfyUI's "Edit Model Reference Method") reaches the MMDiT;
- a union control LoRA on the handle wants a control image, as in our sampler;
- core Fun ControlNets (Qwen-Image-2512-Fun-Controlnet-Union) compute their residuals with our
  FunControlNet on our MMDiT (``comfy_fun``).

Qwen-Image-Layered runs the same way: ComfyUI's EmptyQwenImageLayeredLatentImage latent
``[B, 16, L+1, h, w]`` reaches our MMDiT whole (a Layered MMDiT denoises its frames together,
reference latents at frames -1, -2, ... as ComfyUI's "negative_index"); a plain MMDiT refuses it.

The handle's speed options travel the same way: ``as_comfy_model`` puts its ``RunOptions`` in
the MODEL's ``transformer_options`` (``OPTIONS_KEY``), ComfyUI hands them to ``_apply_model`` with
every call, and only this MODEL's calls use them.

The loader makes one per MMDiT; it is the model its ModelPatcher manages, so the MODEL output
is a clone of that patcher and our own sampler and core samplers share one copy of the weights.
"""
from __future__ import annotations

import functools

import torch

from ..core.layers import lora_patch as lora
from ..core.quant import comfy_quant_kernels, gguf_kernels
from ..core.quant.dfloat11 import compressed_weights
from . import comfy_fun, placement, runtime
from .handles import MODEL_TYPE
from .latents import check_latents_for_model, layered_latent_error
from .lora import check_control_reference
from .options import run_options, speed_settings

OPTIONS_KEY = "qwenimage_options"  # transformer_options entry: the handle's RunOptions
RUN_PATCHES = ("double_block",)  # the transformer_options["patches"] types our MMDiT runs
_WARNED_PATCHES: set[str] = set()  # patch types already named in a warning (once per process)


def _context_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """ComfyUI's attention mask (1/0, or additive 0 / -large) -> ours: True for real tokens."""
    if mask is None:
        return None
    keep = mask > -1 if mask.is_floating_point() else mask.bool()
    keep = keep.reshape(keep.shape[0], -1)
    return None if bool(keep.all()) else keep


def _single_frame(latent: torch.Tensor) -> torch.Tensor:
    return latent[:, :, 0] if latent.ndim == 5 and latent.shape[2] == 1 else latent


def unsupported_patches(transformer_options: dict) -> list[str]:
    """The ComfyUI patch types in ``transformer_options`` our MMDiT does not run, by name."""
    patches = transformer_options.get("patches") or {}
    return sorted(name for name, entries in patches.items() if entries and name not in RUN_PATCHES)


def _warn_skipped_patches(transformer_options: dict) -> None:
    # A warning, not an error: a graph with e.g. FluxKVCache (post_input + attn1_patch, a speed-up)
    # still gives its image without them. Once per type, not once per step.
    for name in unsupported_patches(transformer_options):
        if name not in _WARNED_PATCHES:
            _WARNED_PATCHES.add(name)
            runtime.warn(f"a node patched this MODEL with ComfyUI '{name}' patches, which our Qwen-Image MODEL does "
                         f"not run (it runs {', '.join(RUN_PATCHES)} patches); sampling goes on without them")


def _block_hook(control, transformer_options: dict, x: torch.Tensor):
    """Our MMDiT's per-block hook doing what ComfyUI's Qwen-Image model does after each block."""
    if transformer_options.get("patches_replace", {}).get("dit"):
        raise ValueError("a node patched this MODEL by replacing Qwen-Image transformer blocks "
                         "(patches_replace 'dit'); our Qwen-Image MODEL does not support block replacement")
    _warn_skipped_patches(transformer_options)
    patches = list(transformer_options.get("patches", {}).get("double_block", []))
    residuals = list(control.get("input") or []) if isinstance(control, dict) else []
    if not patches and not any(r is not None for r in residuals):
        return None

    def run(i: int, img: torch.Tensor, txt: torch.Tensor | None):
        transformer_options["block_index"] = i
        for patch in patches:  # ComfyUI's order: the block's patches, then the ControlNet residual
            out = patch({"img": img, "txt": txt, "x": x, "block_index": i,
                         "transformer_options": transformer_options})
            img, txt = out["img"], out.get("txt", txt)
        if i < len(residuals) and residuals[i] is not None:
            add = residuals[i]
            img[:, :add.shape[1]] += add.to(img.dtype)
        return img, txt

    if not patches:  # residuals alone need no text stream (the MMDiT then skips the last txt update)
        return lambda i, img: run(i, img, None)[0]
    run.takes_txt = True  # the MMDiT passes the text stream and takes back the patches' change
    return run


def _check_frames(x: torch.Tensor, module: torch.nn.Module) -> None:
    # ComfyUI's Empty Qwen Image Layered Latent on a plain model: say what to connect, as our sampler does.
    if x.ndim == 5 and x.shape[2] > 1 and not getattr(getattr(module, "config", None), "layered", False):
        raise layered_latent_error(x.shape, "this MODEL")


def union_control_check(handle, guider) -> None:
    """Our sampler's union control LoRA check on a core sampler's conditionings: the guider's
    ``conds`` (``positive`` / ``negative`` lists of ComfyUI's dicts, reference latents under
    ``reference_latents``). The negative counts only where it is computed (cfg not 1)."""
    conds = getattr(guider, "conds", None) or {}

    def with_reference(entries) -> list[bool]:
        return [bool(e.get("reference_latents")) for e in entries or [] if isinstance(e, dict)]

    negative = conds.get("negative")
    used = negative is not None and getattr(guider, "cfg", None) != 1.0
    check_control_reference(handle, any(with_reference(conds.get("positive"))),
                            all(with_reference(negative)) if used else None)


if runtime.QwenImageBaseModel is not None:

    class QwenImageComfyModel(runtime.QwenImageBaseModel):
        """ComfyUI's Qwen-Image model with our MMDiT as its diffusion model."""

        def __init__(self, mmdit: torch.nn.Module):
            super().__init__(runtime.qwen_model_config(mmdit.compute_dtype))
            self.diffusion_model = mmdit
            self.qwen_stream_blocks = "transformer_blocks"

        def qwen_module(self) -> torch.nn.Module:
            return self.diffusion_model

        def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
            sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
            # A DFloat11 block's weights are compressed, outside the state dict. Listed here (shape-
            # only placeholders), ComfyUI's core LoRA loaders map their keys, and the patcher then
            # refuses the LoRA by name ('Load Qwen-Image LoRA' applies it); unlisted, ComfyUI drops
            # every key with a log line and the LoRA silently does nothing.
            for key, placeholder in compressed_weights(self.diffusion_model, prefix + "diffusion_model.").items():
                sd.setdefault(key, placeholder)
            return sd

        def get_dtype(self) -> torch.dtype:
            return self.diffusion_model.compute_dtype

        def extra_conds(self, **kwargs):
            # Our LATENTs are [B, 16, h, w]; ComfyUI's Wan latent format expects a frame axis and
            # would broadcast a 4-D reference latent into a wrong 5-D one.
            refs = kwargs.get("reference_latents")
            if refs is not None:
                # Qwen-Image-Layered with the 3-channel VAE's encodings (or the other way round): by name.
                layered = bool(getattr(getattr(self.diffusion_model, "config", None), "layered", False))
                check_latents_for_model(refs, layered, "reference latent")
                kwargs["reference_latents"] = [r.unsqueeze(2) if r.ndim == 4 else r for r in refs]
            return super().extra_conds(**kwargs)

        def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
            if c_concat is not None:
                raise ValueError("Qwen-Image takes no concat conditioning (an inpainting model's mask/image input); "
                                 "use a LATENT noise_mask or an inpainting ControlNet")
            _check_frames(x, self.diffusion_model)
            sigma = t
            xc = self.model_sampling.calculate_input(sigma, x)
            timestep = self.model_sampling.timestep(t).float()
            refs = kwargs.get("ref_latents")
            # ComfyUI's order: the conditioning's method, else the diffusion model's default_ref_method
            # (an object patch of FluxKVCache lands there), else our config's default (None).
            method = kwargs.get("ref_latents_method", getattr(self.diffusion_model, "default_ref_method", None))

            def forward(x, timestep, context, attention_mask, ref_latents, transformer_options,
                        ref_latents_method=None, **_extra):
                return self.diffusion_model(
                    x, timestep, context.to(x.device),
                    context_mask=_context_mask(attention_mask),
                    ref_latents=[_single_frame(r).to(x.device) for r in ref_latents] if ref_latents else None,
                    control=_block_hook(control, transformer_options, x),
                    options=transformer_options.get(OPTIONS_KEY),
                    ref_method=ref_latents_method if ref_latents else None,
                )

            options = dict(transformer_options)
            out = runtime.diffusion_model_wrappers(options, forward).execute(
                xc, timestep, c_crossattn, kwargs.get("attention_mask"), refs, options, ref_latents_method=method)
            return self.model_sampling.calculate_denoised(sigma, out.float(), x)

else:
    QwenImageComfyModel = None


def comfy_model_for(mmdit: torch.nn.Module):
    """The ComfyUI model object a loaded MMDiT is managed as (None outside ComfyUI)."""
    return QwenImageComfyModel(mmdit) if QwenImageComfyModel is not None else None


def _outer_sample(handle, executor, *args, **kwargs):
    """Around a core sampler's run: this handle's LoRAs and Torch Compile choice, as our sampler
    does (its RunOptions reach the model through ``transformer_options``); core Fun ControlNets
    in the conditioning run on our MMDiT (``comfy_fun``)."""
    union_control_check(handle, executor.class_obj)  # before any weight moves: a missing control image
    lora.apply_loras(handle.module, [(weights, strength) for _, weights, strength in handle.loras])
    device = runtime.compute_device()
    if device.type == "cuda":
        gguf_kernels.enable()
        gguf_kernels.prepare(handle.module)  # this model's GGUF weight shapes get the compiled kernels
        comfy_quant_kernels.prepare(handle.module)  # and its ComfyUI-format ones
    with speed_settings(handle, device), comfy_fun.fun_controlnets_on_our_model(executor.class_obj):
        return executor(*args, **kwargs)


def as_comfy_model(handle):
    """A core MODEL (a clone of the handle's ModelPatcher) that runs this handle's model."""
    if not runtime.IN_COMFYUI:
        raise RuntimeError("'Qwen-Image as ComfyUI MODEL' gives a ComfyUI MODEL and needs ComfyUI to run")
    owner = handle.owners[0] if handle.owners else placement.manage(
        handle.module, "transformer_blocks", model=comfy_model_for(handle.module))
    model = owner.clone()
    # The clone's own options (ComfyUI copies them per clone): the owner's calls keep the defaults.
    model.model_options.setdefault("transformer_options", {})[OPTIONS_KEY] = run_options(handle)
    model.add_wrapper_with_key(runtime.OUTER_SAMPLE, "qwenimage", functools.partial(_outer_sample, handle))
    return model


class QwenImageAsComfyModel:
    CATEGORY = "Qwen-Image/model"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("MODEL",)
    FUNCTION = "convert"
    DESCRIPTION = (
        "Gives this Qwen-Image model to ComfyUI's own nodes as a MODEL: KSampler, SamplerCustomAdvanced with any "
        "sampler and scheduler, ModelSamplingAuraFlow, CFGNorm, EasyCache, DifferentialDiffusion, core LoRA "
        "loaders (bf16 / fp16 weights) and QwenImageDiffsynthControlnet. The model's math stays ours; LoRAs and "
        "speed options attached before this node apply."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (MODEL_TYPE,)}}

    def convert(self, model):
        return (as_comfy_model(model),)


NODE_CLASS_MAPPINGS = {"QwenImageAsComfyModel": QwenImageAsComfyModel}
NODE_DISPLAY_NAME_MAPPINGS = {"QwenImageAsComfyModel": "Qwen-Image as ComfyUI MODEL"}
