"""Our models inside ComfyUI's real model management on a simulated GPU: they are genuine
ModelPatchers loaded by load_models_gpu; ComfyUI's per-node clean-ups and pin budget run over
them; ComfyUI evicts them for room, for a core model and on "Unload models"; a model that does
not fit streams its blocks; one the graph dropped is forgotten. Runs in ComfyUI's own Python;
skipped without COMFYUI_DIR."""
from __future__ import annotations

from comfyui_harness import run_probe


def test_comfyui_model_management_evicts_our_idle_models():
    seen = run_probe("memory_probe.py")
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
