"""Run by test_comfyui_run_options.py in ComfyUI's own Python: a handle's speed options reach
only its own MODEL's calls when core samplers run it (tiny random MMDiT, fp32, CPU).

argv: <ComfyUI checkout> <this pack's checkout> (see probe_boot.py). Prints one JSON line of observations: the
attention backends each MODEL's calls asked for (on a CPU every backend computes as SDPA).
"""
from __future__ import annotations

import json

import probe_boot  # noqa: F401  (ComfyUI on the path, its settings, the pack importable)
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import torch  # noqa: E402

from qwenimage_pack.core.layers import attention  # noqa: E402

from qwenimage_pack.core.models import mmdit
from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT  # noqa: E402
from qwenimage_pack.nodes import comfy_model, options, placement  # noqa: E402
from qwenimage_pack.nodes.handles import DiffusionModel  # noqa: E402

H = W = 6
asked: list[str] = []
real = attention.attention


def record(q, k, v, mask=None, backend="sdpa"):
    asked.append(backend)
    return real(q, k, v, mask, backend)


mmdit.attention = record  # what the MMDiT's blocks call


def tiny_handle() -> DiffusionModel:
    torch.manual_seed(0)
    cfg = MMDiTConfig(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48,
                      axes_dims_rope=(8, 12, 12))
    module = QwenImageMMDiT(cfg).float().eval()
    owner = placement.manage(module, "transformer_blocks", model=comfy_model.comfy_model_for(module))
    return DiffusionModel(module=module, name="tiny", variant="qwen-image", weight_format="fp32", owners=(owner,))


def run(model) -> set[str]:
    asked.clear()
    positive = [[torch.randn(1, 5, 48, generator=torch.Generator().manual_seed(1)), {}]]
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    latent = torch.zeros(1, 16, 1, H, W)
    comfy.sample.sample_custom(model, torch.randn_like(latent), 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                               positive, positive, latent, disable_pbar=True, seed=1)
    return sorted(set(asked))


base = tiny_handle()
fast = options.with_speed_options(base, "cudnn", "off")  # cuDNN loads on any torch with SDPA
out = {
    "fast": run(comfy_model.as_comfy_model(fast)),
    "plain": run(comfy_model.as_comfy_model(base)),
    "owner": run(base.owners[0]),  # the patcher the clones came from: no options of its own
}
print(json.dumps(out))
