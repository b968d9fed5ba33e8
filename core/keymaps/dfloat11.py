"""What the names and config.json of a DFloat11 (DF11) MMDiT file mean.

DFloat11 checkpoints (``DFloat11/Qwen-Image-DF11``, ``DFloat11/Qwen-Image-Edit-DF11``, ...) are a
folder with ``config.json`` and one ``diffusion_pytorch_model.safetensors`` in diffusers names.
Every transformer block ``transformer_blocks.N`` holds six tensors (``quant.dfloat11.TENSOR_NAMES``:
``luts``, ``encoded_exponent``, ...) in place of its 14 compressed Linear weights; everything else
(biases, norms, the layers outside the blocks) is plain bf16. Which weights a group holds, and in
which order they were concatenated, is config.json's ``dfloat11_config.pattern_dict``: one regex
for the block names and the list of the block's layer names. A file without config.json (renamed
or picked out of its folder) gets the published Qwen-Image list, ``QWEN_PATTERN``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..errors import WeightFileError
from ..quant.dfloat11 import BYTES_PER_THREAD, TENSOR_NAMES, THREADS_PER_BLOCK

# config.json's dfloat11_config.pattern_dict of DFloat11/Qwen-Image-Edit-DF11 (and -2509): the
# concatenation order of a block's compressed weights.
QWEN_BLOCK_PATTERN = r"transformer_blocks\.\d+"
QWEN_PATTERN = ("img_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.add_v_proj",
                "attn.add_q_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                "txt_mod.1", "txt_mlp.net.0.proj", "txt_mlp.net.2")

SUPPORTED = ("DFloat11 files of the Qwen-Image MMDiT as DFloat11/Qwen-Image-DF11 publishes them: one group per "
             "transformer block (pattern_dict {'transformer_blocks\\\\.\\\\d+': [the block's layer names]}), "
             f"bytes_per_thread {BYTES_PER_THREAD}")

_GROUP_KEY = re.compile(r"^(.*?)(" + "|".join(TENSOR_NAMES) + r")$")
_ANCHOR = re.compile(r"(?:^|\.)transformer_blocks\.\d+\.encoded_exponent$")
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)$")


def is_dfloat11(names: Iterable[str]) -> bool:
    """Whether a file's tensor names are those of a DFloat11-compressed MMDiT."""
    return any(_ANCHOR.search(n) for n in names)


def groups(names: Iterable[str], prefix: str = "") -> dict[str, dict[str, str]]:
    """Compressed groups by module name (without ``prefix``): ``{"transformer_blocks.3":
    {"luts": file key, ...}}``. A module owns a group when it has any of ``TENSOR_NAMES``, so
    a group missing one of them is still reported as that block's (incomplete) group."""
    found: dict[str, dict[str, str]] = {}
    for n in names:
        if not n.startswith(prefix):
            continue
        m = _GROUP_KEY.match(n[len(prefix):])
        if m is None or not (m.group(1) == "" or m.group(1).endswith(".")):
            continue
        found.setdefault(m.group(1).rstrip("."), {})[m.group(2)] = n
    return found


def block_index(module_name: str) -> int | None:
    """N for ``transformer_blocks.N``; None for any other module."""
    m = _BLOCK.match(module_name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Settings:
    """What config.json's ``dfloat11_config`` says (or the published defaults)."""

    pattern: str
    names: tuple[str, ...]
    bytes_per_thread: int
    threads_per_block: int
    from_config: bool


def _refuse(path, problem: str):
    return WeightFileError(path, f"is a DFloat11 file whose config.json {problem}.", SUPPORTED)


def settings(config: Mapping | None, path) -> Settings:
    """``dfloat11_config`` of config.json, checked; the published Qwen-Image values when the
    file came without one."""
    df = (config or {}).get("dfloat11_config")
    if df is None:
        return Settings(QWEN_BLOCK_PATTERN, QWEN_PATTERN, BYTES_PER_THREAD, THREADS_PER_BLOCK, False)
    if not isinstance(df, Mapping):
        raise _refuse(path, "has a dfloat11_config that is not an object")
    patterns = df.get("pattern_dict")
    if not isinstance(patterns, Mapping) or len(patterns) != 1:
        got = list(patterns) if isinstance(patterns, Mapping) else type(patterns).__name__
        raise _refuse(path, f"pattern_dict should name one group per transformer block, got {got}")
    (pattern, names), = patterns.items()
    try:
        block_match = re.fullmatch(str(pattern), "transformer_blocks.0") is not None
    except re.error:
        block_match = False
    if not block_match:
        raise _refuse(path, f"pattern_dict names {pattern!r}, which does not match the transformer blocks")
    if (not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names)
            or len(set(names)) != len(names)):
        raise _refuse(path, f"pattern_dict[{pattern!r}] should list distinct layer names, got {names!r}")
    bpt = df.get("bytes_per_thread", BYTES_PER_THREAD)
    tpb = df.get("threads_per_block", [THREADS_PER_BLOCK])
    tpb = tpb[0] if isinstance(tpb, (list, tuple)) and len(tpb) == 1 else tpb
    if bpt != BYTES_PER_THREAD or not isinstance(tpb, int) or isinstance(tpb, bool) or tpb <= 0 or tpb % 8:
        raise _refuse(path, f"has bytes_per_thread {bpt!r} and threads_per_block {df.get('threads_per_block')!r}")
    return Settings(str(pattern), tuple(names), int(bpt), int(tpb), True)


def diffusers_config(config: Mapping | None) -> dict | None:
    """The diffusers transformer values of a config.json that may be DFloat11's: theirs holds
    only ``dfloat11_config`` (and a meaningless ``model_type``), so the MMDiT's dimensions come
    from the tensors (None); a diffusers config.json with ``dfloat11_config`` added keeps the rest."""
    if config is None or "dfloat11_config" not in config:
        return None if config is None else dict(config)
    rest = {k: v for k, v in config.items() if k not in ("dfloat11_config", "model_type")}
    return rest if "num_layers" in rest or "attention_head_dim" in rest else None
