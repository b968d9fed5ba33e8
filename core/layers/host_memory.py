"""Where a model's weights go when they leave the GPU.

A weight read unchanged from a safetensors or GGUF file is a view of the file's memory mapping:
it lives in the operating system's page cache, costs the process no memory of its own, and
can be dropped under memory pressure and read again on demand. Moving such a model to the GPU
and back with ``module.to`` would leave a fresh copy in process memory instead (20 GB for an
fp8 MMDiT, each time it is evicted), which is how 32 GB machines run out of RAM. The loader
keeps each such parameter's file view (``keep_file_view``), and ``move`` hands it back rather
than copying: taking a model off the GPU is then free, and RAM is as it was before the model
first ran. Weights never change after loading (LoRAs are added in the forward pass), so the
file view always holds the current values.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import fold, lora_patch
from .file_views import file_view_items


def module_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, as stored (compact formats count compact)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def pageable(t: torch.Tensor) -> torch.Tensor:
    """A copy of CPU tensor ``t`` in ordinary (swappable) memory; for a pinned ``t``, which the
    system cannot page out."""
    return torch.empty_like(t, device="cpu", pin_memory=False).copy_(t)


def move(module: nn.Module, device) -> None:
    """``module.to(device)``; to the CPU, parameters with a file view return to it uncopied,
    pinned (page-locked) host tensors become ordinary memory, and the device copies of the
    LoRAs patched into ``module`` are freed: afterwards the model holds no memory that the
    system could not page out or drop, whatever ran it (placement, the block streamer)."""
    device = torch.device(device)
    if device.type == "cpu":
        # LoRA layers keep copies of their factors on the device they last ran on; they are
        # not parameters, so module.to would leave them on the GPU.
        lora_patch.release_device_copies(module)
        for mod in module.modules():
            _back_to_file(mod)
            _unpin(mod)
    module.to(device)


def _back_to_file(mod: nn.Module) -> None:
    for name, view in file_view_items(mod):
        p = mod._parameters.get(name)
        if p is None:  # a buffer read as stored (DFloat11's compressed tensors)
            p = mod._buffers.get(name)
        if p is None or p.shape != view.shape or p.dtype != view.dtype or p.data_ptr() == view.data_ptr():
            continue
        try:
            p.data = view
        except RuntimeError:  # a tensor kind .data cannot be swapped across: module.to copies it
            continue
        fold.forget(mod)  # LoRAs folded into the dropped copy left with it


def _unpin(mod: nn.Module) -> None:
    """Pinned CPU tensors of ``mod`` itself (not its children) -> ordinary memory."""
    for tensors in (mod._parameters, mod._buffers):
        for t in tensors.values():
            if t is not None and t.device.type == "cpu" and t.is_pinned():
                t.data = pageable(t.data)
