"""Folding LoRA patches into the GPU copy of a dense weight, so a LoRA costs nothing per step.

A patch adds ``strength * delta(x)`` after each matmul: two more small matmuls and one more
read of the activations per Linear per step, several percent of a 1328^2 forward with a
rank-64 LoRA on every layer. When a weight is a dense float copy of a weight that also sits in
its file's memory mapping (``file_views``), the delta can instead be added into that copy once,
as diffusers' ``fuse_lora`` does, and taken out exactly by copying the file's values back.

Folded (``Linear.folded``) patches stay attached, so removing or re-weighting a LoRA still goes
through ``lora_patch.apply_loras``, which restores a layer before its patches change. Weights kept
as float8 or GGUF blocks (folding would mean re-quantizing), converted weights (nothing to
restore from) and weights that are the file mapping itself (writing would touch the mapping)
keep the additive patches, as do patches with a bias delta.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .file_views import file_view
from .linear import FP8_DTYPES, Linear

_FOLDABLE_KINDS = ("lora", "loha", "lokr", "diff")


def _file_view(lin: Linear) -> torch.Tensor | None:
    view = file_view(lin, "weight")
    w = lin.weight
    if view is None or view.shape != w.shape or view.dtype != w.dtype:
        return None
    return view


def can_fold(lin: nn.Module, allow_cpu: bool = False) -> bool:
    """Whether ``lin``'s weight may take folded patches now (see the module notes)."""
    if not isinstance(lin, Linear) or lin.is_quantized:
        return False
    w = lin.weight
    if not w.is_floating_point() or w.dtype in FP8_DTYPES or (w.device.type == "cpu" and not allow_cpu):
        return False
    view = _file_view(lin)
    return view is not None and view.data_ptr() != w.data_ptr()


def _foldable(patch) -> bool:
    layer = getattr(patch, "layer", None)
    return layer is not None and layer.kind in _FOLDABLE_KINDS and layer.diff_b is None


def forget(lin: nn.Module) -> None:
    """``lin``'s weight was replaced by its file's values (moved back to the host): nothing is
    folded into it any more."""
    if getattr(lin, "folded", None):
        lin.folded = {}


def restore(lin: nn.Module) -> None:
    """Take every folded patch out of ``lin``'s weight (copy the file's values back)."""
    if not getattr(lin, "folded", None):
        return
    view = _file_view(lin)
    if view is None:  # cannot happen while the invariant holds; never leave a wrong weight silently
        raise RuntimeError(f"a LoRA was folded into a weight that has no file copy to restore ({tuple(lin.weight.shape)})")
    with torch.no_grad():
        lin.weight.data.copy_(view)
    lin.folded = {}


@torch.no_grad()
def fold(module: nn.Module, allow_cpu: bool = False) -> int:
    """Fold every foldable LoRA patch of ``module``'s Linears into their weights; returns how
    many layers changed. Layers already holding exactly their current patches are skipped, so
    calling this before every sampling run costs nothing after the first."""
    changed = 0
    for lin in module.modules():
        patches = getattr(lin, "patches", None)
        if not patches and not getattr(lin, "folded", None):
            continue
        wanted = {n: p for n, p in patches.items() if _foldable(p)}
        if wanted == lin.folded or not can_fold(lin, allow_cpu):
            continue
        restore(lin)
        if not wanted:
            continue
        w = lin.weight.data
        delta = None
        for p in wanted.values():
            d = p.layer.delta_weight(torch.float32, w.device) * p.strength
            delta = d if delta is None else delta.add_(d)
        w.copy_(w.float().add_(delta))  # one rounding, as diffusers' fuse_lora
        lin.folded = dict(wanted)
        changed += 1
    return changed
