"""Our models inside ComfyUI's real model management on a simulated GPU: they are genuine
ModelPatchers loaded by load_models_gpu; ComfyUI's per-node clean-ups and pin budget run over
them; ComfyUI evicts them for room, for a core model and on "Unload models"; a model that does
not fit streams its blocks; one the graph dropped is forgotten. Runs in ComfyUI's own Python;
skipped without COMFYUI_DIR."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from comfyui_harness import comfyui_paths
from conftest import ROOT


def test_comfyui_model_management_evicts_our_idle_models():
    comfy, python = comfyui_paths()
    probe = Path(__file__).with_name("memory_probe.py")
    run = subprocess.run([str(python), str(probe), str(comfy), str(ROOT)], capture_output=True, text=True,
                         timeout=300, cwd=str(comfy))
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == {
        "in_comfyui": True,
        "genuine_patchers": True,
        "listed": 2,
        "loaded_sizes": [4 * 64 * 64, 4 * 64 * 64],
        "evicted_for_room": 1,
        "one_left_on_gpu": True,
        "core_loaded": True,
        "ours_out_for_core": True,
        "ours_in_core_out": True,
        "all_unloaded": True,
        "unload_model_and_clones": True,
        "big_model": "streamed",
        "streaming_set_up_once": True,
        "streamed_blocks": 8,
        "novram_small": "resident",
        "dropped_model_forgotten": True,
    }
