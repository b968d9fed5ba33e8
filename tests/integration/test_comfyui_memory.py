"""Our models inside ComfyUI's real model management (its free_memory / cleanup code) on a
simulated GPU: ComfyUI can evict ours when it needs VRAM, never one in use, and forgets one the
graph dropped, and its VRAM flags reach our placement. Runs in ComfyUI's own Python; skipped
without COMFYUI_DIR."""
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
        "listed": 2,
        "currently_used": 0,
        "freed_while_a_busy": 1,
        "a_kept": True,
        "b_evicted": True,
        "listed_after_free": 1,
        "all_unloaded": True,
        "dropped_model_forgotten": True,
        "policies": ["normal", "release", "stream"],
    }
