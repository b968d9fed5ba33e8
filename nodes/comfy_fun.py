"""ComfyUI's own Fun ControlNet (core 'Load ControlNet Model' + 'Apply ControlNet') on our MODEL.

ComfyUI's Qwen-Image Fun ControlNet runs its control blocks on its base model's own layers
(``base_model.process_img``, ``pe_embedder``, ``img_in``, ...: ComfyUI internals that our MMDiT does
not have). While a core sampler runs 'Qwen-Image as ComfyUI MODEL', each Fun ControlNet in its
conditioning computes its residuals with our ``FunControlNet`` instead, on our MMDiT, from the
weights ComfyUI's module holds (the file's tensors, under the names ours has too). Everything
else stays ComfyUI's: the hint's resizing and encoding, its strength (the square root of the
widget's), start / end, chaining, batching; our MODEL adds the residuals after blocks 0, 12, ...
(``control["input"]``) as ComfyUI's model does. Calls whose base model is not ours are untouched,
and the redirection ends with the sampling run.
"""
from __future__ import annotations

import contextlib

import torch

from ..core.keymaps.controlnet import fun_config
from ..core.models.controlnet_fun import FunControlNet
from ..core.models.mmdit import QwenImageMMDiT
from . import runtime


def _ours_for(control_model: torch.nn.Module, cache: dict) -> FunControlNet:
    """Our FunControlNet on the tensors ComfyUI's module holds now (rebuilt when ComfyUI has moved
    or recast them). ``cache`` lives for one sampling run, so no tensor outlives ComfyUI's use of it."""
    state = control_model.state_dict()
    seen = tuple((k, v.data_ptr(), v.device, v.dtype) for k, v in state.items())
    cached = cache.get(id(control_model))
    if cached is not None and cached[0] == seen:
        return cached[1]
    cache.pop(id(control_model), None)
    try:
        net = FunControlNet(**fun_config({k: tuple(v.shape) for k, v in state.items()}), device="meta")
        net.load_state_dict(state, strict=True, assign=True)
    except (KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"this Fun ControlNet's weights ({type(control_model).__name__}) do not fit a Qwen-Image Fun "
                         f"ControlNet ({e}); load it with 'Load Qwen-Image ControlNet' and apply it with "
                         "'Qwen-Image Apply ControlNet' and the Qwen-Image Sampler") from None
    net.eval().requires_grad_(False)
    cache[id(control_model)] = (seen, net)
    return net


def _forward_for(control_model: torch.nn.Module, original, cache: dict):
    """``control_model.forward`` for the sampling run: ours when the base model is our MMDiT."""

    def forward(x, timesteps, context, attention_mask=None, guidance=None, hint=None, transformer_options={},
                base_model=None, **kwargs):
        if not isinstance(base_model, QwenImageMMDiT):
            return original(x, timesteps, context, attention_mask=attention_mask, guidance=guidance, hint=hint,
                            transformer_options=transformer_options, base_model=base_model, **kwargs)
        if hint is None:
            raise ValueError("the Fun ControlNet has no control image; connect an image (and the VAE) to Apply ControlNet")
        net = _ours_for(control_model, cache)
        residuals = net(base_model, x, timesteps, context, hint, dtype=base_model.compute_dtype)
        blocks: list = [None] * len(base_model.transformer_blocks)
        for i, r in zip(net.injection_layers(len(blocks)), residuals):
            blocks[i] = r
        return {"input": blocks}

    return forward


def _fun_control_models(conds) -> list[torch.nn.Module]:
    """The modules of the ComfyUI Fun ControlNets in a guider's conditioning (chains included)."""
    if runtime.QwenFunControlNet is None or not isinstance(conds, dict):
        return []
    found: dict[int, torch.nn.Module] = {}
    for entries in conds.values():
        for cond in entries or []:
            control = cond.get("control") if isinstance(cond, dict) else None
            while control is not None:
                if isinstance(control, runtime.QwenFunControlNet) and getattr(control, "control_model", None) is not None:
                    found.setdefault(id(control.control_model), control.control_model)
                control = getattr(control, "previous_controlnet", None)
    return list(found.values())


@contextlib.contextmanager
def fun_controlnets_on_our_model(guider):
    """For the sampling run of ``guider`` (a core CFGGuider running our MODEL): its ComfyUI Fun
    ControlNets compute their residuals with our FunControlNet on our MMDiT."""
    patched, cache = [], {}
    try:
        for control_model in _fun_control_models(getattr(guider, "conds", None)):
            if "forward" not in vars(control_model):
                control_model.forward = _forward_for(control_model, control_model.forward, cache)
                patched.append(control_model)
        yield
    finally:
        for control_model in patched:
            vars(control_model).pop("forward", None)
        cache.clear()
