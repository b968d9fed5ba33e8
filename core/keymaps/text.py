"""Key names of Qwen2.5-VL text-encoder files, mapped to ``QwenTextEncoder``'s names.

Layouts seen in the wild, all handled by ``text_key``:
- original HF / ComfyUI files: ``model.embed_tokens``, ``model.layers.N.*``, ``model.norm``,
  ``visual.*``, ``lm_head``;
- transformers 5: ``model.language_model.*``, ``model.visual.*``, ``lm_head``;
- llama.cpp GGUF (arch ``qwen2vl``): ``token_embd``, ``blk.N.attn_q`` ..., ``output_norm``,
  ``output``; the vision tower lives in a separate mmproj file (``v.*``, ``mm.*``);
- our own names (``embed_tokens``, ``layers.N.*``, ``norm``), so converting twice is harmless.

Everything is a function of one name at a time, so a streaming loader can route each tensor
as it reads it without ever holding the whole state dict.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from ..encoders.text_encoder import TextEncoderConfig, default_mrope_sections

LM = "lm"
VISION = "vision"
DROP = "drop"

# Wrappers put around the whole model by checkpoint savers; stripped before anything else.
_WRAPPER_PREFIXES = (
    "text_encoders.qwen25_7b.transformer.",
    "text_encoder.",
)

_LM_ROOTS = ("embed_tokens.", "layers.", "norm.")

_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(.+)$")
_GGUF_LAYER_PARTS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP = {"token_embd.": "embed_tokens.", "output_norm.": "norm."}


def _strip_wrapper(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _gguf_name(name: str) -> str | None:
    for old, new in _GGUF_TOP.items():
        if name.startswith(old):
            return new + name[len(old):]
    m = _GGUF_LAYER.match(name)
    if m and m.group(2) in _GGUF_LAYER_PARTS:
        return f"layers.{m.group(1)}.{_GGUF_LAYER_PARTS[m.group(2)]}.{m.group(3)}"
    return None


def text_key(name: str) -> tuple[str, str]:
    """Route one tensor name: ``("lm", our_name)``, ``("vision", name_inside_the_tower)`` or
    ``("drop", name)``. Raises ``ValueError`` for a name no text-encoder layout uses."""
    key = _strip_wrapper(name)
    if key.startswith("lm_head.") or key.startswith("output.") or key == "scaled_fp8":
        return DROP, name
    # Non-persistent rotary tables written by old transformers versions: recomputed here.
    if key.endswith("rotary_emb.inv_freq"):
        return DROP, name
    for prefix in ("model.visual.", "visual."):
        if key.startswith(prefix):
            return VISION, key[len(prefix):]
    # mmproj GGUF tensors: the vision loader understands these names as they are.
    if key.startswith("v.") or key.startswith("mm."):
        return VISION, key
    for prefix in ("model.language_model.", "model.", ""):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.startswith(_LM_ROOTS):
                return LM, rest
    gguf = _gguf_name(key)
    if gguf is not None:
        return LM, gguf
    raise ValueError(
        f"tensor {name!r} is not part of a Qwen2.5-VL text encoder (expected names like "
        "'model.layers.N.*', 'model.language_model.*', 'visual.*' or GGUF 'blk.N.*')"
    )


def convert_text_encoder_keys(state_dict_or_keys):
    """Split a text-encoder state dict into ``(language, vision)`` with our names.

    Given a mapping (name -> tensor, or name -> shape) both results are dicts of the same
    values; given an iterable of names both are dicts ``new_name -> original_name``.
    ``lm_head`` and bookkeeping tensors are dropped; vision tensors are not an error.
    """
    is_mapping = isinstance(state_dict_or_keys, Mapping)
    language: dict = {}
    vision: dict = {}
    for name in state_dict_or_keys:
        kind, new = text_key(name)
        if kind == DROP:
            continue
        target = language if kind == LM else vision
        if new in target:
            raise ValueError(f"tensor {name!r} maps to {new!r}, which another tensor already uses")
        target[new] = state_dict_or_keys[name] if is_mapping else name
    return language, vision


_REQUIRED = (
    "embed_tokens.weight",
    "norm.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.bias",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.input_layernorm.weight",
)


def is_text_encoder_keys(keys: Iterable[str]) -> bool:
    """True when the names form a Qwen2-style language model (q/k/v biases, gated MLP).

    Structure only, so tiny test models qualify too; the real 7B is the one whose
    ``model.layers.0.self_attn.k_proj.bias`` has 512 rows (4 KV heads x 128).
    """
    found = set()
    for name in keys:
        try:
            kind, new = text_key(name)
        except ValueError:
            continue
        if kind == LM:
            found.add(new)
    return all(k in found for k in _REQUIRED)


def text_encoder_config(shapes: Mapping[str, tuple], head_dim: int = 128) -> TextEncoderConfig:
    """The text encoder's config from tensor shapes in any layout ``text_key`` knows (logical
    shapes, not GGUF byte shapes).

    Head counts cannot be read from weights alone; the 7B's 128 is assumed unless given.
    """
    ours: dict[str, tuple] = {}
    for name, shape in shapes.items():
        try:
            kind, new = text_key(name)
        except ValueError:
            continue
        if kind == LM:
            ours[new] = tuple(int(s) for s in shape)

    def shape_of(key: str) -> tuple:
        if key not in ours:
            raise ValueError(f"text encoder weights lack {key!r} (after key conversion)")
        return ours[key]

    vocab, hidden = shape_of("embed_tokens.weight")
    layer_ids = {int(m.group(1)) for k in ours if (m := re.match(r"layers\.(\d+)\.", k))}
    if not layer_ids or layer_ids != set(range(len(layer_ids))):
        raise ValueError(f"text encoder weights: layers are not numbered 0..N-1 (found {sorted(layer_ids)})")
    q_rows = shape_of("layers.0.self_attn.q_proj.weight")[0]
    k_rows = shape_of("layers.0.self_attn.k_proj.weight")[0]
    if q_rows % head_dim or k_rows % head_dim:
        raise ValueError(
            f"text encoder weights: q/k projection rows ({q_rows}, {k_rows}) are not multiples of head_dim {head_dim}"
        )
    heads = q_rows // head_dim
    return TextEncoderConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=len(layer_ids),
        num_heads=heads,
        num_kv_heads=k_rows // head_dim,
        head_dim=head_dim,
        intermediate_size=shape_of("layers.0.mlp.gate_proj.weight")[0],
        mrope_section=default_mrope_sections(head_dim),
    )


def text_names_from_gguf(tensors: dict) -> dict:
    """A llama.cpp (or HF-named) text GGUF's tensors under our language-model names; tensors the
    text encoder does not use are left out, unknown names passed on for the loader to report."""
    out = {}
    for name, t in tensors.items():
        try:
            kind, new = text_key(name)
        except ValueError:
            kind, new = LM, name
        if kind == LM:
            out[new] = t
    return out
