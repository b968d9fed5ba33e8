"""Run by test_comfyui_memory.py in ComfyUI's own Python: our models managed by ComfyUI's real
model management (comfy.model_management, comfy.model_patcher) on a simulated GPU.

The simulated GPU is the ``meta`` device: ComfyUI treats it as a compute device of its own
(not the CPU), a core model really moves there, and ours are recorded as moved by replacing the
one function our patcher moves weights with. Free memory is computed from what sits there.

argv: <ComfyUI checkout> <this pack's checkout> (see probe_boot.py). Prints one JSON line of observations.
"""
from __future__ import annotations

import gc
import json

import probe_boot  # noqa: F401  (ComfyUI on the path, its settings, the pack importable)
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import torch  # noqa: E402

from qwenimage_pack.core.layers.host_memory import module_bytes  # noqa: E402
from qwenimage_pack.nodes import patcher, placement, runtime  # noqa: E402

GPU = torch.device("meta")
UNIT = 4 * 64 * 64  # one Linear(64, 64)
CAPACITY = 4 * UNIT
where: dict[int, torch.device] = {}
sizes: dict[int, int] = {}
core_modules: list = []


def move(module, device):
    where[id(module)] = torch.device(device)
    sizes[id(module)] = module_bytes(module)


def free(device=None, torch_free_too=False):
    ours = sum(sizes[k] for k, d in where.items() if d == GPU)
    core = sum(module_bytes(m) for m in core_modules if next(m.parameters()).device == GPU)
    left = CAPACITY - ours - core
    return (left, left) if torch_free_too else left


patcher._move = move
mm.get_torch_device = lambda: GPU  # our loaders' and ComfyUI's "the GPU"
mm.get_all_torch_devices = lambda exclude_current=False: [GPU]
runtime.offload_device = lambda: torch.device("cpu")
placement._HEADROOM = 0
mm.get_free_memory = free
mm.minimum_inference_memory = lambda: 0
mm.EXTRA_RESERVED_VRAM = 0
mm.vram_state = mm.VRAMState.NORMAL_VRAM
mm.lowvram_available = True
mm.DISABLE_SMART_MEMORY = False


def on_gpu(m) -> bool:
    return where.get(id(m)) == GPU


def ours_listed() -> int:
    """Our models ComfyUI lists as holding device memory."""
    return sum(isinstance(lm.model, patcher.QwenImagePatcher) and lm.model_loaded_memory() > 0
               for lm in mm.current_loaded_models)


out = {"in_comfyui": runtime.IN_COMFYUI}
a, b, c = (torch.nn.Linear(64, 64, bias=False) for _ in range(3))
owners = {id(m): placement.manage(m) for m in (a, b, c)}  # what the loaders do; the handles keep them
out["genuine_patchers"] = all(isinstance(o, comfy.model_patcher.ModelPatcher) for o in owners.values())
for m in (a, b):
    with placement.on_device(m, GPU):
        pass
out["listed"] = ours_listed()
out["loaded_sizes"] = sorted(lm.model_loaded_memory() for lm in mm.current_loaded_models)

# ComfyUI's per-node clean-ups (run after every node with DynamicVRAM), pin budget, and its
# memory free for a model of two units: one of ours must go.
for cleanup in ("reset_cast_buffers", "cleanup_models_gc", "cleanup_models"):
    if hasattr(mm, cleanup):  # reset_cast_buffers: ComfyUI 0.30, after every node
        getattr(mm, cleanup)()
if hasattr(mm, "free_pins"):  # ComfyUI 0.30's pinned-memory budget
    mm.free_pins(1 << 30)
unloaded = mm.free_memory(3 * UNIT, GPU)
out["evicted_for_room"] = len(unloaded)
out["one_left_on_gpu"] = on_gpu(a) != on_gpu(b)

# A core model that needs the whole device forces ours out.
class _LeavesMetaEmpty:
    """A core model's parts; leaving the meta device they come back empty (meta holds no data)."""

    def to(self, device, *args, **kwargs):
        if torch.device(device) != GPU and any(p.device == GPU for p in self.parameters()):
            return self.to_empty(device=device)
        return super().to(device, *args, **kwargs)


class CoreLinear(_LeavesMetaEmpty, torch.nn.Linear):
    pass


class CoreNet(_LeavesMetaEmpty, torch.nn.Sequential):
    pass


core = CoreNet(*(CoreLinear(64, 64, bias=False) for _ in range(3)))
core_modules.append(core)
core_patcher = comfy.model_patcher.ModelPatcher(core, load_device=GPU, offload_device=torch.device("cpu"))
mm.load_models_gpu([core_patcher])
out["core_loaded"] = next(core.parameters()).device == GPU
out["ours_out_for_core"] = not on_gpu(a) and not on_gpu(b) and ours_listed() == 0

# Ours again: ComfyUI now moves the core model out for it.
with placement.on_device(c, GPU):
    out["ours_in_core_out"] = on_gpu(c) and next(core.parameters()).device != GPU

# "Unload models" (what POST /free does), and multi-GPU's unload of one model and its clones.
mm.unload_all_models()
out["all_unloaded"] = not any(on_gpu(m) for m in (a, b, c)) and ours_listed() == 0
if hasattr(mm, "unload_model_and_clones"):
    with placement.on_device(a, GPU):
        pass
    mm.unload_model_and_clones(owners[id(a)])
    out["unload_model_and_clones"] = not on_gpu(a)
else:
    out["unload_model_and_clones"] = True  # ComfyUI 0.3.64 has no multi-GPU clones

# Partial loading: a model with blocks that does not fit its budget streams them (ComfyUI's
# per-layer partial load needs its own layer classes; block streaming is ours) and keeps the same
# streaming set-up across runs when the budget allows no more.
streamed = []


class FakeStreamer:
    def __init__(self, blocks, device, offload, prefetch=1, keep=0):
        self.blocks, self.keep = blocks, keep
        streamed.append((len(blocks), keep))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


patcher.BlockStreamer = FakeStreamer
big = torch.nn.Module()
big.blocks = torch.nn.ModuleList(torch.nn.Linear(64, 64, bias=False) for _ in range(8))  # 8 units > capacity
big_owner = placement.manage(big, "blocks")
mm.unload_all_models()
# ComfyUI 0.3.64 grants any model at least 128 MiB, so --novram (a near-zero budget) makes the
# tiny model "too big" on both versions.
mm.vram_state = mm.VRAMState.NO_VRAM
with placement.on_device(big, GPU) as how:
    out["big_model"] = how
with placement.on_device(big, GPU):
    pass
out["streaming_set_up_once"] = len(streamed) == 1
out["streamed_blocks"] = streamed[-1][0] if streamed else None
mm.unload_all_models()
with placement.on_device(a, GPU) as how:  # a model without blocks loads whole even so
    out["novram_small"] = how
mm.vram_state = mm.VRAMState.NORMAL_VRAM

# A model the graph dropped leaves ComfyUI's list with it.
mm.unload_all_models()
with placement.on_device(a, GPU):
    pass
del a, owners
gc.collect()
mm.cleanup_models_gc()
mm.cleanup_models()
out["dropped_model_forgotten"] = ours_listed() == 0
print(json.dumps(out))
