"""Torch Compile node: marks a model handle so the sampler runs its blocks through torch.compile."""
from __future__ import annotations

from ..core.pipeline import compile as block_compile
from .handles import MODEL_TYPE


def with_compile(model, backend: str, mode: str):
    """A new handle whose sampling compiles the MMDiT blocks; ``model`` itself is unchanged."""
    settings = block_compile.CompileSettings(backend, mode)  # checks the names
    return model.with_options(compile={"backend": settings.backend, "mode": settings.mode})


class QwenImageTorchCompile:
    CATEGORY = "Qwen-Image/model"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = (
        "Runs the diffusion model's blocks through torch.compile while sampling. The first run compiles (a minute "
        "or more); later runs, other image sizes, prompt lengths and edit reference images reuse it. Needs Triton "
        "on the GPU; if compiling fails the sampler runs uncompiled with a warning. Works with bf16, fp8, GGUF "
        "models, LoRAs, ControlNets and block streaming."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE,),
                "backend": (list(block_compile.BACKENDS), {
                    "default": "inductor",
                    "tooltip": "inductor: generates fused GPU kernels (the speed-up). aot_eager / eager: for "
                               "debugging only, no speed-up.",
                }),
                "mode": (list(block_compile.MODES), {
                    "default": "default",
                    "tooltip": "default: compiles fastest. max-autotune-no-cudagraphs: benchmarks kernel choices "
                               "while compiling (much slower first run, sometimes faster steps). The first run "
                               "compiles; later sizes and prompts reuse the compiled blocks (going from batch 1 "
                               "to 2 compiles once more).",
                }),
            }
        }

    def apply(self, model, backend, mode):
        return (with_compile(model, backend, mode),)


NODE_CLASS_MAPPINGS = {"QwenImageTorchCompile": QwenImageTorchCompile}
NODE_DISPLAY_NAME_MAPPINGS = {"QwenImageTorchCompile": "Qwen-Image Torch Compile"}
