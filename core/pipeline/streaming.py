"""Block streaming for models larger than free VRAM: prefetch on a side stream, bounded memory.

The repeated blocks of a model (the MMDiT's 60 ``transformer_blocks``) stay in host memory and
visit the GPU for their forward pass. Compared with the plain ``offload.BlockStreamer``:

- host copies are pinned for the run, so every upload is an asynchronous DMA (unless that
  would take more than half the available system memory: then uploads go from where the
  weights are, synchronously). Pinned memory cannot be paged out, so it ends with the run:
  on exit, tensors read unchanged from a file go back to their file mapping
  (``host_memory.move``) and the others to ordinary memory;
- tensors travel exactly as stored: float8 and GGUF block bytes stay compact on the way (a
  Q4_K weight moves 0.56 bytes instead of 2), and are expanded inside each layer;
- block i+1 is uploaded on a side CUDA stream while block i computes, so with enough PCIe
  bandwidth the copies hide behind the matmuls;
- at most ``2 + prefetch`` streamed blocks are on the device at once (the one computing, the
  one just finished whose memory frees when the GPU is done with it, and the prefetched ones;
  the host waits rather than queue more), and ``keep`` leading
  blocks can stay resident for the whole context when there is room (fewer bytes per step).

Memory safety across streams: a block's device tensors are allocated on the copy stream and
read on the compute stream, so each is marked with ``record_stream(compute)``; the caching
allocator then cannot hand the memory to the next upload before the compute that reads it has
finished.

The same code runs with ``device="cpu"`` (no streams, plain copies), which is how it is tested.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..layers import host_memory

log = logging.getLogger(__name__)


def _tensors(block: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of ``block`` (each once), the objects whose ``.data`` is swapped."""
    seen, out = set(), []
    for t in list(block.parameters()) + [b for b in block.buffers() if b is not None]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


PIN_SHARE = 0.5  # of the available system memory, at most, for pinned copies of streamed blocks


def available_host_memory() -> int | None:
    """Bytes of system memory available to new allocations (Linux MemAvailable, or psutil)."""
    try:
        import psutil  # ComfyUI ships it

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def block_bytes(block: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(block))


def blocks_that_fit(blocks: nn.ModuleList, budget_bytes: int, prefetch: int = 1) -> int:
    """How many leading blocks can stay resident in ``budget_bytes`` while the rest stream
    (the streamed ones need room for ``2 + prefetch`` of the largest block)."""
    sizes = [block_bytes(b) for b in blocks]
    if not sizes:
        return 0
    if sum(sizes) <= budget_bytes:
        return len(sizes)
    left = budget_bytes - (2 + prefetch) * max(sizes)
    keep = 0
    for size in sizes:
        if size > left:
            break
        left -= size
        keep += 1
    return keep


@dataclass
class _Upload:
    tensors: list[torch.Tensor]  # device copies, in _tensors() order
    ready: object = None  # CUDA event recorded after the copies (None on the CPU)
    installed: bool = False


@dataclass
class StreamStats:
    uploads: int = 0  # blocks copied to the device
    prefetch_hits: int = 0  # blocks that were already uploaded when their forward began
    max_resident: int = 0  # most streamed blocks on the device at one time
    order: list[int] = field(default_factory=list)  # block indices in upload order


class BlockStreamer:
    """Context manager: while active, each block of ``blocks`` runs on ``device``.

    Drop-in for ``offload.BlockStreamer(blocks, device, offload_device)``. ``prefetch``: how
    many blocks ahead to upload (0 = load on demand); ``keep``: leading blocks that stay on the
    device for the whole context. ``wrap``: after the last block, prefetch the first one (the
    next sampling step starts with it). ``pin_copy``: makes the page-locked copy of a host
    tensor (default ``Tensor.pin_memory``, used with CUDA only); given, it is used whatever the
    device (tests stand in for pinning with it).
    """

    def __init__(self, blocks: nn.ModuleList, device, offload_device, prefetch: int = 1, keep: int = 0,
                 wrap: bool = True, pin: bool = True,
                 pin_copy: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if prefetch < 0 or keep < 0:
            raise ValueError(f"prefetch and keep must be >= 0, got {prefetch} and {keep}")
        self.blocks = blocks
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.prefetch = int(prefetch)
        self.keep = min(int(keep), len(blocks))
        self.wrap = wrap
        self.pin = pin
        self._pin_copy = pin_copy
        self._pinned: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its pinned copy) this run made
        self.stats = StreamStats()
        self._cuda = self.device.type == "cuda"
        self._copy_stream = None
        self._host: list[list[torch.Tensor]] = []  # per block, the host tensors (pinned when possible)
        self._uploads: dict[int, _Upload] = {}
        self._index: dict[int, int] = {}  # id(block) -> index
        self._streamed: list[int] = []
        self._handles: list = []
        self._unfinished: deque = deque()  # CUDA events: released blocks whose compute may still run

    # -- context -------------------------------------------------------------------------

    def __enter__(self) -> "BlockStreamer":
        can_pin = self._cuda or self._pin_copy is not None
        pin = self.pin and can_pin and self.offload_device.type == "cpu" and self._room_to_pin()
        for i, block in enumerate(self.blocks):
            if any(t.device != self.offload_device for t in _tensors(block)):
                host_memory.move(block, self.offload_device)  # weights read as stored: back to the file
            if pin:
                pin = self._pin(block)
            self._host.append([t.data for t in _tensors(block)])
            self._index[id(block)] = i
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
        self._streamed = list(range(self.keep, len(self.blocks)))
        for i in range(self.keep):  # resident for the whole context
            self._install(i, self._upload(i))
        for i in self._streamed:
            block = self.blocks[i]
            # First among the block's pre-hooks: hooks that expand compressed weights (DFloat11)
            # must find the block's tensors already on the device.
            self._handles.append(block.register_forward_pre_hook(self._before, prepend=True))
            self._handles.append(block.register_forward_hook(self._after))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._cuda:  # uploads still in flight must land before their memory is released
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        for i in list(self._uploads):
            self._release(i)
        self._unfinished.clear()
        self._host.clear()
        self._index.clear()
        self._unpin()

    def _unpin(self) -> None:
        """End of the run: no pinned copy made here stays. Weights with a file view return to it
        (``host_memory.move``, which also turns any pinned tensor it can recognise into ordinary
        memory); copies still installed after that (not recognisable as pinned: a stand-in
        ``pin_copy``) are replaced by ordinary copies here."""
        pinned, self._pinned = self._pinned, []
        if self.offload_device.type == "cpu":
            for block in self.blocks:
                host_memory.move(block, self.offload_device)
        for obj, copy in pinned:
            if obj.data_ptr() == copy.data_ptr():
                obj.data = host_memory.pageable(copy)

    def _room_to_pin(self) -> bool:
        """Pinned copies are process memory the system cannot page out. Where they would take
        more than ``PIN_SHARE`` of the memory still available, the blocks stream straight from
        where they are (for weights read as stored, the file's page cache): slower uploads,
        but a 32 GB machine keeps working."""
        need = sum(t.numel() * t.element_size() for b in self.blocks for t in _tensors(b)
                   if t.device.type == "cpu" and not t.is_pinned())
        available = available_host_memory()
        if available is None or need <= PIN_SHARE * available:
            return True
        log.warning("not pinning %.1f GiB of streamed weights (%.1f GiB of system memory available); "
                    "uploads will be synchronous", need / 2**30, available / 2**30)
        return False

    def _pin(self, block: nn.Module) -> bool:
        make = self._pin_copy or torch.Tensor.pin_memory
        try:
            for t in _tensors(block):
                if not t.data.is_pinned():
                    t.data = make(t.data)
                    self._pinned.append((t, t.data))
        except RuntimeError as e:  # page-locked memory is limited on some systems
            log.warning("could not pin host memory for block streaming (%s); uploads will be synchronous", e)
            return False
        return True

    # -- uploads -------------------------------------------------------------------------

    def _upload(self, i: int) -> _Upload:
        up = self._uploads.get(i)
        if up is not None:
            return up
        # The host usually runs far ahead of the GPU; memory of a released block only comes
        # back once the compute reading it is done. Waiting here for all but the last released
        # block keeps the device at most ``2 + prefetch`` streamed blocks deep.
        while len(self._unfinished) > 1:
            self._unfinished.popleft().synchronize()
        stream = self._copy_stream
        with torch.cuda.stream(stream) if stream is not None else _nullcontext():
            tensors = []
            for host in self._host[i]:
                dev = torch.empty_like(host, device=self.device)
                dev.copy_(host, non_blocking=True)
                tensors.append(dev)
            ready = None
            if stream is not None:
                ready = torch.cuda.Event()
                ready.record(stream)
        up = self._uploads[i] = _Upload(tensors, ready)
        self.stats.uploads += 1
        self.stats.order.append(i)
        streamed = sum(1 for j in self._uploads if j >= self.keep)
        self.stats.max_resident = max(self.stats.max_resident, streamed)
        return up

    def _install(self, i: int, up: _Upload) -> None:
        if self._cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(up.ready)
            for t in up.tensors:
                t.record_stream(compute)
        for obj, dev in zip(_tensors(self.blocks[i]), up.tensors):
            obj.data = dev
        up.installed = True

    def _release(self, i: int) -> None:
        up = self._uploads.pop(i, None)
        if up is None:
            return
        if up.installed:
            for obj, host in zip(_tensors(self.blocks[i]), self._host[i]):
                obj.data = host
        up.tensors.clear()

    def _next(self, i: int, ahead: int) -> int | None:
        pos = self._streamed.index(i) + ahead
        if pos < len(self._streamed):
            return self._streamed[pos]
        return self._streamed[pos % len(self._streamed)] if self.wrap else None

    # -- hooks ---------------------------------------------------------------------------

    def _before(self, block: nn.Module, args) -> None:
        i = self._index[id(block)]
        wanted = {i} | {j for a in range(1, self.prefetch + 1) if (j := self._next(i, a)) is not None}
        for j in [j for j in self._uploads if j >= self.keep and j not in wanted]:
            self._release(j)  # blocks called out of order: drop the stale prefetch
        if i in self._uploads:
            self.stats.prefetch_hits += 1
        self._install(i, self._upload(i))
        for a in range(1, self.prefetch + 1):
            j = self._next(i, a)
            if j is not None and j != i:
                self._upload(j)

    def _after(self, block: nn.Module, args, output) -> None:
        self._release(self._index[id(block)])
        if self._cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._unfinished.append(done)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
