"""The Qwen-Image-2512 Fun ControlNet against ComfyUI's own (``load_controlnet_qwen_fun``, ComfyUI
0.30 and later), from one tiny file in the released layout: ComfyUI's loader holds exactly the
file's tensors; the per-block residuals of ComfyUI's control model on ComfyUI's own Qwen-Image
equal ours (even and odd latents) and feed the same main blocks; a whole core sampling run
(ControlNetApplyAdvanced strength s, euler, CFG with positive and negative batched) equals our
sampler with our Apply's chains at strength sqrt(s), and equals the same core run on our MODEL
('Qwen-Image as ComfyUI MODEL', ComfyUI's Fun ControlNet computed by ours). Runs in ComfyUI's own
Python; skipped without COMFYUI_DIR, and on a ComfyUI without the Fun ControlNet (0.3.64).
"""
from __future__ import annotations

import pytest

from comfyui_harness import run_probe

TOLERANCE = 1e-3  # fp32 on the CPU; measured ~5e-7 (residuals), ~2e-6 (sampling), ~3e-6 (our MODEL)


def test_fun_controlnet_matches_comfyui():
    seen = run_probe("fun_controlnet_probe.py")
    if "skip" in seen:
        pytest.skip(seen["skip"])
    diffs = {k: seen.pop(k) for k in [k for k in seen if "max_diff" in k]}
    magnitudes = {k: seen.pop(k) for k in [k for k in seen if "max_abs" in k]}
    print(diffs, magnitudes)
    assert seen == {
        "comfy_main_loaded": True,
        "comfy_class": "QwenFunControlNet",
        "comfy_holds_the_file": True,
        "ours_kind": "fun",
        "residual_blocks_8x12": True,
        "residual_blocks_7x11": True,
        "control_changes_the_result": True,
        "positive_residuals_for_both_would_differ": True,
        "comfy_module_restored": True,
        "comfy_model_unaffected_after": True,
    }
    assert set(diffs) == {"residual_max_diff_8x12", "residual_max_diff_7x11", "sampling_max_diff", "bridge_max_diff"}
    assert all(d <= TOLERANCE for d in diffs.values()), diffs
    assert all(m > 0.5 for m in magnitudes.values()), magnitudes  # the numbers compared are not all near zero
