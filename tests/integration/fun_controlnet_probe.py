"""Run by test_comfyui_fun_controlnet.py in ComfyUI's own Python: the Qwen-Image-2512 Fun ControlNet,
ours against ComfyUI's (``load_controlnet_qwen_fun``), from one tiny file in the released layout
(5 control blocks, fp32, CPU).

The main model is a tiny 60-block Qwen-Image MMDiT (ComfyUI hard-codes 5 control blocks feeding
blocks 0, 12, 24, 36, 48 of 60): ours, and ComfyUI's own ``QwenImageTransformer2DModel`` inside its
own ``comfy.model_base.QwenImage`` holding the same weights.

1. The file through ComfyUI's ControlNet loader: its class, and its module holds exactly the file's
   tensors (our parameter names are the file's keys, so are ComfyUI's).
2. Per-block residuals: ComfyUI's control model (``base_model`` = its Qwen-Image) vs ours, on an even
   and an odd latent, and which main blocks they feed.
3. A whole sampling run: ComfyUI's core path (ControlNetApplyAdvanced with strength s, SamplerCustom
   euler with CFG; its positive and negative run as one batch, each row's control with its own
   text) vs our sampler with our Apply's chains at strength sqrt(s) (ComfyUI applies sqrt(strength)
   to this model; our strength is the authors' linear scale). Our sampler's CFG is switched to
   ComfyUI's plain combination for this run (ours rescales per token, as diffusers' pipelines do).
4. The core run of 3 on our MODEL ('Qwen-Image as ComfyUI MODEL' with ComfyUI's Fun ControlNet)
   equals ComfyUI's own model's.

argv: <ComfyUI checkout> <this pack's checkout> (see probe_boot.py). Prints one JSON line of
observations, or {"skip": reason} when this ComfyUI has no Fun ControlNet.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import probe_boot  # noqa: F401  (ComfyUI on the path, its settings, the pack importable)
import comfy.controlnet  # noqa: E402
import torch  # noqa: E402

if not hasattr(comfy.controlnet, "load_controlnet_qwen_fun"):
    import comfyui_version  # noqa: E402

    print(json.dumps({"skip": f"ComfyUI {comfyui_version.__version__} has no Qwen-Image Fun ControlNet "
                              "(comfy.controlnet.load_controlnet_qwen_fun arrived after it)"}))
    sys.exit(0)

import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models  # noqa: E402
import nodes as comfy_nodes  # noqa: E402  (ComfyUI's nodes.py: the cwd is its checkout)
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, str(Path(probe_boot.pack_dir) / "tests"))
import references  # noqa: E402

from qwenimage_pack.core.loading.controlnet import load_controlnet  # noqa: E402
from qwenimage_pack.core.models.controlnet import AppliedControl  # noqa: E402
from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT  # noqa: E402
from qwenimage_pack.core.pipeline import latent_format as lf  # noqa: E402
from qwenimage_pack.core.pipeline import sampling as fm  # noqa: E402
from qwenimage_pack.core.pipeline import schedule  # noqa: E402
from qwenimage_pack.nodes import comfy_model, placement, sampling  # noqa: E402
from qwenimage_pack.nodes.controlnet import ControlChain  # noqa: E402
from qwenimage_pack.nodes.handles import DiffusionModel  # noqa: E402

TEXT_DIM, SEED, STEPS, CFG, COMFY_STRENGTH = 48, 7, 3, 2.5, 0.64
MAIN = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=TEXT_DIM, axes_dims_rope=(8, 12, 12))
torch.set_grad_enabled(False)


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


out = {}

# The main model, ours and ComfyUI's own, same weights.
torch.manual_seed(0)
ours_main = QwenImageMMDiT(MMDiTConfig(**MAIN)).float().eval()
for p in ours_main.parameters():
    p.normal_(0, 0.03)  # every layer active (zero-initialised gates would hide mistakes)
config = comfy.supported_models.QwenImage(dict(image_model="qwen_image", **MAIN))
config.set_inference_dtype(torch.float32, None)
comfy_base = config.get_model({})  # comfy.model_base.QwenImage with ComfyUI's QwenImageTransformer2DModel
load = comfy_base.diffusion_model.load_state_dict(ours_main.state_dict(), strict=False)
out["comfy_main_loaded"] = not load.missing_keys and not load.unexpected_keys

# 1. One file, two loaders.
work = Path(tempfile.mkdtemp(prefix="qwen_fun_probe_"))
path = work / "Qwen-Image-2512-Fun-Controlnet-Union-2602.safetensors"
state = references.fun_controlnet_state(torch.Generator().manual_seed(1), blocks=5, dim=64, head_dim=32)
save_file(state, str(path))
theirs = comfy.controlnet.load_controlnet(str(path))
out["comfy_class"] = type(theirs).__name__
theirs_sd = theirs.control_model.state_dict()
out["comfy_holds_the_file"] = sorted(theirs_sd) == sorted(state) and all(torch.equal(theirs_sd[k].float(), state[k])
                                                                        for k in state)
ours = load_controlnet(path, compute_dtype=torch.float32)
out["ours_kind"] = ours.kind
layers = ours.injection_layers(MAIN["num_layers"])

# 2. Per-block residuals (the control latent already normalized, as both models take it). Token grids
#    of even size: on odd grids ComfyUI centres RoPE positions the other way round from diffusers,
#    whom our MMDiT follows (core/layers/rope.py). 7x11 is an odd latent (padded to a 4x6 grid).
for h, w in ((8, 12), (7, 11)):
    x, ctx, hint = randn(1, 16, h, w, seed=2), randn(1, 5, TEXT_DIM, seed=3), randn(1, 16, h, w, seed=4)
    sigma = torch.tensor([0.7])
    ref = theirs.control_model(x=x[:, :, None], timesteps=sigma, context=ctx, hint=hint[:, :, None],
                               base_model=comfy_base.diffusion_model)["input"]
    mine = ours(ours_main, x, sigma, ctx, hint)
    out[f"residual_blocks_{h}x{w}"] = [i for i, r in enumerate(ref) if r is not None] == layers
    out[f"residual_max_diff_{h}x{w}"] = max(max_diff(m, ref[i]) for m, i in zip(mine, layers))
    out[f"residual_max_abs_{h}x{w}"] = max(float(r.abs().max()) for r in mine)


# 3. A whole sampling run through ComfyUI's core path vs our sampler.
H, W = 8, 12
z_raw = randn(1, 16, H, W, seed=5) * 0.5  # what the VAE gives for the control image (raw latent space)


comfy_patcher = comfy.model_patcher.ModelPatcher(comfy_base, load_device=torch.device("cpu"),
                                                 offload_device=torch.device("cpu"))
owner = placement.manage(ours_main, "transformer_blocks", model=comfy_model.comfy_model_for(ours_main))
handle = DiffusionModel(module=ours_main, name="tiny", variant="qwen-image", weight_format="fp32", owners=(owner,))


class LatentVAE:
    """Stands in for the VAE: the control image's latent is given, so both sides start from it."""

    def spacial_compression_encode(self):
        return 8

    def encode(self, pixels):
        return z_raw[:, :, None].clone()


def comfy_run(strength: float, model=None):
    pos, neg = [[randn(1, 5, TEXT_DIM, seed=6), {}]], [[randn(1, 5, TEXT_DIM, seed=7), {}]]
    image = torch.rand(1, H * 8, W * 8, 3, generator=torch.Generator().manual_seed(8))
    applied = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, theirs, image, strength, 0.0, 1.0,
                                                                      vae=LatentVAE())
    pos, neg = applied if isinstance(applied, tuple) else applied.result
    sigmas = schedule.flow_sigmas(STEPS, "constant", 3.0, schedule.image_seq_len(H, W))
    noise = fm.initial_noise(SEED, 1, H, W)[:, :, None]
    sampler = comfy.samplers.sampler_object("euler")
    return comfy.sample.sample_custom(model or comfy_patcher, noise, CFG, sampler, sigmas, pos, neg, torch.zeros(1, 16, 1, H, W),
                                      disable_pbar=True, seed=SEED)[:, :, 0]


def our_run(strength: float | None, one_chain: bool = False):
    pos_extra, neg_extra = {}, {}
    if strength is not None:  # what our Apply ControlNet builds for a Fun ControlNet: one chain per side
        ctl = AppliedControl(ours, lambda hh, ww: lf.normalize(z_raw), strength)
        pos_extra, neg_extra = {"control": ControlChain((ctl,))}, {"control": ControlChain((ctl,))}
        if one_chain:  # (InstantX's way: the positive's residuals serve the negative pass too)
            neg_extra = pos_extra
    pos, neg = [[randn(1, 5, TEXT_DIM, seed=6), pos_extra]], [[randn(1, 5, TEXT_DIM, seed=7), neg_extra]]
    latent = {"samples": torch.zeros(1, 16, H, W)}
    rescaled = fm.true_cfg
    fm.true_cfg = lambda cond, uncond, scale: rescaled(cond, uncond, scale, rescale=False)  # ComfyUI's plain CFG
    try:
        return sampling.sample(handle, pos, latent, SEED, STEPS, CFG, "constant", 3.0, negative=neg)["samples"]
    finally:
        fm.true_cfg = rescaled


comfy_latent = comfy_run(COMFY_STRENGTH)
our_latent = our_run(math.sqrt(COMFY_STRENGTH))
out["sampling_max_diff"] = max_diff(comfy_latent, our_latent)
out["sampling_max_abs"] = float(comfy_latent.abs().max())
out["control_changes_the_result"] = max_diff(our_latent, our_run(None)) > 1e-2
out["positive_residuals_for_both_would_differ"] = max_diff(comfy_latent, our_run(math.sqrt(COMFY_STRENGTH), True)) > 1e-2

# 4. The same core run on our MODEL ('Qwen-Image as ComfyUI MODEL'): ComfyUI's Fun ControlNet object,
#    its residuals computed by ours on our MMDiT; and ComfyUI's module is itself again afterwards.
bridge_latent = comfy_run(COMFY_STRENGTH, model=comfy_model.as_comfy_model(handle))
out["bridge_max_diff"] = max_diff(comfy_latent, bridge_latent)
out["comfy_module_restored"] = "forward" not in vars(theirs.control_model)
out["comfy_model_unaffected_after"] = max_diff(comfy_run(COMFY_STRENGTH), comfy_latent) == 0.0
print(json.dumps(out))
