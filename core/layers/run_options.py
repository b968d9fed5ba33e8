"""Per-call run options: which kernels one model call uses, passed down with that call.

Nothing here is switched for the process. Two models running in one process (two workflows, a
ControlNet or a text encoder running inside the MMDiT's step) each use the options of their own
call: ``QwenImageMMDiT.forward(..., options=RunOptions(...))`` hands them to its blocks, its
attention calls and its ``Linear`` layers; a call without options (every other model) gets
``DEFAULT``.

The environment switches are read once, when this module is imported, and only give the
defaults:
- ``QWENIMAGE_FP8_MATMUL=1``: float8 weights run as float8 matmuls in every model by default
  (``QWENIMAGE_FP8_MATMUL_MODE``: auto / row / tensor, default auto);
- ``QWENIMAGE_FP8_COMPILE=0``: the float8 activation quantizer stays eager (not compiled).

What the options cannot express is a fact about the machine, kept by the modules concerned for
the whole process: an attention kernel that failed or returned NaN (``attention``), a float8
matmul combination the GPU refused (``fp8_matmul``), a compiler that does not work.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .attention import BACKENDS
from ..quant.fp8_matmul import SETTINGS as FP8_SETTINGS


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default


def _env_fp8() -> str | None:
    if not _env_flag("QWENIMAGE_FP8_MATMUL", False):
        return None
    mode = os.environ.get("QWENIMAGE_FP8_MATMUL_MODE", "auto").strip().lower()
    return mode if mode in FP8_SETTINGS else "auto"


@dataclass(frozen=True)
class RunOptions:
    """``attention``: one of ``attention.BACKENDS`` ("sdpa" is PyTorch's, safe everywhere).
    ``fp8_matmul``: None (float8 weights are expanded to the activation dtype: exact), or "auto" /
    "row" / "tensor" (float8 matmuls where the GPU has float8 tensor cores; see ``fp8_matmul``).
    ``fp8_on_cpu``: let the float8 matmul run (slowly) on the CPU too: tests and smoke benchmarks
    check its math without a GPU.
    ``fp8_compile``: compile the float8 activation quantizer on CUDA.
    ``fused_dequant``: GGUF weights on a GPU may use the compiled per-shape kernels of
    ``quant.gguf_kernels`` where registered; False keeps the plain PyTorch kernels (what
    torch.compile'd blocks trace).
    ``int8_matmul``: ComfyUI int8 layers run their matmuls on int8 operands where the GPU has int8
    tensor cores (``quant.int8_matmul``; close to, not equal to, the decoded weight's result);
    ``int8_on_cpu`` lets it run on the CPU too (tests).
    ``blockscaled_matmul``: ComfyUI nvfp4 / mxfp8 layers run their matmuls on block-scaled operands
    where the GPU has such tensor cores (Blackwell; ``quant.blockscaled_matmul``; close to, not
    equal to, the decoded weight's result); ``blockscaled_on_cpu`` runs what that kernel computes
    on the CPU (tests)."""

    attention: str = "sdpa"
    fp8_matmul: str | None = _env_fp8()
    fp8_on_cpu: bool = False
    fp8_compile: bool = _env_flag("QWENIMAGE_FP8_COMPILE", True)
    fused_dequant: bool = True
    int8_matmul: bool = False
    int8_on_cpu: bool = False
    blockscaled_matmul: bool = False
    blockscaled_on_cpu: bool = False

    def __post_init__(self):
        if self.attention not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention!r}; expected one of {', '.join(BACKENDS)}")
        if self.fp8_matmul is not None and self.fp8_matmul not in FP8_SETTINGS:
            raise ValueError(f"fp8 matmul mode must be None or one of {', '.join(FP8_SETTINGS)}, "
                             f"got {self.fp8_matmul!r}")


DEFAULT = RunOptions()


def resolve(options: RunOptions | None) -> RunOptions:
    """``options``, or the defaults for a call that passed none."""
    return DEFAULT if options is None else options
