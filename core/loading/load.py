"""Weight files -> ready modules: MMDiT, text encoder, VAE.

Every loader works the same way:
1. open the file lazily (safetensors header, diffusers folder or GGUF) and refuse anything that
   is not the expected model, naming what it is instead (``detect``);
2. map every file key to a parameter name and check the whole plan (missing, unexpected,
   shapes, quantization formats) before any tensor data is read, so a bad file fails in
   seconds, not after minutes of reading;
3. build the module with its parameters on the meta device and stream the tensors in one at a
   time, converting each (dtype, fp8 scale) on the target device, so the host never holds a
   second copy of a 40 GB file.

Any failure frees what was built and raises ``WeightFileError`` naming the file.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..keymaps.detect import EXPECTED, Detected, detect
from ..errors import WeightFileError
from ..keymaps.dfloat11 import diffusers_config as dfloat11_diffusers_config
from ..keymaps.dfloat11 import is_dfloat11
from ..keymaps.dfloat11 import settings as dfloat11_settings
from ..keymaps.mmdit import ZERO_COND_T_MARKER, find_prefix, mmdit_config_from_shapes, mmdit_key, mmdit_prefix
from .engine import (  # noqa: F401  (WEIGHT_DTYPES: part of this module's interface)
    WEIGHT_DTYPES,
    as_dtype,
    dense,
    gguf_value,
    GGUFSource,
    load_module,
    Plan,
    plan_quant,
    Policy,
    read_gguf_file,
)
from ..layers.linear import QuantizedTensor
from ..quant import comfy_quant
from .dfloat11 import attach_groups, plan_groups
from ..formats.safetensors_io import is_gguf, open_weights

# ---------------------------------------------------------------------------------------------
# MMDiT


def _mmdit_config(config, file_config: dict | None, shapes: dict[str, tuple]):
    from ..models.mmdit import MMDiTConfig

    if isinstance(config, MMDiTConfig):
        return config
    values = dict(file_config) if file_config is not None else mmdit_config_from_shapes(shapes)
    values.update(config or {})
    return MMDiTConfig.from_diffusers_config(values)


def load_mmdit(path, weight_dtype: str = "default", device="cpu", compute_dtype=None, config=None):
    """Load a Qwen-Image MMDiT from a single file, a diffusers ``transformer/`` folder (or its
    pipeline folder) or a GGUF file.

    ``weight_dtype``: "default" keeps what is stored (fp8 stays fp8 with its scales, GGUF stays
    quantized, DFloat11 stays compressed and is expanded per block as it runs), "bf16"/"fp16"/"fp32"
    convert everything, "fp8_e4m3fn" stores the transformer blocks' Linear weights as float8 with a
    per-tensor scale and the rest in bf16 (DFloat11 files take "default" only: see loading.dfloat11).
    ``config``: an ``MMDiTConfig`` to use as is, or a dict of diffusers config values laid over the
    file's (e.g. ``{"zero_cond_t": True}`` for Edit-2511); by default read from config.json or
    inferred from the tensor shapes.
    """
    from ..models.mmdit import MMDiTConfig, QwenImageMMDiT

    if config is not None and not isinstance(config, (MMDiTConfig, dict)):
        raise ValueError(f"config must be an MMDiTConfig, a dict of diffusers config values or None, "
                         f"got {type(config).__name__}")

    def prepare(source, found: Detected, shapes, p: Path):
        plan = Plan()
        side = plan_quant(plan, source, p)
        prefix = mmdit_prefix(source.keys()) or ""
        for key in source.keys():
            if key in side:
                continue
            target = mmdit_key(key, prefix)
            if target is not None:
                plan.routes[key] = target
        file_config, df11 = source.config, is_dfloat11(source.keys())
        if df11:  # compressed blocks: their groups become the blocks' df11 buffers
            df11_settings = dfloat11_settings(source.config, p)
            df11_blocks = plan_groups(plan.routes, source.keys(), prefix, weight_dtype, p)
            file_config = dfloat11_diffusers_config(source.config)
        ours = {t: shapes[k] for k, t in plan.routes.items()}
        if any(k.rsplit(".", 1)[-1] == ZERO_COND_T_MARKER for k in side) and not isinstance(config, MMDiTConfig):
            config_values = {"zero_cond_t": True, **(config or {})}
        else:
            config_values = config
        try:
            cfg = _mmdit_config(config_values, file_config, ours)
        except KeyError as e:
            raise WeightFileError(p, f"lacks the MMDiT tensor {e.args[0]!r}.", EXPECTED["qwen_image_mmdit"]) from None
        except ValueError as e:
            raise WeightFileError(p, f"does not give a usable MMDiT configuration ({e}).",
                                  EXPECTED["qwen_image_mmdit"]) from None

        if df11:
            def build():
                model = QwenImageMMDiT(cfg)
                attach_groups(model, df11_blocks, source, df11_settings, p)
                return model

            return plan, build
        return plan, lambda: QwenImageMMDiT(cfg)

    model, _ = load_module(path, "transformer", "mmdit", "qwen_image_mmdit", weight_dtype, device, compute_dtype,
                     prepare, lambda name: name.startswith("transformer_blocks."))
    return model


# ---------------------------------------------------------------------------------------------
# text encoder

_TEXT_ANCHOR = re.compile(r"^(.*?)(?:model\.)?(?:language_model\.)?layers\.0\.self_attn\.q_proj\.weight$")


def _text_prefix(names) -> str:
    found = [m.group(1) for n in names if (m := _TEXT_ANCHOR.match(n))]
    return min(found, key=len) if found else ""


def _plan_quantized_vision(plan: Plan, shapes) -> None:
    """The dense shapes of the vision tower's ComfyUI-quantized layers (the tower is returned as
    plain tensors, so they are decoded at load): see ``keymaps.vision.quantized_linear_shape``."""
    from ..keymaps.vision import quantized_linear_shape

    tower = {name: tuple(shapes[key]) for key, name in plan.vision.items()}
    for key, name in plan.vision.items():
        quant = plan.layer_quant.get(key)
        if quant is None:
            continue
        try:
            stored = comfy_quant.logical_shape(quant, shapes[key])
        except ValueError:
            continue  # refused with the file's name when the layer is decoded
        plan.dense_shapes[key] = quantized_linear_shape(name, stored, tower)


def load_text_encoder(path, weight_dtype: str = "default", device="cpu", compute_dtype=None, mmproj=None):
    """Load the Qwen2.5-VL language model; returns ``(model, vision_state)``.

    ``vision_state`` holds the vision-tower tensors found in the same file (names inside the
    tower, plain float tensors on ``device``), or those of the ``mmproj`` GGUF when given; None
    when there are none. ``weight_dtype`` as for :func:`load_mmdit` ("fp8_e4m3fn" quantizes the
    decoder layers' Linear weights).
    """
    from ..encoders.text_encoder import QwenTextEncoder, TextEncoderConfig
    from ..keymaps.text import DROP, VISION, text_encoder_config, text_key

    def prepare(source, found: Detected, shapes, p: Path):
        plan = Plan()
        side = plan_quant(plan, source, p)
        names = [k for k in source.keys() if k not in side]
        prefix = _text_prefix(names)
        for key in names:
            if prefix and not key.startswith(prefix):
                continue
            try:
                kind, new = text_key(key[len(prefix):])
            except ValueError:
                plan.unexpected.append(key)
                continue
            if kind == VISION:
                plan.vision[key] = new
            elif kind != DROP:
                plan.routes[key] = new
        _plan_quantized_vision(plan, shapes)
        ours = {t: shapes[k] for k, t in plan.routes.items()}
        try:
            if isinstance(source, GGUFSource):
                from ..formats.gguf import text_config_from_metadata

                cfg = TextEncoderConfig(**text_config_from_metadata(source.metadata, source.tensors, p))
            elif source.config is not None:
                cfg = TextEncoderConfig.from_hf_config(source.config)
            else:
                cfg = text_encoder_config(ours)
        except ValueError as e:
            raise WeightFileError(p, f"does not describe a usable text encoder ({e}).",
                                  EXPECTED["qwen25vl_text_encoder"]) from None
        return plan, lambda: QwenTextEncoder(cfg)

    model, vision = load_module(path, "text_encoder", "text", "qwen25vl_text_encoder", weight_dtype, device,
                          compute_dtype, prepare, lambda name: name.startswith("layers."))
    if mmproj is not None:
        vision = _load_mmproj(mmproj, torch.device(device), as_dtype(compute_dtype, "compute_dtype"))
    return model, (vision or None)


def _load_mmproj(path, device: torch.device, compute_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightFileError(p, "does not exist.", "the Qwen2.5-VL mmproj GGUF next to the text-encoder GGUF")
    contents = read_gguf_file(p, "mmproj")
    policy = Policy("default", device, compute_dtype, from_gguf=True)
    out = {}
    for name, t in contents.tensors.items():
        # Same names as the vision tensors of a safetensors file: inside the tower.
        name = name[len("visual."):] if name.startswith("visual.") else name
        if isinstance(t, QuantizedTensor):
            out[name] = gguf_value(t, False, policy)[0]
        else:
            out[name] = dense(t.to(device), None, policy.dense_dtype(t.dtype)) if t.is_floating_point() else t.to(device)
    return out


# ---------------------------------------------------------------------------------------------
# VAE

_VAE_PREFIXES = ("first_stage_model.", "vae.")


def load_vae(path, dtype=torch.float32, device="cpu"):
    """Load the Wan-2.1 / Qwen-Image VAE (original Wan names, diffusers names or a diffusers
    ``vae/`` folder), every floating tensor stored as ``dtype``."""
    from ..encoders.vae import VAEConfig, WanVAE
    from ..keymaps.vae import infer_num_res_blocks, is_diffusers_name, vae_config, vae_key

    dtype = as_dtype(dtype, "dtype") or torch.float32
    weight_dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype)
    if weight_dtype is None:
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")

    def prepare(source, found: Detected, shapes, p: Path):
        plan = Plan()
        side = plan_quant(plan, source, p)
        names = [k for k in source.keys() if k not in side]
        prefix = (find_prefix(names, "encoder.conv1.weight", _VAE_PREFIXES)
                  or find_prefix(names, "encoder.conv_in.weight", _VAE_PREFIXES)
                  or find_prefix(names, "decoder.conv1.weight", _VAE_PREFIXES)
                  or find_prefix(names, "decoder.conv_in.weight", _VAE_PREFIXES) or "")
        inside = [k for k in names if k.startswith(prefix)]
        blocks = infer_num_res_blocks(k[len(prefix):] for k in inside if is_diffusers_name(k[len(prefix):]))
        for key in inside:
            try:
                plan.routes[key] = vae_key(key[len(prefix):], blocks)
            except ValueError:
                plan.unexpected.append(key)
        ours = {t: shapes[k] for k, t in plan.routes.items()}
        if source.config is not None:
            try:
                cfg = VAEConfig.from_diffusers_config(source.config)
            except ValueError as e:
                raise WeightFileError(p, f"has a VAE config this loader cannot use ({e}).", EXPECTED["wan_vae"]) from None
        else:
            cfg = vae_config(ours, path=p)
        return plan, lambda: WanVAE(cfg)

    model, _ = load_module(path, "vae", None, "wan_vae", weight_dtype, device, None, prepare, lambda name: False)
    return model


# ---------------------------------------------------------------------------------------------
# inspection


@dataclass
class FileSummary:
    kind: str
    layout: str
    dtypes: Counter
    n_tensors: int
    friendly: str
    detail: str = ""


def inspect_file(path, component: str | None = None) -> FileSummary:
    """What a file or folder holds, from its header only (no tensor data is read)."""
    p = Path(path).expanduser()
    if p.is_file() and is_gguf(p):
        names, shapes, dtypes, arch = _gguf_header(p)
        layout = f"GGUF ({arch})" if arch else "GGUF"
    else:
        with open_weights(p, component=component) as source:
            names = list(source.keys())
            shapes = source.shapes()
            dtypes = Counter(str(source[k].dtype).replace("torch.", "") for k in names)
            layout = source.layout
            arch = None
            suffixes = {n.rsplit(".", 1)[-1] for n in names}
            if "comfy_quant" in suffixes or "_quantization_metadata" in (getattr(source, "metadata", None) or {}):
                layout += ", ComfyUI mixed precision"
            elif "scaled_fp8" in suffixes:
                layout += ", scaled fp8"
    found = detect(names, shapes, arch)
    return FileSummary(found.kind, layout, dtypes, len(names), found.friendly, found.detail)


def _gguf_header(p: Path):
    try:
        from ..quant.gguf_dequant import GGML_TYPES
        from ..formats.gguf import read_header
    except ImportError as e:
        raise WeightFileError(p, f"is a GGUF file, but GGUF support is not available ({e}).", None) from None
    header = read_header(p)
    names = [t.name for t in header.tensors]
    shapes = {t.name: tuple(t.shape) for t in header.tensors}
    dtypes = Counter(GGML_TYPES[t.qtype].name if t.qtype in GGML_TYPES else str(t.qtype) for t in header.tensors)
    arch = header.metadata.get("general.architecture")
    return names, shapes, dtypes, (str(arch) if arch is not None else None)
