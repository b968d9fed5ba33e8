"""DFloat11 MMDiT files into a model whose blocks decode their weights just before they run.

``load.load_mmdit`` calls ``plan_groups`` while planning: every compressed group of the file
(``keymaps.dfloat11``) is routed to the buffers of ``transformer_blocks.N.df11`` (a
``quant.dfloat11.DF11Group``), so the shared engine checks, streams and places those tensors as
stored, like any other, and records them as file views (moving the model off the GPU gives them
back to the file mapping, uncopied). ``attach_groups`` runs inside the model's construction: each
group is built from the file's tensors (memory-mapped, nothing decoded) and checked against the
block's layer shapes, then attached, so the 14 compressed weights of a block are never
materialised: they are meta-device placeholders between forwards. A group that does not fit
fails the load with a ``WeightFileError`` naming the file and block, through the engine's
failure path (nothing half-loaded).

The tables are checked structurally at load (cheap); the bitstream itself is checked on each
block's first decode (``DF11Group.decode(check=True)``), because decoding 20 B values on the
CPU to check them at load would take far longer than the load.

DFloat11 files load only with ``weight_dtype`` "default" (kept compressed, bit-exact bf16 when
decoded): any other choice is refused before a tensor is read. Converting at load would mean
decoding the whole model on the CPU first, and the result would be exactly the bf16 (or fp8)
checkpoint the same model is published as.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..errors import WeightFileError
from ..keymaps import dfloat11 as keys
from ..quant.dfloat11 import DF11Group, attach, layout_of

GROUP_MODULE = "df11"  # where quant.dfloat11.attach puts a block's group


def plan_groups(routes: dict[str, str], names, prefix: str, weight_dtype: str, path: Path) -> dict[int, dict[str, str]]:
    """Re-route the compressed groups' file keys in ``routes`` to the ``df11`` buffers of their
    blocks; returns ``{block index: {tensor name: file key}}``."""
    if weight_dtype != "default":
        raise WeightFileError(
            path, f"is a DFloat11 file (bf16 compressed without loss, expanded per block as it runs), which is kept "
                  f"as stored; weight_dtype {weight_dtype!r} would have to decode the whole model on the CPU first.",
            "weight_dtype 'default' for DFloat11 files (bit-exact bf16), or the model's bf16 / fp8 / GGUF file "
            "for other storage")
    found = keys.groups(names, prefix)
    blocks: dict[int, dict[str, str]] = {}
    for module_name, tensors in sorted(found.items()):
        index = keys.block_index(module_name)
        if index is None:
            raise WeightFileError(path, f"holds a DFloat11 group on '{module_name or '<top level>'}', outside the "
                                        "transformer blocks.", keys.SUPPORTED)
        blocks[index] = tensors
        for name, key in tensors.items():
            routes[key] = f"{module_name}.{GROUP_MODULE}.{name}"
    return blocks


def attach_groups(model: nn.Module, blocks: dict[int, dict[str, str]], source, settings: keys.Settings,
                  path: Path) -> None:
    """Build each block's group from the file (CPU, memory-mapped) and attach it to the block."""
    for index, tensors in sorted(blocks.items()):
        if index >= len(model.transformer_blocks):
            continue  # a config with fewer layers than the file: the engine's check names the extra tensors
        name = f"transformer_blocks.{index}"
        where = _file_of(source, tensors, path)
        block = model.transformer_blocks[index]
        try:
            layout = layout_of(block, settings.names)
            # The model is built under a meta-device context: the group's tensors and its
            # checks are real CPU tensors.
            with torch.device("cpu"):
                group = DF11Group({k: source.get(key) for k, key in tensors.items()}, layout,
                                  settings.bytes_per_thread, settings.threads_per_block)
                group.origin = (str(where), name)
                attach(block, group, compiled=True)  # compiled where it runs on CUDA
        except WeightFileError:
            raise
        except ValueError as e:
            pattern = ("config.json's pattern_dict" if settings.from_config
                       else "the published Qwen-Image pattern (no config.json with dfloat11_config next to the file)")
            raise WeightFileError(where, f"has a DFloat11 group for block {name} that is damaged or does not fit "
                                         f"this model ({e}; layers in the order of {pattern}).",
                                  keys.SUPPORTED) from None


def _file_of(source, tensors: dict[str, str], path: Path) -> Path:
    """The file holding a group (a shard of a folder, or the file itself)."""
    key = tensors.get("encoded_exponent") or next(iter(tensors.values()))
    try:
        return Path(source[key].file)
    except (TypeError, KeyError, AttributeError):
        return path
