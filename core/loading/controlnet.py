"""ControlNet files -> ready modules: InstantX Union / Inpainting, DiffSynth blockwise patches and the
2512 Fun ControlNet (what their names mean: ``keymaps/controlnet.py``).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import WeightFileError
from ..formats.safetensors_io import is_gguf, open_weights
from ..keymaps.controlnet import (CONTROLNET_PREFIXES, diffsynth_config, flavour, foreign_controlnet, fun_config,
                                  instantx_config)
from ..keymaps.detect import EXPECTED, Detected
from ..keymaps.mmdit import find_prefix
from ..models.controlnet import DiffSynthControlNet, InstantXControlNet
from ..models.controlnet_fun import FunControlNet
from .engine import Plan, load_module, plan_quant


def _precheck(p: Path) -> None:
    """Refuse GGUF and other families' ControlNets with a sentence naming what they are."""
    if p.is_file() and is_gguf(p):
        raise WeightFileError(p, "is a GGUF file; Qwen-Image ControlNets are loaded from .safetensors.",
                              EXPECTED["qwen_image_controlnet"])
    with open_weights(p, component="controlnet") as source:
        names = list(source.keys())
    if flavour(names) is None:
        other = foreign_controlnet(names)
        if other is not None:
            raise WeightFileError(p, f"is {other}, not a Qwen-Image ControlNet.", EXPECTED["qwen_image_controlnet"])


def load_controlnet(path, weight_dtype: str = "default", device="cpu", compute_dtype=None):
    """Load an InstantX ControlNet (Union or Inpainting), a DiffSynth blockwise patch or a Fun ControlNet.

    Returns ``InstantXControlNet``, ``DiffSynthControlNet`` or ``FunControlNet``; ``weight_dtype`` as for
    ``load.load_mmdit`` (bf16 / fp16 / fp8 files are kept as stored with "default").
    """
    p = Path(path).expanduser()
    _precheck(p)

    def prepare(source, found: Detected, shapes, path_: Path):
        plan = Plan()
        side = plan_quant(plan, source, path_)
        names = [k for k in source.keys() if k not in side]
        kind = flavour(names)
        anchor = {"diffsynth": "controlnet_blocks.0.x_rms.weight", "fun": "control_img_in.weight"}.get(
            kind, "controlnet_x_embedder.weight")
        prefix = find_prefix(names, anchor, CONTROLNET_PREFIXES) or ""
        for key in names:
            if key.startswith(prefix):
                plan.routes[key] = key[len(prefix):]
            else:
                plan.unexpected.append(key)
        ours = {t: tuple(shapes[k]) for k, t in plan.routes.items()}
        try:
            if kind == "diffsynth":
                kw = diffsynth_config(ours)
                return plan, lambda: DiffSynthControlNet(**kw)
            if kind == "fun":
                kw = fun_config(ours)
                return plan, lambda: FunControlNet(**kw)
            cfg, extra = instantx_config(ours, source.config)
        except (KeyError, ValueError) as e:
            raise WeightFileError(path_, f"does not describe a usable ControlNet ({type(e).__name__}: {e}).",
                                  EXPECTED["qwen_image_controlnet"]) from None
        return plan, lambda: InstantXControlNet(cfg, extra_condition_channels=extra)

    model, _ = load_module(p, "controlnet", None, "qwen_image_controlnet", weight_dtype, device, compute_dtype, prepare,
                     lambda name: name.startswith(("transformer_blocks.", "controlnet_blocks.", "control_blocks.")))
    return model
