"""The simplest block streamer, kept only as the baseline ``bench_lowvram.py --simple`` compares
the pack's prefetching streamer (core/pipeline/streaming.py) with.

Each block is copied to the device just before its forward and dropped right after: no
prefetch, nothing kept resident. Pinned host memory makes the copies asynchronous.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class BlockStreamer:
    """Forward hooks that move each block of ``blocks`` to ``device`` for the duration of its call."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, offload_device: torch.device):
        self.blocks = blocks
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self._handles: list = []

    def __enter__(self) -> "BlockStreamer":
        for block in self.blocks:
            block.to(self.offload_device)
            if self.offload_device.type == "cpu" and self.device.type == "cuda":
                for p in list(block.parameters()) + list(block.buffers()):
                    if not p.is_pinned():
                        p.data = p.data.pin_memory()
            self._handles.append(block.register_forward_pre_hook(self._load))
            self._handles.append(block.register_forward_hook(self._unload))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _load(self, block: nn.Module, args) -> None:
        for name, p in list(block.named_parameters()) + list(block.named_buffers()):
            gpu = p.data.to(self.device, non_blocking=True)
            p.__dict__.setdefault("_host_copy", p.data)
            p.data = gpu

    def _unload(self, block: nn.Module, args, output) -> None:
        for name, p in list(block.named_parameters()) + list(block.named_buffers()):
            host = p.__dict__.pop("_host_copy", None)
            if host is not None:
                p.data = host
