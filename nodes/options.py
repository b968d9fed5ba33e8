"""Speed options carried on a model handle, turned into the RunOptions of that model's calls.

Nothing is switched for the process: the sampler passes the handle's ``RunOptions`` into each
MMDiT call (ours directly, ComfyUI's through ``transformer_options``), so other models running
meanwhile (another workflow's, a ControlNet, a text encoder) keep their own.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Iterator

import torch

from ..core.layers import attention
from ..core.quant import blockscaled_matmul, fp8_matmul, int8_matmul
from ..core.pipeline import compile as block_compile
from ..core.layers.run_options import DEFAULT, RunOptions
from . import runtime
from .handles import MODEL_TYPE

FP8_CHOICES = ("off", "auto", "row", "tensor")
INT8_CHOICES = ("off", "on")
BLOCKSCALED_CHOICES = ("off", "on")


def with_speed_options(model, attention_backend: str, fp8: str, int8: str = "off", blockscaled: str = "off"):
    if attention_backend not in attention.BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(attention.BACKENDS)}, got {attention_backend!r}")
    if fp8 not in FP8_CHOICES:
        raise ValueError(f"fp8_matmul must be one of {', '.join(FP8_CHOICES)}, got {fp8!r}")
    if fp8 != "off" and "fp8" not in model.weight_format.lower():
        runtime.warn(f"fp8_matmul only changes float8 weights; {model.name} is {model.weight_format}, so it has no effect")
    if int8 not in INT8_CHOICES:
        raise ValueError(f"int8_matmul must be one of {', '.join(INT8_CHOICES)}, got {int8!r}")
    if int8 != "off" and "int8" not in model.weight_format.lower():
        runtime.warn(f"int8_matmul only changes ComfyUI int8 layers; {model.name} is {model.weight_format}, so it has no effect")
    if blockscaled not in BLOCKSCALED_CHOICES:
        raise ValueError(f"blockscaled_matmul must be one of {', '.join(BLOCKSCALED_CHOICES)}, got {blockscaled!r}")
    if blockscaled != "off" and model.weight_format.lower() not in blockscaled_matmul.FORMATS:
        runtime.warn(f"blockscaled_matmul only changes ComfyUI nvfp4 / mxfp8 layers; {model.name} is "
                     f"{model.weight_format}, so it has no effect")
    # The optional ones are recorded only once someone turned them on (an earlier Speed Options
    # node may have), so a handle without them keeps the defaults.
    extra = {}
    for name, value in (("int8_matmul", int8), ("blockscaled_matmul", blockscaled)):
        if value != "off" or name in model.options:
            extra[name] = value
    return model.with_options(attention=attention_backend, fp8_matmul=fp8, **extra)


def run_options(model) -> RunOptions:
    """The options of this handle's MMDiT calls: what its Speed Options node chose; what it does
    not set keeps the defaults (the QWENIMAGE_FP8_MATMUL environment switch included). An attention
    backend that is not installed, or failed earlier in this process, is SDPA (said once)."""
    opts = model.options
    changes = {}
    if "attention" in opts:
        changes["attention"] = attention.resolve(opts["attention"])
    fp8 = opts.get("fp8_matmul")
    if fp8 is not None:
        changes["fp8_matmul"] = None if fp8 == "off" else fp8
    if opts.get("int8_matmul") is not None:
        changes["int8_matmul"] = opts["int8_matmul"] == "on"
    if opts.get("blockscaled_matmul") is not None:
        changes["blockscaled_matmul"] = opts["blockscaled_matmul"] == "on"
    return replace(DEFAULT, **changes) if changes else DEFAULT


@contextlib.contextmanager
def speed_settings(model, device: torch.device) -> Iterator[RunOptions]:
    """Yields the handle's ``RunOptions`` for the calls the body makes to its MMDiT; the Torch
    Compile node's choice is in force on the handle's module (its blocks only) for the body."""
    options = run_options(model)
    if model.options.get("fp8_matmul", "off") != "off" and not fp8_matmul.device_supports(device):
        runtime.warn(f"fp8_matmul needs float8 tensor cores (RTX 40xx, H100 or newer); {device} has none, "
                     "so the float8 weights are expanded to bf16 as usual")
    if model.options.get("int8_matmul", "off") != "off" and not int8_matmul.device_supports(device):
        runtime.warn(f"int8_matmul needs int8 tensor cores (RTX 30xx, A100 or newer); {device} has none, "
                     "so the int8 weights are decoded to bf16 as usual")
    if model.options.get("blockscaled_matmul", "off") != "off" and not blockscaled_matmul.device_supports(device):
        runtime.warn(f"blockscaled_matmul needs Blackwell tensor cores (RTX 50xx, B200 or newer) and comfy-kitchen "
                     f"(ComfyUI 0.30 ships it); {device} lacks them, so the nvfp4 / mxfp8 weights are decoded "
                     "to bf16 as usual")
    with block_compile.compiled(model.module, model.options.get("compile")):
        yield options


class QwenImageSpeedOptions:
    CATEGORY = "Qwen-Image/model"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = (
        "Faster kernels for this model's sampling. The defaults (PyTorch SDPA, exact fp8 expansion) are the safe "
        "ones; the options apply only to samplers fed from this node."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE,),
                "attention": (list(attention.BACKENDS), {
                    "default": "sdpa",
                    "tooltip": "sdpa: PyTorch's built-in attention (safe everywhere). cudnn: the same with NVIDIA's "
                               "cuDNN kernel first (often faster on H100 / RTX 40xx). flash / sage: FlashAttention or "
                               "SageAttention when installed. A kernel that fails or returns NaN (black images) is "
                               "dropped for sdpa with a warning.",
                }),
                "fp8_matmul": (list(FP8_CHOICES), {
                    "default": "off",
                    "tooltip": "For fp8 checkpoints on RTX 40xx / H100: run the matmuls in float8 with per-token "
                               "scales (faster, close to bf16). off: expand the weights to bf16 (exact). row / "
                               "tensor force the activation scaling; auto picks row where the GPU allows it.",
                }),
            },
            "optional": {
                "int8_matmul": (list(INT8_CHOICES), {
                    "default": "off",
                    "tooltip": "For ComfyUI int8 checkpoints (int8_convrot) on RTX 30xx / A100 or newer: run the "
                               "matmuls on int8 tensor cores with per-token scales, as ComfyUI does (faster, close "
                               "to exact). off: decode the weights to bf16 (exact).",
                }),
                "blockscaled_matmul": (list(BLOCKSCALED_CHOICES), {
                    "default": "off",
                    "tooltip": "For ComfyUI nvfp4 / mxfp8 checkpoints on Blackwell GPUs (RTX 50xx, B200): run the "
                               "matmuls on fp4 / fp8 tensor cores with the activations quantized as ComfyUI "
                               "does (much faster; nvfp4's 4-bit activations cost some accuracy). Needs "
                               "comfy-kitchen (ComfyUI 0.30 ships it). off: decode the weights to bf16 (exact).",
                }),
            },
        }

    def apply(self, model, attention, fp8_matmul, int8_matmul="off", blockscaled_matmul="off"):  # noqa: A002
        return (with_speed_options(model, attention, fp8_matmul, int8_matmul, blockscaled_matmul),)


NODE_CLASS_MAPPINGS = {"QwenImageSpeedOptions": QwenImageSpeedOptions}
NODE_DISPLAY_NAME_MAPPINGS = {"QwenImageSpeedOptions": "Qwen-Image Speed Options"}
