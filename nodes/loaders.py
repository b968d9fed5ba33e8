"""Loader nodes: the MMDiT, the text encoder and the VAE, from every file layout users have."""
from __future__ import annotations

import gc
from pathlib import Path

import torch

from ..core.loading import load as weight_load
from ..core.quant.dfloat11 import DF11Group
from . import comfy_model, placement, runtime
from .handles import MODEL_TYPE, TEXT_ENCODER_TYPE, VAE_TYPE, VARIANTS, VAE, DiffusionModel, TextEncoder, variant_from_name

WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp32", "fp8_e4m3fn")

_NONE = "none"


def _free_before_load() -> None:
    gc.collect()
    runtime.soft_empty_cache()


class QwenImageDiTLoader:
    """Loads the Qwen-Image MMDiT (any variant) from safetensors, a diffusers folder or GGUF."""

    CATEGORY = "Qwen-Image/loaders"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads a Qwen-Image diffusion model (Qwen-Image, 2512, Edit, Edit-2509, Edit-2511) from "
        "models/diffusion_models: bf16/fp16/fp8 safetensors, a diffusers transformer folder, a DFloat11 folder, or GGUF."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (runtime.file_choices("diffusion_models"), {"tooltip": "File in models/diffusion_models (or unet)."}),
                "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": "How weights are kept in memory. 'default' keeps the file's format (the only choice for DFloat11, which stays compressed); fp8_e4m3fn halves a bf16 file's memory (per-tensor scaled)."}),
            },
            "optional": {
                "variant": (list(VARIANTS), {"default": "auto", "tooltip": "auto reads the file name (edit, 2509, 2511). Edit-2511 needs its zero-timestep reference conditioning."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def load(self, model_name, weight_dtype="default", variant="auto", unique_id=None):
        path = runtime.resolve_choice(model_name, "diffusion_models")
        auto = variant == "auto"
        if auto:
            variant = variant_from_name(Path(model_name).name)
        _free_before_load()
        module = weight_load.load_mmdit(
            path,
            weight_dtype=weight_dtype,
            device=runtime.offload_device(),
            compute_dtype=runtime.compute_dtype(runtime.compute_device()),
        )
        if auto and getattr(getattr(module, "config", None), "zero_cond_t", False):
            variant = "edit-2511"  # the file says so (ComfyUI's __index_timestep_zero__ marker), whatever its name
        set_variant(module, variant)
        fmt = "gguf" if path.suffix.lower() == ".gguf" else _weight_format(module)
        _show_loaded(unique_id, "diffusion_model", model_name, variant=variant, format=fmt)
        owner = placement.manage(module, "transformer_blocks", model=comfy_model.comfy_model_for(module))
        return (DiffusionModel(module=module, name=Path(model_name).name, variant=variant, weight_format=fmt,
                               owners=_present(owner)),)


def _show_loaded(unique_id, kind: str, name: str, **info) -> None:
    """The loader badge in the browser (js/qwenimage.js): what was loaded, in which format."""
    if unique_id is not None:
        runtime.notify_ui("qwenimage.model_info", {"node": str(unique_id), "kind": kind, "name": Path(name).name, **info})


def set_variant(module: torch.nn.Module, variant: str) -> None:
    """Edit-2511 conditions reference tokens on t=0 (zero_cond_t); the others do not."""
    zero = variant == "edit-2511"
    cfg = getattr(module, "config", None)
    if cfg is not None and hasattr(cfg, "zero_cond_t"):
        cfg.zero_cond_t = zero
    if hasattr(module, "zero_cond_t"):
        module.zero_cond_t = zero


def _present(*owners) -> tuple:
    """The ComfyUI patchers a handle keeps (none outside ComfyUI)."""
    return tuple(o for o in owners if o is not None)


def _weight_format(module: torch.nn.Module) -> str:
    """The storage of most weight values: a dtype, or a ComfyUI format name (nvfp4, ...)."""
    counts: dict[str, int] = {}
    for m in module.modules():
        if isinstance(m, DF11Group):  # a block's compressed weights
            counts["dfloat11"] = counts.get("dfloat11", 0) + m.n
            continue
        p = m._parameters.get("weight")
        if p is None or p.ndim != 2:
            continue
        quant = getattr(m, "comfy_quant", None)
        key = quant.format if quant is not None else str(p.dtype).replace("torch.", "")
        counts[key] = counts.get(key, 0) + p.numel()
    return max(counts, key=counts.get) if counts else "unknown"


class QwenImageTextEncoderLoader:
    """Loads Qwen2.5-VL-7B (language model, and the vision tower when present) and its tokenizer."""

    CATEGORY = "Qwen-Image/loaders"
    RETURN_TYPES = (TEXT_ENCODER_TYPE,)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads the Qwen2.5-VL-7B text encoder from models/text_encoders (qwen_2.5_vl_7b*.safetensors, "
        "a diffusers text_encoder folder, or a GGUF with its mmproj file for the vision tower)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        files = runtime.file_choices("text_encoders")  # one walk of the folders for both combos
        return {
            "required": {
                "text_encoder_name": (files, {"tooltip": "File in models/text_encoders (or clip)."}),
            },
            "optional": {
                "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default"}),
                "mmproj_name": ([_NONE] + [f for f in files if f.lower().endswith(".gguf")], {"default": _NONE, "tooltip": "GGUF text encoders keep the vision tower in a separate mmproj file (needed for edit)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def load(self, text_encoder_name, weight_dtype="default", mmproj_name=_NONE, unique_id=None):
        from ..core.encoders import tokenizer as tok

        path = runtime.resolve_choice(text_encoder_name, "text_encoders")
        mmproj = None
        if mmproj_name not in (None, "", _NONE):
            mmproj = runtime.resolve_model_file("text_encoders", mmproj_name)
        # The tokenizer first: a missing one should fail before gigabytes are read.
        tokenizer = _tokenizer_for(path, tok)
        _free_before_load()
        device = runtime.compute_device()
        module, vision_state = weight_load.load_text_encoder(
            path,
            weight_dtype=weight_dtype,
            device=runtime.offload_device(),
            compute_dtype=runtime.compute_dtype(device),
            mmproj=mmproj,
        )
        fmt = "gguf" if path.suffix.lower() == ".gguf" else _weight_format(module)
        _show_loaded(unique_id, "text_encoder", text_encoder_name, format=fmt, vision=bool(vision_state))
        owners = _present(placement.manage(module, "layers"))
        return (TextEncoder(module=module, tokenizer=tokenizer, name=Path(text_encoder_name).name, vision=vision_state or None,
                            owners=owners),)


def _tokenizer_for(path: Path, tok):
    if path.suffix.lower() == ".gguf":
        try:
            from ..core.loading.gguf_tokenizer import tokenizer_from_gguf

            return tokenizer_from_gguf(path)
        except Exception as err:  # fall back to the usual places, but keep the reason
            gguf_error = err
    else:
        gguf_error = None
    try:
        folder = tok.find_tokenizer_dir(path, extra_dirs=runtime.tokenizer_search_dirs())
    except FileNotFoundError as err:
        if gguf_error is not None:
            raise FileNotFoundError(f"{err} (the GGUF's own tokenizer could not be used either: {gguf_error})") from err
        raise
    return tok.QwenTokenizer.from_dir(folder)


class QwenImageVAELoader:
    """Loads the Qwen-Image (Wan-2.1) VAE in original or diffusers key names."""

    CATEGORY = "Qwen-Image/loaders"
    RETURN_TYPES = (VAE_TYPE,)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"
    DESCRIPTION = "Loads the Qwen-Image VAE (qwen_image_vae.safetensors, or a diffusers vae folder) from models/vae."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": (runtime.file_choices("vae"), {"tooltip": "File in models/vae."})}, "hidden": {"unique_id": "UNIQUE_ID"}}

    def load(self, vae_name, unique_id=None):
        path = runtime.resolve_choice(vae_name, "vae")
        device = runtime.compute_device()
        # The VAE is small; fp32 on the CPU, the GPU's compute dtype otherwise (bf16 keeps it exact enough).
        dtype = torch.float32 if device.type == "cpu" else runtime.compute_dtype(device)
        module = weight_load.load_vae(path, dtype=dtype, device=runtime.offload_device())
        _show_loaded(unique_id, "vae", vae_name, format=str(dtype).replace("torch.", ""))
        return (VAE(module=module, name=Path(vae_name).name, owners=_present(placement.manage(module))),)


NODE_CLASS_MAPPINGS = {
    "QwenImageDiTLoader": QwenImageDiTLoader,
    "QwenImageTextEncoderLoader": QwenImageTextEncoderLoader,
    "QwenImageVAELoader": QwenImageVAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QwenImageDiTLoader": "Load Qwen-Image Diffusion Model",
    "QwenImageTextEncoderLoader": "Load Qwen-Image Text Encoder",
    "QwenImageVAELoader": "Load Qwen-Image VAE",
}
