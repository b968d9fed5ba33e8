"""Run by test_comfyui_bridge.py in ComfyUI's own Python: our model given to ComfyUI's core
samplers through 'Qwen-Image as ComfyUI MODEL' (a tiny random MMDiT, fp32, CPU).

argv: <ComfyUI checkout> <this pack's checkout> (see probe_boot.py). Prints one JSON line of observations.
"""
from __future__ import annotations

import inspect
import json

import probe_boot  # noqa: F401  (ComfyUI on the path, its settings, the pack importable)
import comfy.model_management  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import torch  # noqa: E402

from qwenimage_pack.core.pipeline import sampling as fm  # noqa: E402
from qwenimage_pack.core.pipeline import schedule  # noqa: E402
from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT  # noqa: E402
from qwenimage_pack.nodes import comfy_model, placement, sampling  # noqa: E402
from qwenimage_pack.nodes.handles import DiffusionModel  # noqa: E402

TEXT_DIM, H, W, SEED, STEPS = 48, 6, 8, 7, 4


def tiny_handle(zero_cond_t: bool = False) -> DiffusionModel:
    torch.manual_seed(0)
    cfg = MMDiTConfig(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                      axes_dims_rope=(8, 12, 12), zero_cond_t=zero_cond_t)
    module = QwenImageMMDiT(cfg).float().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.05)  # every layer active (zero-initialised gates would hide mistakes)
    owner = placement.manage(module, "transformer_blocks", model=comfy_model.comfy_model_for(module))
    return DiffusionModel(module=module, name="tiny", variant="qwen-image", weight_format="fp32", owners=(owner,))


def conditioning(seed: int, refs=None):
    ctx = torch.randn(1, 5, TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    extra = {} if refs is None else {"reference_latents": refs}
    return [[ctx, extra]]


def ours(handle, positive, steps=STEPS, size=(H, W)):
    latent = {"samples": torch.zeros(1, 16, *size)}
    return sampling.sample(handle, positive, latent, SEED, steps, 1.0, "constant", 3.0)["samples"]


def core_custom(model, positive, steps=STEPS, size=(H, W)):
    """Core SamplerCustomAdvanced's call: the same sigmas and noise, euler, cfg 1."""
    sigmas = schedule.flow_sigmas(steps, "constant", 3.0, schedule.image_seq_len(*size))
    noise = fm.initial_noise(SEED, 1, *size)[:, :, None]
    latent = torch.zeros(1, 16, 1, *size)
    sampler = comfy.samplers.sampler_object("euler")
    out = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, positive, positive, latent,
                                     disable_pbar=True, seed=SEED)
    return out[:, :, 0]


def core_ksampler(model, sampler_name: str, cfg: float = 2.5):
    noise = comfy.sample.prepare_noise(torch.zeros(1, 16, 1, H, W), SEED)
    return comfy.sample.sample(model, noise, STEPS, cfg, sampler_name, "simple", conditioning(1), conditioning(2),
                               torch.zeros(1, 16, 1, H, W), disable_pbar=True, seed=SEED)


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


out = {}
handle = tiny_handle()
model = comfy_model.as_comfy_model(handle)
out["is_model_patcher"] = isinstance(model, comfy.model_patcher.ModelPatcher)
out["model_class"] = type(model.model).__mro__[1].__name__

# 1. Core euler with our sigmas and noise == our sampler.
pos = conditioning(1)
out["custom_vs_ours"] = max_diff(core_custom(model, pos), ours(handle, pos)) < 1e-3

# 2. KSampler with multistep samplers runs and stays finite.
for name in ("dpmpp_2m", "res_multistep"):
    out[f"ksampler_{name}_finite"] = bool(torch.isfinite(core_ksampler(model, name)).all())

# 3. ModelSamplingAuraFlow (an object patch on model_sampling) is honoured.
import comfy_extras.nodes_model_advanced as advanced  # noqa: E402

patched = advanced.ModelSamplingAuraFlow().patch_aura(model, 3.1)
patched = patched[0] if isinstance(patched, tuple) else patched.result[0]  # 0.30's nodes return NodeOutput
out["auraflow_differs"] = max_diff(core_ksampler(patched, "euler"), core_ksampler(model, "euler")) > 1e-6

# 4. Edit conditioning: core reference latents == ours.
ref = torch.randn(1, 16, 1, H, W, generator=torch.Generator().manual_seed(3))
pos_ref = conditioning(1, refs=[ref])
out["reference_latents_vs_ours"] = max_diff(core_custom(model, pos_ref), ours(handle, pos_ref)) < 1e-3
pos_ref4 = conditioning(1, refs=[ref[:, :, 0]])  # our VAE Encode's LATENT has no frame axis
out["reference_latents_4d_vs_ours"] = max_diff(core_custom(model, pos_ref4), ours(handle, pos_ref4)) < 1e-3

# 5. A double_block patch (what core QwenImageDiffsynthControlnet installs) runs after each block.
seen_blocks = []


def patch(args):
    seen_blocks.append(args["block_index"])
    args["img"] = args["img"] * 1.0
    return args


controlled = model.clone()
controlled.set_model_double_block_patch(patch)
core_custom(controlled, pos, steps=1)
out["double_block_patch_blocks"] = seen_blocks

# 6. A core LoRA-style weight patch on a dense weight == the same change made by hand, and the
#    file's weight is back once ComfyUI unloads the model.
key = "diffusion_model.proj_out.weight"
layer = handle.module.proj_out
orig = layer.weight.detach().clone()
delta = torch.randn(64, 64, generator=torch.Generator().manual_seed(4))
plain = core_custom(model, pos)
lora_model = model.clone()
lora_model.add_patches({key: (delta,)}, 1.0)
with_core_patch = core_custom(lora_model, pos)
out["core_weight_patch_changes_image"] = max_diff(with_core_patch, plain) > 1e-3
comfy.model_management.unload_all_models()
out["weights_restored_after_unload"] = torch.equal(layer.weight, orig)
with torch.no_grad():
    layer.weight += delta
by_hand = ours(handle, pos)
with torch.no_grad():
    layer.weight.copy_(orig)
out["core_weight_patch_vs_by_hand"] = max_diff(with_core_patch, by_hand) < 1e-3

# 7. The same patch on a scaled-fp8 layer is refused with a message naming the way that works.
layer.weight_scale = torch.tensor(1.0)
try:
    core_custom(lora_model, pos, steps=1)
    out["fp8_patch_refused"] = "no error"
except ValueError as err:
    out["fp8_patch_refused"] = "Load Qwen-Image LoRA" in str(err)
layer.weight_scale = None

# 8. Our sampler refuses a core MODEL with a message naming what it got.
try:
    ours(model, pos)
    out["core_model_in_our_sampler"] = "no error"
except ValueError as err:
    out["core_model_in_our_sampler"] = "ComfyUI MODEL" in str(err)
# 9. A DiffSynth patch from core 'Load Model Patch' (MODEL_PATCH) becomes our ControlNet, weights intact.
from comfy_extras.nodes_model_patch import QwenImageBlockWiseControlNet  # noqa: E402
from qwenimage_pack.nodes import controlnet as control_nodes  # noqa: E402

torch.manual_seed(5)
core_patch_module = QwenImageBlockWiseControlNet(num_layers=2, dim=64, operations=comfy.ops.manual_cast)
with torch.no_grad():
    for p in core_patch_module.parameters():  # ComfyUI's layers skip initialisation: fill them
        p.normal_()
core_patch = comfy.model_patcher.ModelPatcher(core_patch_module, load_device=torch.device("cpu"),
                                              offload_device=torch.device("cpu"))
converted = control_nodes.from_model_patch(core_patch)
theirs = core_patch_module.state_dict()
mine = converted.module.state_dict()
out["model_patch_converted"] = (converted.kind == "diffsynth" and sorted(mine) == sorted(theirs)
                                and all(torch.equal(mine[k], theirs[k]) for k in theirs))
try:
    control_nodes.from_model_patch(comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"),
                                                                    torch.device("cpu")))
    out["foreign_model_patch_refused"] = "no error"
except ValueError as err:
    out["foreign_model_patch_refused"] = "not a Qwen-Image DiffSynth ControlNet patch" in str(err)

# 10. The conditioning's reference method ("Edit Model Reference Method") reaches our MMDiT: a single
#     model call through the bridge == ComfyUI's own Qwen model holding the same weights, per method.
#     The q / k norms are raised so the output depends on the RoPE positions (at std 0.05 it barely
#     does); even token grids, where ComfyUI and diffusers centre alike.
import logging  # noqa: E402

from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel  # noqa: E402
from comfy_extras.nodes_flux import FluxKontextMultiReferenceLatentMethod  # noqa: E402


def sharp_handle() -> DiffusionModel:
    handle = tiny_handle()
    with torch.no_grad():
        for name, p in handle.module.named_parameters():
            if ".norm_" in name:
                p.fill_(4.0)
    return handle


# ComfyUI 0.30 knows five reference methods (and a model default); 0.3.64 only index and offset
# (any other name: offset), and has no FluxKVCache. Older ComfyUI is compared on what it has.
REF_METHODS_030 = "default_ref_method" in inspect.signature(QwenImageTransformer2DModel.__init__).parameters
out["comfyui_has_all_ref_methods"] = REF_METHODS_030


def native_model(module):
    extra = {"default_ref_method": "index"} if REF_METHODS_030 else {}
    native = QwenImageTransformer2DModel(num_layers=2, attention_head_dim=32, num_attention_heads=2,
                                         joint_attention_dim=TEXT_DIM, axes_dims_rope=(8, 12, 12),
                                         operations=comfy.ops.disable_weight_init, dtype=torch.float32, **extra)
    native.load_state_dict(module.state_dict(), strict=False)
    return native.eval()


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def with_method(cond, method):
    if method is None:
        return cond
    result = FluxKontextMultiReferenceLatentMethod.execute(cond, method)
    return result[0] if isinstance(result, tuple) else result.result[0]


sharp = sharp_handle()
sharp_model = comfy_model.as_comfy_model(sharp)
native = native_model(sharp.module)
base = sharp_model.model
g = torch.Generator().manual_seed(11)
x = torch.randn(1, 16, 1, 8, 12, generator=g)
sig = torch.tensor([0.6])
two_refs = [torch.randn(1, 16, 1, 8, 8, generator=g), torch.randn(1, 16, 1, 4, 12, generator=g)]
METHODS = ((None, "index", "index_timestep_zero", "negative_index", "offset", "uxo/uno") if REF_METHODS_030
           else (None, "index", "offset", "uxo/uno"))
denoised = {}
method_ok = {}
for method in METHODS:
    cond = with_method(conditioning(1, refs=two_refs), method)
    extra = {k: v.cond for k, v in base.extra_conds(**{"cross_attn": cond[0][0], **cond[0][1]}).items()}
    with torch.no_grad():
        ours_out = base.apply_model(x, sig, **extra)
        kwargs = {} if "ref_latents_method" not in extra else {"ref_latents_method": extra["ref_latents_method"]}
        v = native(base.model_sampling.calculate_input(sig, x), base.model_sampling.timestep(sig).float(),
                   extra["c_crossattn"], ref_latents=extra["ref_latents"], **kwargs)
        theirs = base.model_sampling.calculate_denoised(sig, v, x)
    denoised[method] = theirs
    method_ok[str(method)] = rel(ours_out, theirs) < 1e-6
out["ref_method_vs_comfyui"] = method_ok
# the discriminator: each method's answer is far from the others' (the check above can tell them
# apart: the denoised latent mixes in x, so the gaps are smaller than the velocities')
out["ref_methods_differ"] = min(rel(denoised[a], denoised[b]) for a in METHODS[1:] for b in METHODS[1:]
                                if a != b and {a, b} != {"offset", "uxo/uno"}) > 1e-4
# our sampler and a core sampler agree on a conditioning carrying a method (the sampler keeps it)
pos_method = with_method(conditioning(1, refs=two_refs), "index_timestep_zero")
out["ref_method_sampler_vs_core"] = rel(core_custom(sharp_model, pos_method, size=(8, 12)),
                                        ours(sharp, pos_method, size=(8, 12))) < 1e-5

# 11. The bridge names patch types it does not run, once per type, and still samples: core FluxKVCache
#     (post_input / attn1_patch, a speed-up) runs without its cache, its object patch of the model's
#     default_ref_method honoured (index_timestep_zero, as ComfyUI's model has it then). A
#     double_block patch gets the text stream and its change is used, as in ComfyUI's own model.
records = []
capture = logging.Handler()
capture.emit = lambda record: records.append(record.getMessage())
logging.getLogger("qwenimage").addHandler(capture)
if REF_METHODS_030:
    from comfy_extras.nodes_flux import FluxKVCache  # noqa: E402

    kv = FluxKVCache.execute(sharp_model)
    kv = kv[0] if isinstance(kv, tuple) else kv.result[0]
    pos_refs = conditioning(1, refs=two_refs)
    with_kv = core_custom(kv, pos_refs, size=(8, 12))
    core_custom(kv, pos_refs, steps=1, size=(8, 12))
    named = sorted(n for n in ("post_input", "attn1_patch") for r in records if f"'{n}'" in r)
    out["skipped_patches_warned_once"] = named == ["attn1_patch", "post_input"]
    out["kv_cache_model_is_index_timestep_zero"] = rel(with_kv, ours(sharp, pos_method, size=(8, 12))) < 1e-5
    comfy.model_management.unload_all_models()  # ComfyUI takes its object patch back with the model
    out["kv_cache_object_patch_undone"] = not hasattr(sharp.module, "default_ref_method")
logging.getLogger("qwenimage").removeHandler(capture)

txt_seen = []


def txt_patch(args):
    txt_seen.append(args["txt"] is not None and args["txt"].shape[1] == 5)
    # a per-channel scale: the next block's layer norm would undo a plain one
    txt = args["txt"]
    return {**args, "txt": txt * torch.linspace(0, 2, txt.shape[-1])} if args["block_index"] == 0 else args


cond = conditioning(1, refs=[two_refs[0]])
extra = {k: v.cond for k, v in base.extra_conds(**{"cross_attn": cond[0][0], **cond[0][1]}).items()}
opts = {"patches": {"double_block": [txt_patch]}}
with torch.no_grad():
    ours_txt = base.apply_model(x, sig, transformer_options=dict(opts), **extra)
    v = native(base.model_sampling.calculate_input(sig, x), base.model_sampling.timestep(sig).float(),
               extra["c_crossattn"], ref_latents=extra["ref_latents"], transformer_options=dict(opts))
    theirs_txt = base.model_sampling.calculate_denoised(sig, v, x)
    plain_out = base.apply_model(x, sig, **extra)
out["double_block_patch_txt"] = (all(txt_seen) and len(txt_seen) == 4 and rel(ours_txt, theirs_txt) < 1e-5
                                 and rel(ours_txt, plain_out) > 1e-4)

# 12. A LATENT's batch_index: our sampler's noise == ComfyUI's prepare_noise (items picked by index).
index = [2, 0, 2]
out["batch_index_noise_vs_core"] = torch.equal(
    sampling.batch_noise(SEED, 3, H, W, batch_index=index),
    comfy.sample.prepare_noise(torch.zeros(3, 16, 1, H, W), SEED, index)[:, :, 0])

# 13. A union control LoRA on the handle: KSampler through the bridge wants the control image too.
import tempfile  # noqa: E402

import folder_paths  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from qwenimage_pack.nodes import lora as lora_nodes  # noqa: E402

union_name = "qwen_image_union_diffsynth_lora.safetensors"
with tempfile.TemporaryDirectory() as lora_dir:
    save_file({"transformer_blocks.0.attn.to_q.lora_A.default.weight": torch.randn(4, 64) * 0.01,
               "transformer_blocks.0.attn.to_q.lora_B.default.weight": torch.randn(64, 4) * 0.01},
              f"{lora_dir}/{union_name}")
    folder_paths.add_model_folder_path("loras", lora_dir)
    union = lora_nodes.QwenImageLoraLoader().apply(handle, union_name, 1.0)[0]
try:
    core_ksampler(comfy_model.as_comfy_model(union), "euler")
    out["union_lora_needs_control_image"] = "no error"
except ValueError as err:
    out["union_lora_needs_control_image"] = union_name in str(err) and "Control Reference" in str(err)
with_control = [conditioning(1, refs=[ref]), conditioning(2, refs=[ref])]
noise = comfy.sample.prepare_noise(torch.zeros(1, 16, 1, H, W), SEED)
k = comfy.sample.sample(comfy_model.as_comfy_model(union), noise, 2, 2.5, "euler", "simple", *with_control,
                        torch.zeros(1, 16, 1, H, W), disable_pbar=True, seed=SEED)
out["union_lora_with_control_image_runs"] = bool(torch.isfinite(k).all())
print(json.dumps(out))
