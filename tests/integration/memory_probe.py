"""Run by test_comfyui_memory.py in ComfyUI's own Python: our resident models against ComfyUI's
real model management (comfy.model_management), on a simulated GPU.

argv: <ComfyUI checkout> <this pack's checkout>. Prints one JSON line of observations.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import sys

comfy_dir, pack_dir = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, comfy_dir)

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_management as mm  # noqa: E402
import torch  # noqa: E402

spec = importlib.util.spec_from_file_location("qwenimage_pack", f"{pack_dir}/__init__.py",
                                              submodule_search_locations=[pack_dir])
sys.modules["qwenimage_pack"] = importlib.util.module_from_spec(spec)
from qwenimage_pack.model_defs.offload import module_bytes  # noqa: E402
from qwenimage_pack.nodes import placement, runtime  # noqa: E402

GPU = torch.device("cuda", 0)
CAPACITY = 3 * 4 * 64 * 64  # room for three of the Linear(64, 64) models below
where: dict[int, torch.device] = {}
sizes: dict[int, int] = {}


def move(module, device):
    where[id(module)] = torch.device(device)
    sizes[id(module)] = module_bytes(module)


def free(device, torch_free_too=False):
    left = CAPACITY - sum(sizes[k] for k, d in where.items() if d == device)
    return (left, left) if torch_free_too else left


placement._HEADROOM = 0
placement._move = move
placement._module_device = lambda m: where.get(id(m), torch.device("cpu"))
runtime.free_device_memory = free
mm.get_free_memory = free
mm.DISABLE_SMART_MEMORY = False

out = {"in_comfyui": runtime.IN_COMFYUI}
a, b, c = (torch.nn.Linear(64, 64, bias=False) for _ in range(3))
for m in (a, b):
    with placement.on_device(m, GPU):
        pass
out["listed"] = len(mm.current_loaded_models)
out["currently_used"] = len(mm.loaded_models(only_currently_used=True))

# ComfyUI needs two models' worth while ``a`` is working: only ``b`` may go.
with placement.on_device(a, GPU):
    unloaded = mm.free_memory(3 * sizes[id(a)], GPU)
    out["freed_while_a_busy"] = len(unloaded)
    out["a_kept"] = where[id(a)] == GPU
    out["b_evicted"] = where[id(b)] != GPU
out["listed_after_free"] = len(mm.current_loaded_models)

# The "Unload models" button (free everything on the device).
with placement.on_device(c, GPU):
    pass
mm.free_memory(1e30, GPU)
out["all_unloaded"] = all(d != GPU for d in where.values()) and not mm.current_loaded_models

# A model the graph dropped leaves ComfyUI's list with it.
with placement.on_device(a, GPU):
    pass
del a
gc.collect()
mm.cleanup_models_gc()
mm.cleanup_models()
out["dropped_model_forgotten"] = not mm.current_loaded_models and not placement._RESIDENT
# ComfyUI's VRAM flags, read from its own settings.
policies = [runtime.host_memory_policy()]
mm.DISABLE_SMART_MEMORY = True  # --disable-smart-memory
policies.append(runtime.host_memory_policy())
mm.vram_state = mm.VRAMState.NO_VRAM  # --novram
policies.append(runtime.host_memory_policy())
out["policies"] = policies
print(json.dumps(out))
