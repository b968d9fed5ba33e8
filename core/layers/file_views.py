"""Which parameters (and buffers) of a module are still views of their weight file's memory mapping.

The loader records each weight it left in the file's mapping (``keep_file_view``); moving a
model back to the host (``host_memory.move``) and taking folded LoRAs out of a weight
(``fold.restore``) read the original values from these views instead of keeping copies.
"""
from __future__ import annotations

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


def file_view_items(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(parameter or buffer name, file view) for each of ``module``'s own tensors that has one."""
    return list(module.__dict__.get(_VIEWS, {}).items())
