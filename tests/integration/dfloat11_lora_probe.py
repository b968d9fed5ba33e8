"""Run by test_comfyui_dfloat11.py in ComfyUI's own Python: a DFloat11 model (the folder the test
wrote, path in probe_boot.args) given to ComfyUI as a MODEL, and a LoRA through ComfyUI's own
loader (comfy.sd.load_lora_for_models, what LoraLoaderModelOnly runs). Prints one JSON line.
"""
from __future__ import annotations

import json

import probe_boot  # noqa: F401  (ComfyUI on the path, its settings, the pack importable)
import comfy.lora  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402

from qwenimage_pack.core.loading.load import load_mmdit  # noqa: E402
from qwenimage_pack.nodes import comfy_model, placement  # noqa: E402
from qwenimage_pack.nodes.handles import DiffusionModel  # noqa: E402

folder = probe_boot.args[0]
module = load_mmdit(folder, compute_dtype=torch.float32)
owner = placement.manage(module, "transformer_blocks", model=comfy_model.comfy_model_for(module))
handle = DiffusionModel(module=module, name="Qwen-Image-DF11", variant="qwen-image", weight_format="dfloat11",
                        owners=(owner,))
model = comfy_model.as_comfy_model(handle)
out = {}
key = "diffusion_model.transformer_blocks.0.attn.to_q.weight"
out["compressed_keys_listed"] = key in comfy.lora.model_lora_keys_unet(model.model, {}).values()

dim = module.config.joint_attention_dim
cond = [[torch.randn(1, 5, dim, generator=torch.Generator().manual_seed(1)), {}]]
latent = torch.zeros(1, 16, 1, 4, 6)


def sample(m):
    noise = comfy.sample.prepare_noise(latent, 3)
    return comfy.sample.sample(m, noise, 1, 1.0, "euler", "simple", cond, cond, latent, disable_pbar=True, seed=3)


out["plain_sampling_runs"] = bool(torch.isfinite(sample(model)).all())  # the listed keys change nothing else

q = module.transformer_blocks[0].attn.to_q
lora = {"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, q.in_features) * 0.01,
        "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(q.out_features, 4) * 0.01}
patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
out["lora_key_reaches_the_patcher"] = key in patched.patches
try:
    sample(patched)
    out["lora_refused_by_name"] = "no error"
except ValueError as err:
    out["lora_refused_by_name"] = "DFloat11" in str(err) and "Load Qwen-Image LoRA" in str(err)
comfy.model_management.unload_all_models()
print(json.dumps(out))
