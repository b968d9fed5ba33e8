"""Which parameters (and buffers) of a module are still views of their weight file's memory mapping.

The loader records each weight it left in the file's mapping (``keep_file_view``), the side
tensors of ComfyUI's quantized layers (block scales, smoothing) included; moving a model back to
the host (``host_memory.move``) and taking folded LoRAs out of a weight (``fold.restore``) read
the original values from these views instead of keeping copies. Where a load converted most of a
file, it copies the few views out instead (``FileUse``, ``copy_out``), so the mapping can close.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

_VIEWS = "_qwenimage_file_views"  # on a module: parameter / buffer name -> its file view


def keep_file_view(module: nn.Module, name: str, view: torch.Tensor | None = None) -> None:
    """Remember that ``module``'s parameter (or buffer) ``name`` currently holds its file's own
    memory (or, given ``view``, that ``view`` holds the same values in host memory: benchmarks).

    Kept on the module, by name: ``Module.to`` may replace Parameter objects (it does when the
    tensor types differ, or under torch's overwrite-on-conversion switch) and always replaces buffers."""
    p = module._parameters.get(name)
    if p is None:
        p = module._buffers.get(name)
    if view is None and p is not None and p.device.type == "cpu":
        view = p.data
    if view is not None:
        module.__dict__.setdefault(_VIEWS, {})[name] = view


def file_view(module: nn.Module, name: str) -> torch.Tensor | None:
    return module.__dict__.get(_VIEWS, {}).get(name)


def forget_file_view(module: nn.Module, name: str) -> None:
    """``module``'s parameter ``name`` no longer lives in its file (the loader copied it so the
    file's mapping can close): drop the view, which would keep the mapping alive."""
    module.__dict__.get(_VIEWS, {}).pop(name, None)


def copy_out(module: nn.Module, name: str) -> None:
    """Give ``module``'s parameter (or buffer) ``name`` memory of its own and drop its file view,
    which would keep the whole file's mapping alive (see ``FileUse``)."""
    if name in module._parameters:
        module._parameters[name].data = module._parameters[name].data.clone()
    else:
        module._buffers[name] = module._buffers[name].clone()
    forget_file_view(module, name)


@dataclass
class FileUse:
    """What a load did with one source file: bytes converted, bytes kept as views of the file
    (and which: ``(target, None)`` for the model's tensors, ``(None, name)`` for vision ones).

    A file is mapped once and every tensor read from it is a view of that one mapping, so a
    single view kept (a norm, a bias) keeps the whole file mapped. Where a load converted most
    of a file's bytes (``mostly_converted``), the loader copies the few views out (``copy_out``)
    so the mapping closes; where it kept most of the file as stored, the views stay: they are the
    weights' cheapest home (host_memory)."""

    converted: int = 0
    kept: int = 0
    views: list[tuple[str | None, str | None]] = field(default_factory=list)

    def add(self, nbytes: int, from_file: bool, target: str | None, vision_name: str | None = None) -> None:
        if from_file:
            self.kept += nbytes
            self.views.append((target, vision_name))
        else:
            self.converted += nbytes

    @property
    def mostly_converted(self) -> bool:
        return self.converted > self.kept


def file_view_items(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(parameter or buffer name, file view) for each of ``module``'s own tensors that has one."""
    return list(module.__dict__.get(_VIEWS, {}).items())
