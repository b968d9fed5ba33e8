"""A handle's speed options in a real ComfyUI: the core MODEL made from a handle with Speed
Options asks for its attention backend in every call; a MODEL made from the plain handle, and
the ModelPatcher both were cloned from, keep the defaults. The options travel in the MODEL's
transformer_options, not through a process-wide switch. Skipped without COMFYUI_DIR.
"""
from __future__ import annotations

from comfyui_harness import run_probe


def test_speed_options_reach_only_their_models_calls():
    seen = run_probe("run_options_probe.py")
    assert seen == {"fast": ["cudnn"], "plain": ["sdpa"], "owner": ["sdpa"]}
