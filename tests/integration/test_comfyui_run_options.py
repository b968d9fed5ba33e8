"""A handle's speed options in a real ComfyUI: the core MODEL made from a handle with Speed
Options asks for its attention backend in every call; a MODEL made from the plain handle, and
the ModelPatcher both were cloned from, keep the defaults. The options travel in the MODEL's
transformer_options, not through a process-wide switch. Skipped without COMFYUI_DIR.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from comfyui_harness import comfyui_paths
from conftest import ROOT


def test_speed_options_reach_only_their_models_calls():
    comfy, python = comfyui_paths()
    probe = Path(__file__).with_name("run_options_probe.py")
    run = subprocess.run([str(python), str(probe), str(comfy), str(ROOT)], capture_output=True, text=True,
                         timeout=600, cwd=str(comfy))
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == {"fast": ["cudnn"], "plain": ["sdpa"], "owner": ["sdpa"]}
