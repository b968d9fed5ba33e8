"""Putting our modules on the GPU while they work, and streaming them when they cannot fit.

Two hosts, one call (``on_device``):

- **Inside ComfyUI** each module is owned by a genuine ComfyUI ``ModelPatcher`` subclass
  (``patcher.QwenImagePatcher``, made once by ``manage`` when a loader builds the module) and is
  loaded with ComfyUI's own ``load_models_gpu``. ComfyUI then decides everything as for its own
  models: what to evict, partial loading (our block streaming), "Unload models", its VRAM flags.
  The handle that travels between nodes holds the patcher (ComfyUI keeps only a weak reference
  to it), so a model the graph drops frees its memory with it.
- **In plain Python** (scripts, tests, benchmarks) a small least-recently-used cache does the
  same job: a module stays on the GPU after its run until another needs the room, is never
  evicted while in use, and streams its blocks when it cannot fit.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict

import torch

from ..core.layers import host_memory
from ..core.layers.host_memory import module_bytes
from ..core.pipeline.streaming import BlockStreamer, blocks_that_fit
from ..core.quant import gguf_kernels
from ..core.quant.dfloat11 import decode_bytes
from . import patcher as patchers
from . import runtime

_HEADROOM = 1.5 * (1 << 30)  # activations and the allocator's slack

# id(module) -> the patcher owning it (ComfyUI only). Weak: the handle holds the patcher.
_PATCHERS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def manage(module: torch.nn.Module, stream_blocks: str | None = None, model: torch.nn.Module | None = None):
    """The ComfyUI patcher that owns ``module`` from now on (None outside ComfyUI).

    ``model``: the object ComfyUI should manage when it is not a plain part (our MMDiT's
    ComfyUI MODEL); by default ``module`` in a ``QwenImagePart``. Keep the result in the handle."""
    existing = _PATCHERS.get(id(module))
    if existing is not None and existing.model.qwen_module() is module:
        return existing
    if model is None and patchers.QwenImagePatcher is not None:
        model = patchers.QwenImagePart(module, stream_blocks, runtime.offload_device())
    owner = patchers.make_patcher(model) if model is not None else None
    if owner is not None:
        _PATCHERS[id(module)] = owner
    return owner


def _owner(module: torch.nn.Module, stream_blocks: str | None):
    owner = _PATCHERS.get(id(module))
    if owner is None or owner.model.qwen_module() is not module:
        owner = manage(module, stream_blocks)
        # No loader registered this module (a script built it): nothing else holds its patcher,
        # so the module does. A reference cycle, collected with the module.
        module.__dict__["_qwenimage_patcher"] = owner
    return owner


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device, stream_blocks: str | None = None):
    """Run the body with ``module`` on ``device``; yields "resident" or "streamed"."""
    with on_devices(device, (module, stream_blocks)) as how:
        yield how[0]


@contextlib.contextmanager
def on_devices(device: torch.device, *parts):
    """Run the body with every ``(module, stream_blocks)`` of ``parts`` on ``device``, loaded
    together (so loading one never evicts another); yields each one's "resident" / "streamed"."""
    device = _canonical(device)
    if device.type == "cuda":
        # GGUF weights are expanded on the GPU every step: use the compiled kernels there
        # (idempotent; no-op when torch.compile cannot work, or QWENIMAGE_FUSED_DEQUANT=0).
        gguf_kernels.enable()
    if runtime.IN_COMFYUI:
        owners = [_owner(m, blocks) for m, blocks in parts]
        runtime.load_models(owners, memory_required=_HEADROOM if device.type != "cpu" else 0)
        yield [o.placement() for o in owners]
        return
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(_plain_on_device(m, device, blocks)) for m, blocks in parts]


# ----------------------------------------------------------------------------- plain Python

class _Resident:
    """Our bookkeeping for one module on a compute device (plain Python only)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        key = id(module)
        self.module = weakref.ref(module, lambda _ref: _RESIDENT.pop(key, None))
        self.device = device
        self.busy = 0


# id(module) -> its entry, most recently used last
_RESIDENT: "OrderedDict[int, _Resident]" = OrderedDict()


def _move(module: torch.nn.Module, device: torch.device) -> None:
    host_memory.move(module, device)  # weights read from a file go back to its mapping, uncopied


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


def _evict_for(bytes_needed: int, device: torch.device) -> None:
    """Move our least recently used idle modules on ``device`` off it until ``bytes_needed`` is free."""
    for key, entry in list(_RESIDENT.items()):
        if runtime.free_device_memory(device) >= bytes_needed:
            return
        if entry.busy or entry.device != device:
            continue
        module = entry.module()
        if module is not None:
            release(module)
        else:  # collected a moment ago; its weakref callback may not have run yet
            _RESIDENT.pop(key, None)


@contextlib.contextmanager
def _using(module: torch.nn.Module, device: torch.device):
    """The body runs with ``module`` resident on ``device`` and safe from eviction."""
    entry = None
    if device.type != "cpu":
        entry = _RESIDENT.get(id(module))
        if entry is None or entry.module() is not module or entry.device != device:
            entry = _RESIDENT[id(module)] = _Resident(module, device)
        _RESIDENT.move_to_end(id(module))
        entry.busy += 1
    try:
        yield "resident"
    finally:
        if entry is not None:
            entry.busy -= 1


@contextlib.contextmanager
def _plain_on_device(module: torch.nn.Module, device: torch.device, stream_blocks: str | None):
    """If ``module`` cannot fit even after evicting our other modules, and ``stream_blocks``
    names a ModuleList attribute, everything but those blocks moves to the device and the
    blocks stream through."""
    if device.type == "cpu" or _module_device(module) == device:
        with _using(module, device) as how:
            yield how
        return
    size = module_bytes(module)
    need = size + decode_bytes(module) + _HEADROOM  # a DFloat11 block decoded while it runs
    _evict_for(int(need), device)
    if runtime.free_device_memory(device) >= need or stream_blocks is None:
        _move(module, device)
        with _using(module, device) as how:
            yield how
        return
    with _streamed(module, device, stream_blocks, size) as how:
        yield how


@contextlib.contextmanager
def _streamed(module: torch.nn.Module, device: torch.device, stream_blocks: str, size: int):
    blocks = getattr(module, stream_blocks)
    for child in module.children():
        if child is not blocks:
            child.to(device)
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    runtime.warn(
        f"the model ({size / 2**30:.1f} GiB) does not fit in free GPU memory; streaming its blocks "
        "from system memory (slower; an fp8 or GGUF model avoids this)"
    )
    # Leading blocks that fit next to the streaming window stay on the device: fewer uploads per step.
    keep = blocks_that_fit(blocks, runtime.free_device_memory(device) - int(_HEADROOM) - decode_bytes(module))
    try:
        with BlockStreamer(blocks, device, runtime.offload_device(), keep=keep):
            yield "streamed"
    finally:
        # Leave the module whole on one device, so the next run decides afresh.
        _move(module, runtime.offload_device())
        runtime.soft_empty_cache()


def release(module: torch.nn.Module) -> None:
    """Move ``module`` back to the offload device (plain Python: used before loading something big)."""
    _RESIDENT.pop(id(module), None)
    _move(module, runtime.offload_device())
    runtime.soft_empty_cache()
