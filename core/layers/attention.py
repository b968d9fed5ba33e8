"""Attention backends for the models in this pack.

``attention(q, k, v, mask, backend)`` takes ``[B, heads, L, D]`` tensors (any strides whose last
dim is contiguous; the MMDiT passes transposed views of ``[B, L, heads, D]`` so nothing is copied)
and returns ``[B, heads, L, D]``. The backend is chosen per call (the MMDiT passes its call's
``RunOptions.attention``); nothing here is switched for the process. PyTorch SDPA is the default:
SageAttention is known to give NaN/black images on Ampere (FACTS 7), so the faster kernels are
opt-in, and guarded: a kernel that raises, or whose output is not finite where SDPA's is (checked
on the first forward at each shape), is dropped for SDPA with one warning.

Process-wide here are only facts about the machine: which optional packages load (``_kernels``)
and which kernels failed on this GPU (``_failed``: not retried until the process restarts, by
any caller, since each retry could cost a black image).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "cudnn", "flash", "sage")

_kernels: dict[str, Callable | None] = {}  # backend -> its loaded function; None: the package is not installed
_failed: dict[str, str] = {}  # backend -> why it was dropped on this machine; not retried in this process


def _load_flash() -> Callable:
    try:  # FlashAttention 3 (Hopper) first, then 2; both take [B, L, heads, D].
        from flash_attn_interface import flash_attn_func
    except ImportError:
        from flash_attn import flash_attn_func
    return flash_attn_func


def _load_cudnn() -> Callable:
    """PyTorch SDPA with its cuDNN kernel first (fast on Hopper; not PyTorch's default order).
    Torch without ``set_priority`` gets cuDNN alone: a shape it refuses then raises, and the
    caller falls back to plain SDPA."""
    import inspect

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

        def context():
            return sdpa_kernel(order, set_priority=True)
    else:
        def context():
            return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])

    def run(q, k, v):
        with context():
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _load_sage() -> Callable:
    from sageattention import sageattn

    return sageattn


def _kernel(name: str) -> Callable | None:
    """The function behind backend ``name`` (loaded once), or None when calls must use SDPA."""
    if name in _failed:
        return None
    if name not in _kernels:
        try:
            _kernels[name] = {"cudnn": _load_cudnn, "flash": _load_flash, "sage": _load_sage}[name]()
        except ImportError as e:
            log.warning("attention backend %r is not available (%s); using PyTorch SDPA", name, e)
            _kernels[name] = None
    return _kernels[name]


def resolve(name: str) -> str:
    """The backend a call asking for ``name`` gets: ``name``, or "sdpa" when its package is not
    installed (a workflow saved on one machine still runs on another) or it failed earlier in
    this process. Loads the package, so a run can say so before it starts."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "sdpa":
        return name
    if name in _failed:
        log.info("attention backend %r was dropped earlier in this session (%s); using PyTorch SDPA",
                 name, _failed[name])
        return "sdpa"
    return name if _kernel(name) is not None else "sdpa"


def failure(name: str) -> str | None:
    """Why backend ``name`` was dropped in this process, or None."""
    return _failed.get(name)


def reset() -> None:
    """Forget loaded kernels, failures and checked shapes (tests; after installing a package)."""
    _kernels.clear()
    _failed.clear()
    _checked.clear()


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(D) over ``[B, heads, L, D]``.

    ``mask`` is a boolean tensor broadcastable to ``[B, heads, Lq, Lk]`` (True = attend).
    ``backend``: one of ``BACKENDS``, for this call only. The optional kernels take no mask, only
    CUDA half tensors: other calls go to SDPA, as do backends not installed or dropped earlier.
    """
    if backend == "sdpa" or mask is not None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return _sdpa(q, k, v, mask)
    kernel = _kernel(backend)
    if kernel is None:
        return _sdpa(q, k, v, mask)
    try:
        out = _run_kernel(backend, kernel, q, k, v)
    except Exception as e:  # noqa: BLE001 - an optional kernel refusing a shape / GPU must not end the run
        _fall_back(backend, f"{backend} attention failed ({type(e).__name__}: {e})")
        return _sdpa(q, k, v, mask)
    return _guard(backend, out, q, k, v)


def _run_kernel(backend: str, kernel: Callable, q, k, v) -> torch.Tensor:
    if backend == "flash":
        out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if isinstance(out, tuple):  # FlashAttention 3 also returns the softmax LSE
            out = out[0]
        return out.transpose(1, 2)
    if backend == "sage":
        return kernel(q, k, v, tensor_layout="HND", is_causal=False)
    return kernel(q, k, v)


# A shape whose kernel output was finite this many times (a whole first forward: 60 blocks)
# is trusted: the check is a device sync, not worth paying on every call of every step. Later
# checks could not save the image anyway: once NaNs are in the residual stream, SDPA's output
# is not finite either.
_CHECKS_PER_SHAPE = 64
_checked: dict[tuple, int] = {}  # (backend, shapes, dtype, device) -> finite outputs seen


def _guard(backend: str, out: torch.Tensor, q, k, v) -> torch.Tensor:
    """NaN / black-image guard (SageAttention on Ampere, FACTS 7): when the optional kernel's
    output is not finite but SDPA's is, drop it for SDPA for good and say so once."""
    key = (backend, tuple(q.shape), tuple(k.shape), q.dtype, q.device)
    seen = _checked.get(key, 0)
    if seen >= _CHECKS_PER_SHAPE:
        return out
    if bool(torch.isfinite(out).all()):
        _checked[key] = seen + 1
        return out
    ref = _sdpa(q, k, v, None)
    if not bool(torch.isfinite(ref).all()):
        return out  # the inputs themselves are not finite: not the kernel's fault
    _fall_back(backend, f"{backend} attention produced NaN/inf where PyTorch SDPA does not (a known problem of "
                        "some kernels on some GPUs, giving black images)")
    return ref


def _fall_back(backend: str, reason: str) -> None:
    if backend not in _failed:  # several calls may fail at once (threads): one warning
        log.warning("%s; switching to PyTorch SDPA for the rest of this session", reason)
    _failed[backend] = reason
