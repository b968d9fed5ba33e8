"""'Qwen-Image as ComfyUI MODEL' in a real ComfyUI: core samplers run our model with our math.

Core euler (SamplerCustomAdvanced's path) with our sigmas and noise gives our sampler's latent
(cfg 1, with and without edit reference latents); KSampler with multistep samplers stays
finite; ModelSamplingAuraFlow's object patch, a double_block patch (core DiffSynth ControlNet's
hook) and a core weight patch (core LoRA loaders) are honoured, the weight patch equal to the
same change made by hand and undone on unload; patches on scaled-fp8 weights and a core MODEL
in our sampler are refused by name; a core MODEL_PATCH DiffSynth patch becomes our ControlNet. The
conditioning's reference method gives ComfyUI's own model's output for every method (q / k norms
raised so positions matter), and our sampler keeps it too; patch types the bridge does not run
are named once each (core FluxKVCache's graph still runs, at its reference method); a double_block patch reads and changes the text stream as in ComfyUI; a
LATENT's batch_index picks ComfyUI's noise; a union control LoRA wants its control image on the
core path too. Runs in ComfyUI's own Python; skipped without COMFYUI_DIR.
"""
from __future__ import annotations

from comfyui_harness import run_probe


def test_core_samplers_run_our_model_exactly():
    seen = run_probe("bridge_probe.py")
    # ComfyUI 0.3.64 has only the index and offset methods and no FluxKVCache: compared on those.
    full = seen.pop("comfyui_has_all_ref_methods")
    methods = ("None", "index", "index_timestep_zero", "negative_index", "offset", "uxo/uno") if full else \
        ("None", "index", "offset", "uxo/uno")
    kv_cache = {"skipped_patches_warned_once": True, "kv_cache_model_is_index_timestep_zero": True,
                "kv_cache_object_patch_undone": True} if full else {}
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
        "ref_method_vs_comfyui": {m: True for m in methods},
        "ref_methods_differ": True,
        "ref_method_sampler_vs_core": True,
        **kv_cache,
        "double_block_patch_txt": True,
        "batch_index_noise_vs_core": True,
        "union_lora_needs_control_image": True,
        "union_lora_with_control_image_runs": True,
    }
