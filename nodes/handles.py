"""The objects that travel between our nodes (QWENIMAGE_MODEL, _TEXT_ENCODER, _VAE).

ComfyUI caches node outputs and may hand the same object to several downstream nodes, so
handles are immutable: a LoRA node returns a new handle that shares the 20 B module and adds a
patch description; the patches are attached to the module only while a sampler runs.

Inside ComfyUI a handle also holds the ComfyUI ModelPatchers that own its modules (``owners``,
made by ``placement.manage``): ComfyUI refers to them only weakly, so the handle is what keeps
them, and the graph dropping the handle frees the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

MODEL_TYPE = "QWENIMAGE_MODEL"
TEXT_ENCODER_TYPE = "QWENIMAGE_TEXT_ENCODER"
VAE_TYPE = "QWENIMAGE_VAE"

VARIANTS = ("auto", "qwen-image", "edit", "edit-2509", "edit-2511")


def conditioning_entries(conditioning, what: str) -> list[tuple[torch.Tensor, dict]]:
    """The ``(tensor, extras)`` pairs of a ComfyUI CONDITIONING (``[[tensor, dict], ...]``), or a
    ValueError saying what to connect to the ``what`` input."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(f"{what} conditioning is empty; connect a Qwen-Image Text Encode (or CLIP Text Encode) output")
    out = []
    for entry in conditioning:
        if not (isinstance(entry, (list, tuple)) and len(entry) >= 2 and isinstance(entry[0], torch.Tensor)):
            raise ValueError(f"{what} conditioning is not in ComfyUI's [[tensor, dict], ...] format")
        out.append((entry[0], entry[1] or {}))
    return out


@dataclass(frozen=True)
class DiffusionModel:
    module: torch.nn.Module
    name: str
    variant: str
    weight_format: str
    # (lora_id, LoraWeights, strength) in application order
    loras: tuple = ()
    options: dict = field(default_factory=dict)
    owners: tuple = field(default=(), compare=False, repr=False)

    def with_lora(self, lora_id: str, weights: Any, strength: float) -> "DiffusionModel":
        return replace(self, loras=self.loras + ((lora_id, weights, float(strength)),))

    def with_options(self, **options) -> "DiffusionModel":
        """A new handle with ``options`` added (a new dict: this handle's must never change)."""
        return replace(self, options={**self.options, **options})

    def describe(self) -> str:
        extra = f", {len(self.loras)} LoRA(s)" if self.loras else ""
        return f"{self.name} [{self.variant}, {self.weight_format}{extra}]"


@dataclass(frozen=True)
class TextEncoder:
    module: torch.nn.Module
    tokenizer: Any
    name: str
    vision: Any = None  # vision tower (edit models); None when the file has none
    owners: tuple = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class VAE:
    module: torch.nn.Module
    name: str
    owners: tuple = field(default=(), compare=False, repr=False)


def variant_from_name(filename: str) -> str:
    """Guess the model variant from a file name, as users keep the official names."""
    n = filename.lower().replace("_", "-")
    if "edit" in n:
        if "2511" in n:
            return "edit-2511"
        if "2509" in n:
            return "edit-2509"
        return "edit"
    return "qwen-image"
