"""Qwen-Image-Layered through 'Qwen-Image as ComfyUI MODEL' in a real ComfyUI.

ComfyUI's own EmptyQwenImageLayeredLatentImage latent ([B,16,layers+1,h,w]; ours on 0.3.64, which
predates it) runs through core
euler with a reference latent and gives our sampler's result (same sigmas and noise, cfg 1);
KSampler runs it; a reference latent our VAE Encode made with the 3-channel VAE and a plain
model given layers are refused by name. Runs in ComfyUI's own Python; skipped without COMFYUI_DIR.
"""
from __future__ import annotations

from comfyui_harness import run_probe


def test_core_samplers_run_the_layered_model():
    seen = run_probe("layered_probe.py")
    assert seen == {
        "core_latent_shape": [1, 16, 3, 6, 8],
        "core_vs_ours_shape": True,
        "core_vs_ours": True,
        "ksampler_finite": True,
        "plain_vae_reference_refused": True,
        "plain_model_refuses_layers": True,
    }
