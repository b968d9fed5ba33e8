"""Opt-in ``torch.compile`` of the MMDiT's double-stream blocks, compiled once for every size.

The 60 blocks share one piece of code, so one compiled graph serves all of them. What is
compiled is the block's computation only: ``QwenImageMMDiT.forward``, ControlNet hooks between
blocks and the hooks block streaming installs around each block stay eager, so none of them
can break the graph or be traced into it.

Sizes. The graph is traced with dynamic shapes: image tokens, text tokens and the target /
reference split of Edit-2511 are symbols, not constants, so a new resolution, prompt length or
reference image reuses it. What the eager block receives as Python values that change with the
input is turned into something the compiler does not guard on by value:
- ``img_segments`` (slices holding the target-token count) becomes one int argument, a symbol;
- duck sizing (dimensions that happen to be equal at trace time share a symbol: 1024x768
  gives 3072 image tokens, the model width) is switched off while compiling, otherwise such
  a coincidence pins a size and the next resolution recompiles;
- the few real structural choices (last block or not, text mask or none, one or two
  modulation segments) each get their own compiled function, so they never evict one another.
A batch of 1 is a constant for the compiler (sizes 0 and 1 always are): going from batch 1 to a
batch of 2 (true CFG) compiles once more; larger batches reuse that graph.

Weight formats and patches are traced as they are: dense float, float8 (expanded in the
graph), GGUF (the torch dequantization kernels, fused by the compiler: the traced call's options
say ``fused_dequant=False``, so the separate per-shape kernels of ``gguf_kernels``, whose first-use
bookkeeping would make every block graph recompile, are left out of these calls only) and LoRA
patches.
Blocks whose patterns differ (a GGUF file mixing quant types per block, a LoRA on some blocks
only) get one graph per pattern; the recompile limit is raised while sampling to allow that.

Scope. Everything here is per module and per call: ``compiled`` installs the compiled forward
on this module's blocks only, and the compiler settings the graphs rely on (no duck sizing, a
higher recompile limit) are in force only around each compiled block call, not while other
models (a ControlNet between blocks, a text encoder) run.

Failure. If compiling fails (no C++ compiler, no Triton, an op the compiler refuses), the
block runs eagerly, one warning is logged, and these settings stay eager for the session. The
compiled graph works on a copy of the residual streams, so a failure part-way through leaves
the inputs untouched for the eager rerun.

    with compile.compiled(model, CompileSettings("inductor")):
        velocity = model(x, sigma, context)
"""
from __future__ import annotations

import contextlib
import functools
import logging
import types
from dataclasses import dataclass, replace
from typing import Callable, Iterator
from weakref import WeakKeyDictionary

import torch
import torch.nn as nn

from ..models.mmdit import TransformerBlock
from ..layers.run_options import RunOptions, resolve

log = logging.getLogger(__name__)

BACKENDS = ("inductor", "aot_eager", "eager")
# CUDA-graph modes are left out: they re-record for every new shape and assume the weights never
# move, which block streaming does every step.
MODES = ("default", "max-autotune-no-cudagraphs")
RECOMPILE_LIMIT = 64  # per compiled variant; a few graphs per weight pattern and batch kind


@dataclass(frozen=True)
class CompileSettings:
    """``backend``: a name from ``BACKENDS`` (or a torch.compile backend callable, for tests).
    ``mode``: one of ``MODES``; used by inductor only."""

    backend: str | Callable = "inductor"
    mode: str = "default"

    def __post_init__(self):
        if isinstance(self.backend, str) and self.backend not in BACKENDS:
            raise ValueError(f"compile backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.mode not in MODES:
            raise ValueError(f"compile mode must be one of {', '.join(MODES)}, got {self.mode!r}")

    @classmethod
    def from_options(cls, options) -> "CompileSettings | None":
        """Settings from a node option: None / {} = off, a dict with backend / mode, or settings."""
        if options is None or isinstance(options, cls):
            return options
        if not isinstance(options, dict):
            raise ValueError(f"compile options must be a dict with 'backend' and 'mode', got {type(options).__name__}")
        if not options:
            return None
        return cls(options.get("backend", "inductor"), options.get("mode", "default"))

    def describe(self) -> str:
        name = self.backend if isinstance(self.backend, str) else getattr(self.backend, "__name__", "custom")
        return f"{name} ({self.mode})" if name == "inductor" else name


# Settings whose compilation failed in this session -> the reason: not retried (each attempt
# could cost a minute before failing again).
_failed: dict[CompileSettings, str] = {}
# module -> {settings: _BlockCompiler}: compiled graphs live as long as the model.
_compilers: "WeakKeyDictionary[nn.Module, dict]" = WeakKeyDictionary()


def _block_body(block, img, txt, act_img, act_txt, n_target, table, mask, dtype, need_txt, options):
    """The traced function: one block on private copies of the residual streams."""
    if n_target is None:
        segments = [slice(None)]
    else:  # built here from a symbolic int, so the split is not a constant of the graph
        segments = [slice(0, n_target), slice(n_target, None)]
    return TransformerBlock.forward(block, img.clone(), txt.clone(), act_img, act_txt, segments, table, mask,
                                    dtype, need_txt, options)


@functools.lru_cache(maxsize=32)
def _traced_options(options: RunOptions) -> RunOptions:
    """The call's options as the compiled body runs them: GGUF through the torch kernels."""
    return replace(options, fused_dequant=False)


def _split(img_segments) -> int | None | bool:
    """``img_segments`` as the body's ``n_target``; False for a layout the body does not know."""
    if len(img_segments) == 1 and img_segments[0] == slice(None):
        return None
    if len(img_segments) == 2:
        first, rest = img_segments
        if first.start in (0, None) and first.step is None and rest == slice(first.stop, None) and \
                isinstance(first.stop, int):
            return first.stop
    return False


class _BlockCompiler:
    """The compiled block functions of one model for one ``CompileSettings``."""

    def __init__(self, settings: CompileSettings):
        self.settings = settings
        self._fns: dict[tuple, Callable] = {}

    def _function(self, key: tuple) -> Callable:
        fn = self._fns.get(key)
        if fn is None:
            # A fresh code object per structural variant: the compiler caches per code object,
            # so the variants never share (and never exhaust) one recompile budget.
            tag = "qwenimage_block_" + "_".join(str(int(k)) for k in key)
            code = _block_body.__code__.replace(co_name=tag)
            body = types.FunctionType(code, _block_body.__globals__, tag)
            s = self.settings
            mode = s.mode if s.backend == "inductor" and s.mode != "default" else None
            fn = self._fns[key] = torch.compile(body, backend=s.backend, mode=mode, dynamic=True)
        return fn

    def forward(self, block, img, txt, act_img, act_txt, img_segments, table, mask, dtype, need_txt=True,
                options: RunOptions | None = None):
        """Drop-in for ``TransformerBlock.forward`` (installed on each block by ``compiled``)."""
        n_target = _split(img_segments)
        if self.settings not in _failed and n_target is not False:
            key = (bool(need_txt), mask is None, n_target is None)
            traced = _traced_options(resolve(options))
            try:
                with compiler_settings():
                    return self._function(key)(block, img, txt, act_img, act_txt, n_target, table, mask, dtype,
                                               need_txt, traced)
            except torch.OutOfMemoryError:
                raise  # not a compiler problem: eager would run out of memory as well
            except Exception as e:  # noqa: BLE001 - a compiler failure must leave the run eager, not end it
                _give_up(self.settings, e)
        return TransformerBlock.forward(block, img, txt, act_img, act_txt, img_segments, table, mask, dtype,
                                        need_txt, options)


def _give_up(settings: CompileSettings, error: BaseException) -> None:
    for _ in range(8):  # the compiler wraps the backend's own error: name that one
        inner = getattr(error, "inner_exception", None) or error.__cause__
        if inner is None or inner is error:
            break
        error = inner
    first = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {first[0] if first else ''}".strip()
    _failed[settings] = reason
    log.warning("torch.compile (%s) of the Qwen-Image blocks failed (%s); running eager (uncompiled) instead. "
                "Compiling needs a C++ compiler on the CPU and Triton on the GPU.", settings.describe(), reason)


def failure(settings: CompileSettings) -> str | None:
    """Why compiling with ``settings`` failed earlier in this session, or None."""
    return _failed.get(settings)


def reset() -> None:
    """Forget failures and compiled graphs (tests; after installing a compiler)."""
    _failed.clear()
    _compilers.clear()


@contextlib.contextmanager
def compiled(module: nn.Module, settings: CompileSettings | dict | None) -> Iterator[bool]:
    """Run the body with ``module.transformer_blocks`` computing through torch.compile.

    ``settings`` None (or an empty dict) changes nothing. Yields whether the compiled path is
    on (False after an earlier failure with the same settings). Eager results are unaffected
    outside the body; the blocks are restored on exit, also when the body raises.
    """
    settings = CompileSettings.from_options(settings)
    blocks = getattr(module, "transformer_blocks", None)
    if settings is None or blocks is None or not hasattr(torch, "compile"):
        yield False
        return
    if settings in _failed:
        log.info("torch.compile (%s) failed earlier in this session (%s); running eager", settings.describe(),
                 _failed[settings])
        yield False
        return
    compiler = _compilers.setdefault(module, {}).setdefault(settings, _BlockCompiler(settings))
    previous = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        # An instance attribute: nn.Module.__call__ still runs the block's hooks (streaming)
        # around it, outside the compiled code.
        block.forward = types.MethodType(compiler.forward, block)
    try:
        yield True
    finally:
        for block, prev in zip(blocks, previous):
            del block.forward
            if prev is not None:
                block.forward = prev


@contextlib.contextmanager
def compiler_settings() -> Iterator[None]:
    """The compiler settings the block graphs rely on (see the module notes), for the body only."""
    import torch._dynamo as dynamo  # lazy: importing the compiler stack costs a second
    import torch.fx.experimental._config as fx_config

    with dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT), fx_config.patch(use_duck_shape=False):
        yield
