"""Our models as ComfyUI's memory manager sees them: genuine ModelPatchers.

Inside ComfyUI every module of ours (MMDiT, text encoder, vision tower, VAE, ControlNet) is
owned by a ``QwenImagePatcher``, a subclass of ComfyUI's own ``ModelPatcher``, and is put on the
GPU by ComfyUI's ``load_models_gpu``. So "Unload models", a core model that needs the VRAM,
``--lowvram`` / ``--novram`` / ``--reserve-vram``, ``--disable-smart-memory``, DynamicVRAM and
whatever ComfyUI reads next month treat ours as their own: every member they read is the real
one, inherited.

The patcher overrides only how weights get to the device, because our layers are not ComfyUI's
``comfy.ops`` layers (which it casts one by one when a model is partially loaded):

- the model fits its budget: it moves whole, weights read as stored returning to their file
  mapping when they leave (``host_memory.move``: no RAM copy per eviction);
- it does not: it is partially loaded our way: everything but the repeated blocks, plus as many
  leading blocks as fit, stay on the device and the rest stream through with prefetch
  (``BlockStreamer``). The block streamer is our equivalent of ComfyUI's per-layer partial load.

``loaded_size`` counts what really sits on the device: weights, the streaming window and LoRA
copies made on the device. ComfyUI's own weight patches (core LoRA loaders on our MODEL) are
applied with ComfyUI's ``patch_weight_to_device`` to dense weights, and refused with a clear
message on fp8-scaled and GGUF weights, whose stored numbers they would corrupt.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..core.layers import host_memory
from ..core.layers.host_memory import module_bytes
from ..core.pipeline.streaming import BlockStreamer, block_bytes, blocks_that_fit
from ..core.layers import lora_patch as lora
from ..core.quant.dfloat11 import decode_bytes
from . import runtime

STREAM_PREFETCH = 1  # blocks uploaded ahead while one computes


class QwenImagePart(nn.Module):
    """What a patcher manages for a text encoder, vision tower, VAE or ControlNet: our module as
    ``inner``. ComfyUI keeps its bookkeeping (``device``, ``model_loaded_weight_memory``, ...) as
    attributes of the managed object; the container keeps them off our models."""

    def __init__(self, module: nn.Module, stream_blocks: str | None, offload_device: torch.device):
        super().__init__()
        self.inner = module
        self.qwen_stream_blocks = stream_blocks
        self.device = offload_device

    def qwen_module(self) -> nn.Module:
        return self.inner

    def get_dtype(self) -> torch.dtype:
        for p in self.inner.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32


def _move(module: nn.Module, device: torch.device) -> None:
    """The one way our weights change device (tests on a simulated GPU replace it)."""
    host_memory.move(module, device)  # weights read as stored go back to the file, uncopied


def _weight_format(layer: nn.Module, weight) -> str | None:
    """The stored format ComfyUI's weight patching would corrupt, or None when it is dense."""
    if getattr(layer, "quant_type", None) is not None:
        return "GGUF"
    if getattr(layer, "comfy_quant", None) is not None:
        return f"ComfyUI {layer.comfy_quant.format}"
    if getattr(layer, "weight_scale", None) is not None:
        return "scaled fp8"
    if isinstance(weight, torch.Tensor) and weight.is_meta:  # expanded only while its block runs
        return "DFloat11"
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return "quantized"
    return None


def _streamable(module: nn.Module, stream_blocks: str | None):
    blocks = getattr(module, stream_blocks, None) if stream_blocks else None
    return blocks if isinstance(blocks, nn.ModuleList) and len(blocks) else None


def _outside_blocks(module: nn.Module, blocks: nn.ModuleList) -> int:
    """Bytes of ``module`` that are not in ``blocks``: always on the device while it streams."""
    return module_bytes(module) - sum(block_bytes(b) for b in blocks)


def _blocks_kept(rest: int, blocks: nn.ModuleList, budget: float) -> int:
    """How many leading blocks stay on the device within ``budget`` bytes, next to the ``rest``
    of the model, while the others stream."""
    room = budget - rest if math.isfinite(budget) else 0
    return blocks_that_fit(blocks, int(max(0, room)), prefetch=STREAM_PREFETCH)


if runtime.ModelPatcher is not None:

    class QwenImagePatcher(runtime.ModelPatcher):
        """ComfyUI's ModelPatcher for one of our modules (see the module docstring)."""

        # -- what ComfyUI is told
        def _module(self) -> nn.Module:
            return self.model.qwen_module()

        def _working_bytes(self, module: nn.Module) -> int:
            """Device memory the model holds besides its weights while it runs: LoRA copies, and
            a DFloat11 model's one block decoded to bf16 at a time."""
            return lora.device_copy_bytes(module) + decode_bytes(module)

        def model_size(self) -> int:
            module = self._module()
            return module_bytes(module) + self._working_bytes(module)

        def loaded_size(self) -> int:
            if not self.model.model_loaded_weight_memory:
                return 0
            return self.model.model_loaded_weight_memory + self._working_bytes(self._module())

        def placement(self) -> str:
            """"streamed" when the blocks stream through the device, else "resident"."""
            return "streamed" if getattr(self.model, "qwen_streamer", None) is not None else "resident"

        # -- getting weights to the device
        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            device_to = torch.device(device_to) if device_to is not None else self.load_device
            budget = math.inf if full_load or not lowvram_model_memory else lowvram_model_memory
            module = self._module()
            self._check_weight_patches()
            self._stop_streaming()
            blocks = _streamable(module, self.model.qwen_stream_blocks)
            if blocks is None or module_bytes(module) + decode_bytes(module) <= budget:
                self._patch_weights(device_to)
                _move(module, device_to)
                loaded = module_bytes(module)
            else:
                self._patch_weights(self.offload_device)
                loaded = self._stream(module, blocks, device_to, budget)
            self.model.device = device_to
            self.model.model_loaded_weight_memory = loaded
            self.model.current_weight_patches_uuid = self.patches_uuid
            for callback in self.get_all_callbacks(runtime.ON_LOAD):
                callback(self, device_to, lowvram_model_memory, force_patch_weights, full_load)

        def _stream(self, module: nn.Module, blocks: nn.ModuleList, device: torch.device, budget: float) -> int:
            for child in module.children():
                if child is not blocks:
                    _move(child, device)
            for p in module.parameters(recurse=False):
                p.data = p.data.to(device)
            rest = _outside_blocks(module, blocks)
            keep = _blocks_kept(rest + decode_bytes(module), blocks, budget)  # a DFloat11 block decodes in place
            streamer = BlockStreamer(blocks, device, self.offload_device, prefetch=STREAM_PREFETCH, keep=keep)
            streamer.__enter__()
            self.model.qwen_streamer = streamer
            runtime.warn(
                f"{type(module).__name__} ({module_bytes(module) / 2**30:.1f} GiB) does not fit in the GPU memory "
                f"ComfyUI can give it; {len(blocks) - keep} of its {len(blocks)} blocks stream from system memory "
                "(slower; an fp8 or GGUF model avoids this)"
            )
            window = (2 + STREAM_PREFETCH) * max(block_bytes(b) for b in blocks) if keep < len(blocks) else 0
            return rest + sum(block_bytes(b) for b in blocks[:keep]) + window

        def _stop_streaming(self) -> None:
            streamer = getattr(self.model, "qwen_streamer", None)
            if streamer is not None:
                self.model.qwen_streamer = None
                streamer.__exit__(None, None, None)

        def _check_weight_patches(self) -> None:
            for key in self.patches:
                layer_name, _, param = key.rpartition(".")
                layer = self.model.get_submodule(layer_name)
                fmt = _weight_format(layer, getattr(layer, param, None))
                if fmt is not None:
                    raise ValueError(
                        f"ComfyUI's LoRA loader cannot patch this Qwen-Image model's {fmt} weights ({key}): it "
                        f"would rewrite the stored {fmt} numbers. Load the LoRA with 'Load Qwen-Image LoRA' before "
                        "'Qwen-Image as ComfyUI MODEL' instead; it applies LoRAs to bf16, fp8 and GGUF weights alike."
                    )

        def _patch_weights(self, device: torch.device) -> None:
            """ComfyUI's own weight patches (core LoRA loaders), computed as ComfyUI computes them."""
            for key in self.patches:
                self.patch_weight_to_device(key, device_to=device)

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            with self.use_ejected(skip_and_inject_on_exit_only=True):
                current = self.model.current_weight_patches_uuid
                if current is not None and (current != self.patches_uuid or force_patch_weights):
                    self.unpatch_model(self.offload_device, unpatch_weights=True)  # another clone's patches
                self.patch_model(load_weights=False)  # object patches, e.g. ModelSamplingAuraFlow's
                used = self.model.model_loaded_weight_memory
                if used and extra_memory < 0:  # ComfyUI now grants less than the model holds
                    self.partially_unload(self.offload_device, -extra_memory, force_patch_weights)
                    return 0
                if used and (extra_memory == 0 or self._no_better(device_to, used + extra_memory)):
                    return 0
                try:
                    self.load(device_to, lowvram_model_memory=used + extra_memory, force_patch_weights=force_patch_weights)
                except Exception:
                    self.detach()
                    raise
                return self.model.model_loaded_weight_memory - used

        def _no_better(self, device_to, budget) -> bool:
            """Whether loading again with ``budget`` would leave the model as it is now (whole, or
            streaming with the same leading blocks kept): then nothing is re-uploaded."""
            if self.model.device != torch.device(device_to):
                return False
            streamer = getattr(self.model, "qwen_streamer", None)
            if streamer is None:
                return True
            module = self._module()
            if module_bytes(module) <= budget:
                return False
            return _blocks_kept(_outside_blocks(module, streamer.blocks), streamer.blocks, budget) == streamer.keep

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            """Free at least ``memory_to_free``: stream more blocks when that is enough, else unload."""
            loaded = self.loaded_size()
            if memory_to_free <= 0 or not loaded:
                return 0
            left = loaded - memory_to_free
            self.unpatch_model(device_to, unpatch_weights=True)
            if left > 0 and _streamable(self._module(), self.model.qwen_stream_blocks) is not None:
                self.load(self.load_device, lowvram_model_memory=left, force_patch_weights=force_patch_weights)
            return loaded - self.loaded_size()

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                self._stop_streaming()
            # ComfyUI restores the weights its patches replaced and the object patches, and resets
            # its bookkeeping; we then move what is left, our way.
            super().unpatch_model(None, unpatch_weights=unpatch_weights)
            if unpatch_weights and device_to is not None:
                module = self._module()
                _move(module, torch.device(device_to))
                lora.release_device_copies(module)
                self.model.device = torch.device(device_to)
                runtime.soft_empty_cache()

else:  # plain Python: no ComfyUI to manage memory (placement.py's own path runs instead)
    QwenImagePatcher = None


def make_patcher(model: nn.Module):
    """A patcher owning ``model`` (a ``QwenImagePart`` or our ComfyUI MODEL), or None outside ComfyUI."""
    if QwenImagePatcher is None:
        return None
    return QwenImagePatcher(model, load_device=runtime.compute_device(), offload_device=runtime.offload_device())
