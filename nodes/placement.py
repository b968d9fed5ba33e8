"""Putting our modules on the GPU only while they work, and streaming when they cannot fit.

A module placed on the GPU stays there after its node finishes (the next run reuses it) until
memory is needed. Both sides can then take it back:

- we evict our own least-recently-used modules, after asking ComfyUI to free its models;
- inside ComfyUI each resident module is also listed in ComfyUI's own table of loaded models
  (``_Resident`` offers what its ``free_memory`` uses), so a core node that needs VRAM, or the
  "Unload models" button, moves ours to system memory exactly as it does its own.

A module is never evicted while a node is using it (``_Resident.busy``), and residency is held
by weak reference: when the graph drops a model (another file chosen in a loader), its VRAM is
freed with it instead of waiting for memory pressure. ComfyUI's --disable-smart-memory and
--novram apply to ours as to its own models (``runtime.host_memory_policy``).
"""
from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict

import torch

from ..model_defs import host_memory
from ..model_defs.offload import module_bytes
from ..model_defs.streaming import BlockStreamer, blocks_that_fit
from ..model_defs.weights import dequant_cuda
from . import runtime

_HEADROOM = 1.5 * (1 << 30)  # activations and the allocator's slack


class _Resident:
    """One of our modules sitting on a compute device.

    Besides our own bookkeeping it is the entry ComfyUI's model management sees in its list of
    loaded models: the members below are the part of ComfyUI's ``LoadedModel`` that its
    ``free_memory`` / ``cleanup_models`` / ``load_models_gpu`` read. ``currently_used`` is
    always False so ComfyUI never tries to reload ours as one of its ModelPatchers.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device):
        key = id(module)
        self.real_model = weakref.ref(module, lambda _ref: _forget(key))
        self.device = device
        self.size = module_bytes(module)
        self.busy = 0

    # -- ComfyUI's LoadedModel protocol
    @property
    def model(self) -> "_PatcherView":
        return _PatcherView(self)

    @property
    def currently_used(self) -> bool:
        return False

    @currently_used.setter
    def currently_used(self, _value) -> None:
        pass

    def is_dead(self) -> bool:
        return False

    def model_memory(self) -> int:
        return self.size

    def model_loaded_memory(self) -> int:
        return self.size

    def model_offloaded_memory(self) -> int:
        return 0

    def model_memory_required(self, device) -> int:
        return 0 if device == self.device else self.size

    def model_use_more_vram(self, extra_memory, force_patch_weights=False) -> int:
        return 0

    def model_unload(self, memory_to_free=None, unpatch_weights=True) -> bool:
        """Called by ComfyUI when it needs the memory; True when the module left the device
        (ComfyUI then drops this entry from its list itself)."""
        if self.busy:
            return False
        module = self.real_model()
        if module is not None:
            _RESIDENT.pop(id(module), None)
            _move(module, runtime.offload_device())
        return True


class _PatcherView:
    """What ComfyUI reads through ``LoadedModel.model`` (a ModelPatcher there)."""

    def __init__(self, entry: _Resident):
        self.model = entry.real_model()  # ComfyUI logs ``.model.model.__class__.__name__``
        self.load_device = entry.device
        self.offload_device = runtime.offload_device()
        self.parent = None
        self._size = entry.size

    def is_clone(self, other) -> bool:
        return False

    def model_size(self) -> int:
        return self._size

    def loaded_size(self) -> int:
        return self._size

    def current_loaded_device(self):
        return self.load_device

    def model_patches_models(self) -> list:
        return []


# id(module) -> its entry, most recently used last
_RESIDENT: "OrderedDict[int, _Resident]" = OrderedDict()


def _forget(key: int) -> None:
    entry = _RESIDENT.pop(key, None)
    if entry is not None:
        runtime.host_forget_model(entry)


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
        module = entry.real_model()
        if module is not None:
            release(module)
        else:  # collected a moment ago; its weakref callback may not have run yet
            _forget(key)


def _register(module: torch.nn.Module, device: torch.device) -> _Resident:
    entry = _RESIDENT.get(id(module))
    if entry is None or entry.real_model() is not module or entry.device != device:
        if entry is not None:
            runtime.host_forget_model(entry)
        entry = _Resident(module, device)
        _RESIDENT[id(module)] = entry
        runtime.host_track_model(entry)
    _RESIDENT.move_to_end(id(module))
    return entry


@contextlib.contextmanager
def _using(module: torch.nn.Module, device: torch.device):
    """The body runs with ``module`` resident on ``device`` and safe from eviction; afterwards it
    stays for the next run unless ComfyUI was told to keep VRAM free (host_memory_policy)."""
    entry = _register(module, device) if device.type != "cpu" else None
    if entry is not None:
        entry.busy += 1
    try:
        yield "resident"
    finally:
        if entry is not None:
            entry.busy -= 1
            if not entry.busy and runtime.host_memory_policy() != "normal":
                release(module)


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
        with _using(module, device) as how:
            yield how
        return
    size = module_bytes(module)
    need = size + _HEADROOM
    if runtime.free_device_memory(device) < need:
        runtime.request_memory(int(need), device)
        _evict_for(int(need), device)
    fits = runtime.free_device_memory(device) >= need and runtime.host_memory_policy() != "stream"
    if fits or stream_blocks is None:
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
    keep = blocks_that_fit(blocks, runtime.free_device_memory(device) - int(_HEADROOM))
    try:
        with BlockStreamer(blocks, device, runtime.offload_device(), keep=keep):
            yield "streamed"
    finally:
        # Leave the module whole on one device, so the next run decides afresh.
        _move(module, runtime.offload_device())
        runtime.soft_empty_cache()


def release(module: torch.nn.Module) -> None:
    """Move ``module`` back to the offload device (used before loading something big)."""
    _forget(id(module))
    _move(module, runtime.offload_device())
    runtime.soft_empty_cache()
