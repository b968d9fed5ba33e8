"""DFloat11 (DF11): bf16 weights stored losslessly in about 11 bits, decoded per block just before use.

A bf16 value is sign | 8-bit exponent | 7-bit mantissa. Trained weights use only a few dozen
exponents, so DF11 (LeanModels/DFloat11, file versions 0.3 to 0.5) Huffman-codes the exponent
and keeps sign and mantissa as one plain byte. One *group*, the compressed Linear weights of one
transformer block flattened and concatenated in the order of config.json's pattern_dict list,
is stored as six tensors (``TENSOR_NAMES``):

- ``luts`` uint8 ``[P+1, 256]``: P decode tables (row 0 the root), then the code length of each
  exponent value. A table entry below 240 is a decoded exponent; 240 and above point to row
  ``256 - d`` for the next byte of a longer code. Codes have at most 32 bits: at most 4 lookups.
- ``encoded_exponent`` uint8: the codes, most significant bit first.
- ``sign_mantissa`` uint8 ``[n]``: ``sign << 7 | mantissa`` of every value.
- ``gaps`` uint8: for each 8-byte piece of the stream (one *thread* of upstream's CUDA kernel),
  the bit offset (5 bits, packed MSB first) of the first code that starts in it.
- ``output_positions``: for each block of 512 threads, the index of its first value, then n
  (little-endian uint32 saved as uint8 bytes, or an integer tensor).
- ``split_positions`` int64: where the concatenation splits into the weights.

Decoding is plain torch, so one piece of code serves every device. It is vectorised over the
threads: each step decodes the next code of every thread from its 96 bits (its own 64 plus 32
of lookahead, as three 32-bit words), ``steps`` times, the most codes that can start in 64 bits.
A prefix sum of the per-thread counts, starting at the thread block's ``output_positions``
entry, tells where each value goes. All shapes follow from sizes read once at construction, so
the hot path never waits for the device, and ``decode_chunk`` traces whole with
``torch.compile(fullgraph=True)``. (Loading upstream's PTX through the CUDA driver would be
faster still; that is a possible later option, not done here.)

``attach`` makes a block use its group: the compressed tensors are buffers of ``block.df11``
(so ``.to``, block streaming and size accounting see them), the Linear weights are meta-device
placeholders, and forward hooks decode the weights on the compute device before the block runs
and drop them after. Memory then holds the compressed model plus one decoded block.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WeightFileError

log = logging.getLogger(__name__)

TENSOR_NAMES = ("luts", "encoded_exponent", "sign_mantissa", "output_positions", "gaps", "split_positions")
BYTES_PER_THREAD = 8  # the only value the format uses: a thread's 64 bits are two 32-bit words
THREADS_PER_BLOCK = 512
TABLE_ROWS = 17  # pointers 240..255 reach rows 1..16: with the root, at most 17 decode tables
MAX_CODE_BITS = 32
CHUNK_THREADS = 1 << 20  # threads per vectorised pass: bounds the temporaries to ~0.2 GB

# -- the decoder ----------------------------------------------------------------------------


def positions(output_positions: torch.Tensor) -> torch.Tensor:
    """``output_positions`` as int64: from the uint8 bytes of little-endian uint32 values (how
    compress_model saves them) or from an integer tensor. Byte arithmetic, not ``view``: a tensor
    inside a file mapping need not be 4-byte aligned."""
    if output_positions.dtype == torch.uint8:
        b = output_positions.reshape(-1, 4).to(torch.int64)
        return b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24
    return output_positions.reshape(-1).to(torch.int64)


def _tables(luts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(fast, lut, lens)``, int64 on ``luts``' device.

    ``lut`` is the decode tables flattened and padded to ``TABLE_ROWS`` rows, so that any pointer
    indexes inside it, even in the padding garbage after the last code. ``fast`` resolves the
    first two bytes in one lookup (almost every code is shorter than 16 bits): for the next 16
    stream bits v, ``fast[v]`` is ``d | len << 8``, or a pointer ``d >= 240`` for a longer code."""
    lut = F.pad(luts[:-1].to(torch.int64), (0, 0, 0, TABLE_ROWS - (luts.shape[0] - 1))).reshape(-1)
    lens = luts[-1].to(torch.int64)
    v = torch.arange(1 << 16, device=luts.device)
    d = lut.index_select(0, v >> 8)
    d = torch.where(d >= 240, lut.index_select(0, torch.where(d >= 240, (256 - d) * 256 + (v & 0xFF), 0)), d)
    return d | lens.index_select(0, d) << 8, lut, lens


def _word(b: torch.Tensor, col: int) -> torch.Tensor:
    """Big-endian 32-bit words from columns ``col..col+3`` of int64 bytes ``[rows, 8]``."""
    return b[:, col] << 24 | b[:, col + 1] << 16 | b[:, col + 2] << 8 | b[:, col + 3]


def _next_code(w0, w1, w2, pos, fast, lut, lens):
    """Exponent and code length of the code at bit ``pos`` of each thread's words."""
    hi, lo = torch.where(pos < 32, w0, w1), torch.where(pos < 32, w1, w2)
    r = pos & 31
    w = (hi << r | lo >> (32 - r)) & 0xFFFFFFFF  # the next 32 stream bits: a whole code
    e = fast.index_select(0, w >> 16)
    d, length = e & 0xFF, e >> 8
    deep = d >= 240  # longer than 16 bits: up to two more table rows
    d = torch.where(deep, lut.index_select(0, torch.where(deep, (256 - d) * 256 + (w >> 8 & 0xFF), 0)), d)
    deeper = d >= 240
    d = torch.where(deeper, lut.index_select(0, torch.where(deeper, (256 - d) * 256 + (w & 0xFF), 0)), d)
    return d, torch.where(deep, lens.index_select(0, d), length)


def decode_chunk(stream: torch.Tensor, gap_bytes: torch.Tensor, sign_mantissa: torch.Tensor, out: torch.Tensor,
                 start: torch.Tensor, fast: torch.Tensor, lut: torch.Tensor, lens: torch.Tensor, steps: int,
                 threads_per_block: int) -> torch.Tensor:
    """Decode T threads whose first value has index ``start`` (0-d int64) into ``out``.

    ``stream``: the threads' bytes plus the next 8 (lookahead), ``8 * (T + 1)``; ``gap_bytes``:
    their packed gaps plus one byte, ``5 * T / 8 + 1``; ``out``: int16 ``[n + 1]``, the bf16 bit
    patterns, whose last slot takes what lies past n (the padding after the last code decodes to
    garbage; upstream's kernel clips it the same way). Returns the values decoded per block of
    ``threads_per_block`` threads, for checking against ``output_positions``.
    Static shapes, no host sync: fit for ``torch.compile(fullgraph=True, dynamic=False)``."""
    rows = stream.view(-1, 8).to(torch.int64)
    w0, w1, w2 = _word(rows[:-1], 0), _word(rows[:-1], 4), _word(rows[1:], 0)
    threads = w0.shape[0]
    bit = torch.arange(threads, device=stream.device) * 5
    g = gap_bytes.to(torch.int64)
    pos = (g.index_select(0, bit >> 3) << 8 | g.index_select(0, (bit >> 3) + 1)) >> (11 - (bit & 7)) & 31

    # Pass 1: every code that starts in a thread's 64 bits is that thread's (one that runs on
    # into the next thread's bits is skipped there by its gap).
    codes, count = [], torch.zeros_like(pos)
    for _ in range(steps):
        d, length = _next_code(w0, w1, w2, pos, fast, lut, lens)
        live = pos < 64
        codes.append(d.to(torch.uint8))
        count = count + live
        pos = pos + torch.where(live, length, 0)
    # Pass 2: the k-th code of a thread is value first + k; a thread's live steps come first.
    first = start + torch.cumsum(count, 0) - count
    n = sign_mantissa.shape[0]
    for k, d in enumerate(codes):
        dest = first + k
        dest = torch.where((k < count) & (dest < n), dest, n)
        sm = sign_mantissa.index_select(0, dest.clamp(max=n - 1)).to(torch.int32)
        v = (sm & 0x80) << 8 | d.to(torch.int32) << 7 | (sm & 0x7F)
        out.index_put_((dest,), torch.where(v >= 1 << 15, v - (1 << 16), v).to(torch.int16))
    return count.view(-1, threads_per_block).sum(1)


_compiled = None  # torch.compile(decode_chunk), made on first use
_compile_failed = False


def _step(compiled: bool):
    global _compiled
    if not compiled or _compile_failed:
        return decode_chunk
    if _compiled is None:
        _compiled = torch.compile(decode_chunk, fullgraph=True, dynamic=False)
    return _compiled


# -- checks ---------------------------------------------------------------------------------


def _check_luts(luts: torch.Tensor) -> int:
    """Structural checks of the decode tables; returns the shortest code length."""
    if luts.dtype != torch.uint8 or luts.ndim != 2 or luts.shape[1] != 256 or not 2 <= luts.shape[0] <= TABLE_ROWS + 1:
        raise ValueError(f"DFloat11 luts must be uint8 [2..{TABLE_ROWS + 1}, 256], got {luts.dtype} {list(luts.shape)}")
    t = luts.to(torch.int64)
    tables, lens = t[:-1], t[-1]
    if int(lens.max()) > MAX_CODE_BITS:
        raise ValueError(f"DFloat11 luts: code length {int(lens.max())} > {MAX_CODE_BITS} bits")
    if int(lens[240:].max()) > 0:
        raise ValueError("DFloat11 luts: exponents >= 240 (inf, NaN, |x| >= 2^113) have codes; "
                         "the format cannot hold them")
    used = lens > 0
    if not bool(used.any()) or int((1 << (MAX_CODE_BITS - lens[used])).sum()) > 1 << MAX_CODE_BITS:
        raise ValueError("DFloat11 luts: the code lengths (last row) are not those of a prefix code")
    ptr = tables >= 240
    if bool(ptr.any()) and int((256 - tables[ptr]).max()) >= tables.shape[0]:
        raise ValueError(f"DFloat11 luts: a pointer names table row {int((256 - tables[ptr]).max())}, "
                         f"but there are {tables.shape[0]} tables")
    symbols = tables[~ptr]
    if bool((lens[symbols] == 0).any()):
        raise ValueError(f"DFloat11 luts: a table decodes to exponent {int(symbols[lens[symbols] == 0][0])}, "
                         "which has no code length")
    present = torch.zeros(256, dtype=torch.bool)
    present[symbols] = True
    if bool((used & ~present).any()):
        raise ValueError(f"DFloat11 luts: exponent {int(torch.nonzero(used & ~present)[0])} has a code length "
                         "but no table entry")
    return int(lens[used].min())


def _check_group(t: Mapping[str, torch.Tensor], sizes: list[int], threads_per_block: int) -> dict:
    """Sizes and tables of one group against each other and the weights they split into.
    Returns the host-side facts decoding needs."""
    missing = [k for k in TENSOR_NAMES if k not in t]
    if missing:
        raise ValueError(f"DFloat11 group lacks {', '.join(missing)}")
    for k in ("encoded_exponent", "sign_mantissa", "gaps"):
        if t[k].dtype != torch.uint8 or t[k].ndim != 1 or t[k].numel() == 0:
            raise ValueError(f"DFloat11 {k} must be a non-empty 1-D uint8 tensor, got {t[k].dtype} {list(t[k].shape)}")
    min_len = _check_luts(t["luts"])
    n, n_bytes = t["sign_mantissa"].numel(), t["encoded_exponent"].numel()
    if sum(sizes) != n:
        raise ValueError(f"DFloat11 group: the weights {sizes} hold {sum(sizes)} values, sign_mantissa holds {n}")
    split = t["split_positions"].reshape(-1).tolist()
    if split != list(torch.tensor(sizes).cumsum(0)[:-1].tolist()):
        raise ValueError(f"DFloat11 split_positions {split[:16]} do not match the weights' sizes {sizes[:16]}")
    n_threads = -(-n_bytes // BYTES_PER_THREAD)
    n_blocks = -(-n_threads // threads_per_block)
    op = t["output_positions"]
    if op.dtype == torch.uint8 and op.numel() % 4:
        raise ValueError(f"DFloat11 output_positions as bytes must be whole uint32 values, got {op.numel()} bytes")
    ops = positions(op).tolist()
    # The encoder writes a block's start only where a code starts in it (or a partial byte ends
    # the stream): when the last code runs from the next-to-last block into the last one and
    # ends on a byte boundary, the final "n" is the last block's own entry. Completed below.
    closed = len(ops) == n_blocks and len(ops) > 0 and ops[-1] == n
    if closed:
        ops = ops + [n]
    if len(ops) != n_blocks + 1 or ops[0] != 0 or ops[-1] != n or any(a > b for a, b in zip(ops, ops[1:])):
        raise ValueError(f"DFloat11 output_positions must rise from 0 to {n} in {n_blocks + 1} entries "
                         f"(one per {threads_per_block}-thread block of the stream, then n), got "
                         f"{len(ops)} entries from {ops[0]} to {ops[-1]}")
    if t["gaps"].numel() < -(-5 * threads_per_block * n_blocks // 8):
        raise ValueError(f"DFloat11 gaps: {t['gaps'].numel()} bytes for {n_blocks * threads_per_block} threads "
                         f"(5 bits each)")
    return dict(n=n, n_threads=n_threads, n_blocks=n_blocks, steps=-(-8 * BYTES_PER_THREAD // min_len),
                complete_positions=closed)


# -- one compressed group -------------------------------------------------------------------


class DF11Group(nn.Module):
    """The compressed weights of one block: the six tensors as buffers, and ``layout``, the
    (module name, weight shape) of each weight in concatenation order (pattern_dict order).

    Construction checks the tables against each other and the layout (ValueError). ``decode``
    returns the bf16 weights, bit-exact; ``check=True`` also verifies every thread block's
    value count against ``output_positions`` (one host sync), which catches corrupt streams."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], layout: Sequence[tuple[str, Sequence[int]]],
                 bytes_per_thread: int = BYTES_PER_THREAD, threads_per_block: int = THREADS_PER_BLOCK,
                 chunk_threads: int = CHUNK_THREADS):
        super().__init__()
        if bytes_per_thread != BYTES_PER_THREAD:
            raise ValueError(f"DFloat11 bytes_per_thread must be {BYTES_PER_THREAD}, got {bytes_per_thread}")
        if threads_per_block <= 0 or threads_per_block % 8:
            raise ValueError(f"DFloat11 threads_per_block must be a positive multiple of 8, got {threads_per_block}")
        self.layout = [(str(name), tuple(int(s) for s in shape)) for name, shape in layout]
        facts = _check_group(tensors, [math.prod(s) for _, s in self.layout], threads_per_block)
        self.n, self.n_threads, self.n_blocks, self.steps = (facts[k] for k in ("n", "n_threads", "n_blocks", "steps"))
        self.threads_per_block = threads_per_block
        # Fixed-size chunks (the last one padded): one compiled graph serves them all.
        per_chunk = max(1, min(chunk_threads // threads_per_block, self.n_blocks))
        self.chunk_threads = per_chunk * threads_per_block
        for k in TENSOR_NAMES:
            self.register_buffer(k, tensors[k])
        if facts["complete_positions"]:  # one int32 more: n, the end of the last thread block
            ops = positions(self.output_positions)
            self.output_positions = torch.cat([ops, ops[-1:]]).to(torch.int32)
        self.verified = False  # set once a decode has passed check=True
        self.compiled = False  # decode through torch.compile (attach's choice)
        self.origin: tuple[str, str] | None = None  # (file, block name) for errors: set by the loader

    def extra_repr(self) -> str:
        return f"{len(self.layout)} weights, {self.n} values, {self.nbytes / max(1, 2 * self.n):.3f} of bf16"

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def decode_flat(self, device=None, check: bool = False, compiled: bool = False) -> torch.Tensor:
        """All values, bf16 ``[n]``, on ``device`` (default: where the buffers are; elsewhere,
        they are copied there first)."""
        global _compile_failed
        device = self.luts.device if device is None else torch.device(device)
        # non_blocking only towards a GPU: a copy to the host must be complete before it is read.
        luts, stream, sm, gaps, op = (b if b.device == device else b.to(device, non_blocking=device.type == "cuda")
                                      for b in
                                      (self.luts, self.encoded_exponent, self.sign_mantissa, self.gaps,
                                       self.output_positions))
        ops = positions(op)
        fast, lut, lens = _tables(luts)
        out = torch.empty(self.n + 1, dtype=torch.int16, device=device)
        T, tpb = self.chunk_threads, self.threads_per_block
        step, bad = _step(compiled), []
        for t0 in range(0, self.n_threads, T):
            s = stream[8 * t0: 8 * (t0 + T + 1)]
            g = gaps[5 * t0 // 8: 5 * (t0 + T) // 8 + 1]
            if s.numel() < 8 * (T + 1) or g.numel() < 5 * T // 8 + 1:  # the end: zeros past it
                s, g = F.pad(s, (0, 8 * (T + 1) - s.numel())), F.pad(g, (0, 5 * T // 8 + 1 - g.numel()))
            b0, b1 = t0 // tpb, min(self.n_blocks, (t0 + T) // tpb)
            args = (s, g, sm, out, ops[b0], fast, lut, lens, self.steps, tpb)
            try:
                counts = step(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - a compiler failure must leave decoding eager, not end it
                if step is decode_chunk:
                    raise
                _compile_failed, step = True, decode_chunk
                log.warning("torch.compile of the DFloat11 decoder failed (%s: %s); decoding eagerly",
                            type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
                counts = step(*args)
            if check:
                done = ops[b0] + counts[: b1 - b0].cumsum(0)
                want = ops[b0 + 1: b1 + 1]
                ok = done == want
                if b1 == self.n_blocks:  # the padding after the last code decodes to a few extra values
                    ok[-1] = done[-1] >= want[-1]
                bad.append(~ok)
        if check:
            wrong = torch.nonzero(torch.cat(bad)).flatten().tolist()
            if wrong:
                raise ValueError(f"DFloat11 stream does not decode to its output_positions (thread block {wrong[0]} of "
                                 f"{self.n_blocks}, {len(wrong)} wrong): corrupt encoded_exponent, gaps or luts")
        return out[: self.n].view(torch.bfloat16)

    def decode(self, dtype: torch.dtype = torch.bfloat16, device=None, check: bool = False,
               compiled: bool = False) -> list[torch.Tensor]:
        """The weights in ``layout`` order, each shaped as given: views of one bf16 buffer
        (cast when ``dtype`` is another)."""
        flat = self.decode_flat(device, check, compiled)
        parts = torch.split(flat, [math.prod(s) for _, s in self.layout])
        return [p.view(s) if dtype == torch.bfloat16 else p.view(s).to(dtype) for p, (_, s) in zip(parts, self.layout)]


# -- use in a block -------------------------------------------------------------------------


def layout_of(block: nn.Module, names: Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, weight shape)`` for the dotted module names of ``block`` (pattern_dict order)."""
    out = []
    for name in names:
        try:
            w = block.get_submodule(name).weight
        except AttributeError as e:
            raise ValueError(f"DFloat11 pattern names {name!r}, which {type(block).__name__} lacks ({e})") from None
        out.append((name, tuple(w.shape)))
    return out


def _placeholder(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.bfloat16, device="meta")


def _input_device(args, kwargs, group: DF11Group) -> torch.device:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return group.luts.device


_warned_copy = False


def _before_block(block: nn.Module, args, kwargs):
    """Forward pre-hook: decode the block's weights where its input is."""
    global _warned_copy
    group = block.df11
    device = _input_device(args, kwargs, group)
    if group.luts.device != device and not _warned_copy:
        _warned_copy = True  # correct, but uploads the compressed tensors a second time
        log.warning("DFloat11 block tensors are on %s while the block runs on %s: copied for each decode "
                    "(a block streamer's pre-hook should run before the DFloat11 one)", group.luts.device, device)
    try:
        # Compiled on CUDA only: eager decoding there is many small kernels; on the CPU a compile costs more than it saves.
        weights = group.decode(device=device, check=not group.verified, compiled=group.compiled and device.type == "cuda")
    except ValueError as e:  # a corrupt stream, found by the first decode's check
        if group.origin is None:
            raise
        path, name = group.origin
        raise WeightFileError(path, f"has a DFloat11 group for block {name} that does not decode ({e}).",
                              "an undamaged DFloat11 file (download it again)") from None
    group.verified = True
    for (name, _), w in zip(group.layout, weights):
        block.get_submodule(name).weight = w


def _after_block(block: nn.Module, args, output) -> None:
    """Forward hook (also on errors): back to placeholders, so the decoded memory is freed."""
    for name, shape in block.df11.layout:
        block.get_submodule(name).weight = _placeholder(shape)


def compressed_weights(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{prefix + "<block>.<layer>.weight": placeholder}`` for every weight a DFloat11 group of
    ``module`` holds compressed: the names a state dict of the uncompressed model would have
    (the placeholders are on the meta device, shape only)."""
    out = {}
    for name, group in module.named_modules():
        if isinstance(group, DF11Group):
            block = name.rpartition(".")[0]
            for layer, shape in group.layout:
                out[f"{prefix}{block + '.' if block else ''}{layer}.weight"] = _placeholder(shape)
    return out


def decode_bytes(module: nn.Module) -> int:
    """Bytes the largest compressed block of ``module`` holds decoded while it runs (its bf16
    weights live from its pre-hook to its hook): working memory to count next to the model."""
    return max((2 * g.n for g in module.modules() if isinstance(g, DF11Group)), default=0)


def attach(block: nn.Module, group: DF11Group, compiled: bool = False) -> None:
    """Make ``block`` run on ``group``: the named layers' weights become placeholders (plain
    attributes on the meta device: no parameters, nothing to move or save), ``group`` becomes
    ``block.df11``, and hooks decode before each forward and release after. ``compiled``: decode
    through torch.compile (falls back to eager with a warning where the compiler fails).

    The pre-hook decodes where the block's first tensor argument is. Hooks run in registration
    order, so a block streamer registered later uploads after the decode; the decode then copies
    the compressed tensors itself (correct, one extra upload): register it first, or prepend."""
    if "df11" in block._modules:
        raise ValueError(f"{type(block).__name__} already has a DFloat11 group attached")
    layers = []
    for name, shape in group.layout:
        try:
            layer = block.get_submodule(name)
        except AttributeError:
            raise ValueError(f"DFloat11 group names {name!r}, which {type(block).__name__} lacks") from None
        w = getattr(layer, "weight", None)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != shape:
            got = list(w.shape) if isinstance(w, torch.Tensor) else None
            raise ValueError(f"DFloat11 group: {name}.weight should be {list(shape)}, the block has {got}")
        layers.append((layer, shape))
    for layer, shape in layers:
        layer._parameters.pop("weight", None)
        layer.weight = _placeholder(shape)
    block.add_module("df11", group)
    group.compiled = compiled
    block.register_forward_pre_hook(_before_block, with_kwargs=True)
    block.register_forward_hook(_after_block, always_call=True)


def detach(block: nn.Module) -> None:
    """Decode ``block``'s weights for good (ordinary parameters where the group is), remove the
    hooks and the compressed tensors: for when memory allows the plain bf16 model."""
    group = block.df11
    weights = group.decode(check=not group.verified)
    for hooks, fn in ((block._forward_pre_hooks, _before_block), (block._forward_hooks, _after_block)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            block._forward_hooks_always_called.pop(key, None)
            block._forward_pre_hooks_with_kwargs.pop(key, None)
    for (name, _), w in zip(group.layout, weights):
        layer = block.get_submodule(name)
        del layer.weight
        layer.weight = nn.Parameter(w.clone(), requires_grad=False)
    del block.df11
