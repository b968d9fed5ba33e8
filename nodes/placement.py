"""Putting our modules on the GPU only while they work, and streaming when they cannot fit.

Our models are not ComfyUI ModelPatchers, so we keep a small LRU of what we placed on the
compute device and ask ComfyUI to evict its own models before placing a large one.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch

from ..model_defs.offload import module_bytes
from ..model_defs.streaming import BlockStreamer, blocks_that_fit
from ..model_defs.weights import dequant_cuda
from . import runtime

# id(module) -> module, most recently used last
_RESIDENT: "OrderedDict[int, torch.nn.Module]" = OrderedDict()
_HEADROOM = 1.5 * (1 << 30)  # activations and the allocator's slack


def _module_device(module: torch.nn.Module) -> torch.device | None:
    """The one device holding all of ``module``'s parameters; None when they are spread out."""
    devices = {p.device for p in module.parameters()}
    if not devices:
        return torch.device("cpu")
    return devices.pop() if len(devices) == 1 else None


def _canonical(device) -> torch.device:
    # torch.device("cuda") != torch.device("cuda:0"), but parameters always carry the index.
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _evict_for(bytes_needed: int, device: torch.device, keep: torch.nn.Module) -> None:
    for key in list(_RESIDENT):
        if runtime.free_device_memory(device) >= bytes_needed:
            return
        m = _RESIDENT[key]
        if m is keep:
            continue
        m.to(runtime.offload_device())
        del _RESIDENT[key]
        runtime.soft_empty_cache()


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device, stream_blocks: str | None = None):
    """Run the body with ``module`` on ``device``.

    If it cannot fit even after evicting other models, and ``stream_blocks`` names a
    ModuleList attribute, everything but those blocks moves to the device and the blocks
    stream through one at a time.
    """
    device = _canonical(device)
    if device.type == "cuda":
        # GGUF weights are expanded on the GPU every step: use the compiled kernels there
        # (idempotent; no-op when torch.compile cannot work, or QWENIMAGE_FUSED_DEQUANT=0).
        dequant_cuda.enable()
    if device.type == "cpu" or _module_device(module) == device:
        _touch(module)
        yield "resident"
        return
    size = module_bytes(module)
    need = size + _HEADROOM
    if runtime.free_device_memory(device) < need:
        runtime.request_memory(int(need), device)
        _evict_for(int(need), device, keep=module)
    if runtime.free_device_memory(device) >= need or stream_blocks is None:
        module.to(device)
        _touch(module)
        yield "resident"
        return
    blocks = getattr(module, stream_blocks)
    for name, child in module.named_children():
        if child is not blocks:
            child.to(device)
    for name, p in module.named_parameters(recurse=False):
        p.data = p.data.to(device)
    runtime.warn(
        f"the model ({size / 2**30:.1f} GiB) does not fit in free GPU memory; streaming its blocks "
        "from system memory (slower; an fp8 or GGUF model avoids this)"
    )
    # Leading blocks that fit next to the streaming window stay on the device: fewer uploads per step.
    keep = blocks_that_fit(blocks, runtime.free_device_memory(device) - int(_HEADROOM))
    try:
        with BlockStreamer(blocks, device, runtime.offload_device(), keep=keep):
            yield "streamed"
    finally:
        # Leave the module whole on one device, so the next run decides afresh.
        module.to(runtime.offload_device())
        runtime.soft_empty_cache()


def _touch(module: torch.nn.Module) -> None:
    where = _module_device(module)
    if where is not None and where.type != "cpu":
        _RESIDENT[id(module)] = module
        _RESIDENT.move_to_end(id(module))


def release(module: torch.nn.Module) -> None:
    """Move ``module`` back to the offload device (used before loading something big)."""
    module.to(runtime.offload_device())
    _RESIDENT.pop(id(module), None)
    runtime.soft_empty_cache()
