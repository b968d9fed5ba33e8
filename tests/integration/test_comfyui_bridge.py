"""'Qwen-Image as ComfyUI MODEL' in a real ComfyUI: core samplers run our model with our math.

Core euler (SamplerCustomAdvanced's path) with our sigmas and noise gives our sampler's latent
(cfg 1, with and without edit reference latents); KSampler with multistep samplers stays
finite; ModelSamplingAuraFlow's object patch, a double_block patch (core DiffSynth ControlNet's
hook) and a core weight patch (core LoRA loaders) are honoured, the weight patch equal to the
same change made by hand and undone on unload; patches on scaled-fp8 weights and a core MODEL
in our sampler are refused by name; a core MODEL_PATCH DiffSynth patch becomes our ControlNet. Runs in ComfyUI's own Python; skipped without COMFYUI_DIR.
"""
from __future__ import annotations

from comfyui_harness import run_probe


def test_core_samplers_run_our_model_exactly():
    seen = run_probe("bridge_probe.py")
    assert seen == {
        "is_model_patcher": True,
        "model_class": "QwenImage",
        "custom_vs_ours": True,
        "ksampler_dpmpp_2m_finite": True,
        "ksampler_res_multistep_finite": True,
        "auraflow_differs": True,
        "reference_latents_vs_ours": True,
        "reference_latents_4d_vs_ours": True,
        "double_block_patch_blocks": [0, 1],
        "core_weight_patch_changes_image": True,
        "weights_restored_after_unload": True,
        "core_weight_patch_vs_by_hand": True,
        "fp8_patch_refused": True,
        "core_model_in_our_sampler": True,
        "model_patch_converted": True,
        "foreign_model_patch_refused": True,
    }
