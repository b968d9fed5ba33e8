"""Run by test_comfyui_layered.py in ComfyUI's own Python: a tiny Qwen-Image-Layered MMDiT given to
ComfyUI's core samplers through 'Qwen-Image as ComfyUI MODEL', with ComfyUI's own
EmptyQwenImageLayeredLatentImage latent (fp32, CPU).

argv: <ComfyUI checkout> <this pack's checkout> (see probe_boot.py). Prints one JSON line of observations.
"""
from __future__ import annotations

import json

import probe_boot  # noqa: F401  (ComfyUI on the path, its settings, the pack importable)
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import torch  # noqa: E402

from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT  # noqa: E402
from qwenimage_pack.core.pipeline import latent_format as lf  # noqa: E402
from qwenimage_pack.core.pipeline import sampling as fm  # noqa: E402
from qwenimage_pack.core.pipeline import schedule  # noqa: E402
from qwenimage_pack.nodes import comfy_model, placement, sampling  # noqa: E402
from qwenimage_pack.nodes.handles import DiffusionModel  # noqa: E402

TEXT_DIM, LAYERS, H, W, SEED, STEPS = 48, 2, 6, 8, 7, 3


def tiny_handle(layered: bool) -> DiffusionModel:
    torch.manual_seed(0)
    cfg = MMDiTConfig(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                      axes_dims_rope=(8, 12, 12), use_additional_t_cond=layered, use_layer3d_rope=layered)
    module = QwenImageMMDiT(cfg).float().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.05)
    owner = placement.manage(module, "transformer_blocks", model=comfy_model.comfy_model_for(module))
    name = "tiny_layered" if layered else "tiny"
    return DiffusionModel(module=module, name=name, variant="qwen-image", weight_format="fp32", owners=(owner,))


def conditioning(seed: int, refs=None):
    ctx = torch.randn(1, 5, TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    extra = {} if refs is None else {"reference_latents": refs}
    return [[ctx, extra]]


def core_empty_layered() -> dict:
    """ComfyUI's EmptyQwenImageLayeredLatentImage; ComfyUI 0.3.64 predates it: ours, the same tensor."""
    try:
        from comfy_extras.nodes_qwen import EmptyQwenImageLayeredLatentImage
    except ImportError:
        from qwenimage_pack.nodes.latents import QwenImageEmptyLayeredLatent

        return QwenImageEmptyLayeredLatent().generate(W * 8, H * 8, LAYERS, 1)[0]
    result = EmptyQwenImageLayeredLatentImage.execute(W * 8, H * 8, LAYERS, 1)
    result = result[0] if isinstance(result, tuple) else result.result[0]
    return result


def core_custom(model, positive, latent):
    """Core SamplerCustomAdvanced's call with our sigmas (the Layered dynamic shift) and noise, euler, cfg 1."""
    sigmas = schedule.flow_sigmas(STEPS, "dynamic", 3.0, schedule.image_seq_len(H, W),
                                  mu=schedule.layered_mu(schedule.image_seq_len(H, W)))
    noise = fm.initial_noise(SEED, 1, H, W, frames=latent.shape[2])
    sampler = comfy.samplers.sampler_object("euler")
    return comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, positive, positive, latent,
                                      disable_pbar=True, seed=SEED)


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


out = {}
handle = tiny_handle(layered=True)
model = comfy_model.as_comfy_model(handle)

# 1. ComfyUI's own empty layered latent: [B, 16, layers+1, H/8, W/8].
latent = core_empty_layered()
out["core_latent_shape"] = list(latent["samples"].shape)

# 2. Core euler on it with a reference latent (the input image, frame -1) == our sampler.
ref = torch.randn(1, 16, 1, H, W, generator=torch.Generator().manual_seed(3))
pos = conditioning(1, refs=[ref])
core = core_custom(model, pos, latent["samples"])
ours = sampling.sample(handle, pos, latent, SEED, STEPS, 1.0, "dynamic", 3.0)["samples"]
out["core_vs_ours_shape"] = list(core.shape) == list(ours.shape)
out["core_vs_ours"] = max_diff(core, ours) < 1e-3

# 3. KSampler (ComfyUI's own noise and schedule) runs on it and stays finite.
noise = comfy.sample.prepare_noise(latent["samples"], SEED)
k = comfy.sample.sample(model, noise, STEPS, 2.5, "euler", "simple", conditioning(1, [ref]), conditioning(2, [ref]),
                        latent["samples"], disable_pbar=True, seed=SEED)
out["ksampler_finite"] = bool(torch.isfinite(k).all()) and list(k.shape) == list(latent["samples"].shape)

# 4. A reference latent from the 3-channel VAE (tagged by our VAE Encode) is refused by name.
plain_ref = lf.tag_layered(torch.randn(1, 16, H, W), False)
try:
    core_custom(model, conditioning(1, refs=[plain_ref]), latent["samples"])
    out["plain_vae_reference_refused"] = "no error"
except ValueError as err:
    out["plain_vae_reference_refused"] = "qwen_image_layered_vae.safetensors" in str(err)

# 5. A plain Qwen-Image MODEL given the layered latent is refused, naming the model file to load and
#    the latent to use instead (our sampler's message).
plain = comfy_model.as_comfy_model(tiny_handle(layered=False))
try:
    core_custom(plain, conditioning(1), latent["samples"])
    out["plain_model_refuses_layers"] = "no error"
except ValueError as err:
    out["plain_model_refuses_layers"] = all(part in str(err) for part in (
        "qwen_image_layered_bf16.safetensors", "one-frame latent", "is not a Qwen-Image-Layered model"))
print(json.dumps(out))
