"""Linear and Embedding layers whose stored weight may be compact.

Every model in the pack builds its projections from these classes, so each weight format
(plain float, float8 with a per-tensor scale, GGUF blocks) and each patch kind (LoRA) is
written once and works for all models.

Storage kinds, chosen by what is assigned to ``weight``:
- floating tensor: cast to the activation dtype on use;
- float8 tensor, with optional ``weight_scale``: ``w.to(dtype) * scale`` on use;
- uint8 GGUF blocks with ``quant_type`` set (``weight`` has shape ``[rows, bytes_per_row]``,
  ``quant_shape`` the logical shape): dequantized on the compute device on use;
- a ComfyUI mixed-precision layer (``set_comfy_quant``: nvfp4, mxfp8, int8, ConvRot w4a4, w4a8)
  with its side tensors as buffers under the file's names: decoded on the compute device on use
  (``quant/comfy_quant.py``).

A layer the file marks ``full_precision_matrix_mult`` (``full_precision_mm``) always computes on
its decoded weight, as in ComfyUI: the opt-in quantized-activation matmuls skip it.

How a call computes (float8 matmuls, which GGUF kernels) is that call's ``RunOptions``
(``Linear.forward(x, options)``); a call without options gets the defaults.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import blockscaled_matmul, comfy_quant, comfy_quant_kernels, fp8_matmul, int8_matmul
from ..quant.gguf_dequant import dequantize as dequantize_blocks
from .run_options import DEFAULT, RunOptions


class QuantizedTensor(NamedTuple):
    """A GGUF tensor kept in its block format: ``blocks`` is uint8 ``[rows, bytes_per_row]``,
    ``shape`` the logical torch shape (rows == shape[0])."""

    blocks: torch.Tensor
    qtype: int
    shape: tuple[int, ...]


FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)
)

class _CompactWeight:
    """Mixin: turn whatever is stored in ``self.weight`` into a dense tensor of ``dtype``."""

    weight: torch.Tensor
    weight_scale: torch.Tensor | None
    quant_type: int | None
    quant_shape: tuple[int, ...] | None

    def _init_compact(self) -> None:
        # A buffer, so .to(device) and state_dict() carry the scale with the weight.
        self.register_buffer("weight_scale", None)
        self.quant_type = None
        self.quant_shape = None
        # A ComfyUI mixed-precision layer (comfy_quant.LayerQuant) and the names of its side
        # tensors, kept as buffers under the file's own names.
        self.comfy_quant = None
        self.comfy_quant_side: tuple[str, ...] = ()
        # The file asks for this layer to be computed on its decoded weight (ComfyUI's
        # full_precision_matrix_mult): no float8 / int8 / block-scaled matmul, whatever the options.
        self.full_precision_mm = False

    @property
    def is_quantized(self) -> bool:
        return self.quant_type is not None

    def set_scale(self, scale: torch.Tensor | None) -> None:
        """Attach (or drop) a per-tensor dequantization scale for a float8 weight."""
        self.weight_scale = None if scale is None else scale.detach().to(torch.float32).reshape(()).clone()

    def set_quantized(self, blocks: torch.Tensor, qtype: int, shape: tuple[int, ...]) -> None:
        """Store GGUF blocks (uint8 ``[rows, bytes_per_row]``) for a weight of logical ``shape``."""
        self.weight = nn.Parameter(blocks, requires_grad=False)
        self.quant_type = int(qtype)
        self.quant_shape = tuple(int(s) for s in shape)

    def set_comfy_quant(self, weight: torch.Tensor, side: dict[str, torch.Tensor], quant, shape: tuple[int, int]) -> None:
        """Store a ComfyUI mixed-precision layer as its file holds it: ``weight`` packed or
        quantized, ``side`` its scales (``comfy_quant.SIDE_TENSORS``), ``shape`` the dense
        ``[out, in]``; decoded on the compute device in ``forward``."""
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = None
        for name, t in side.items():
            self.register_buffer(name, t)
        self.comfy_quant = quant
        self.comfy_quant_side = tuple(side)
        self.full_precision_mm = bool(quant.full_precision_matrix_mult)
        self.quant_shape = tuple(int(s) for s in shape)

    def quant_side(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The comfy_quant side tensors, on ``device`` when given."""
        side = {n: getattr(self, n) for n in self.comfy_quant_side}
        if device is not None:
            side = {n: t if t.device == device else t.to(device, non_blocking=True) for n, t in side.items()}
        return side

    def dense_weight(self, dtype: torch.dtype, device: torch.device | None = None, fused: bool = True) -> torch.Tensor:
        w = self.weight
        if device is not None and w.device != device:
            w = w.to(device, non_blocking=True)
        if self.comfy_quant is not None:
            out_features, in_features = self.quant_shape
            # ``fused``: compiled per shape on a GPU where prepared (comfy_quant_kernels), else eager.
            decode = comfy_quant_kernels.decode if fused else comfy_quant.dequantize
            return decode(self.comfy_quant, w, self.quant_side(w.device), out_features, in_features, dtype)
        if self.quant_type is not None:
            cols = 1
            for n in self.quant_shape[1:]:
                cols *= n
            return dequantize_blocks(w, self.quant_type, cols, dtype, fused).reshape(self.quant_shape)
        if w.dtype != dtype:
            w = w.to(dtype)
        if self.weight_scale is not None:
            s = self.weight_scale
            if s.device != w.device:
                s = s.to(w.device)
            w = w * s.to(dtype)
        return w


class Linear(_CompactWeight, nn.Linear):
    """``nn.Linear`` with compact weight storage and additive patches (LoRA)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_compact()
        # name -> patch; a patch is called as patch(x, y) and returns the new y.
        self.patches: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
        # name -> patch already folded into the weight (fold.py): skipped in forward.
        self.folded: dict[str, Callable] = {}

    def add_patch(self, name: str, patch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.patches[name] = patch

    def remove_patch(self, name: str) -> None:
        self.patches.pop(name, None)

    def constant_term(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """What ``forward`` adds whatever the input: the bias plus the bias deltas of the active
        patches (a patch with one exposes it as ``patch.constant_term(dtype, device)``; other
        patches are linear in ``x``). None when there is none.

        ``s * self(x / s) == self(x * s) - (1 - s) * constant_term``: the float16 path
        (mmdit._project) runs on down-scaled inputs and must undo the scale on exactly this part.
        Folded patches (``folded``) are part of the weight, not added in ``forward``: skipped."""
        total = None
        if self.bias is not None:
            total = self.bias.to(device=device, dtype=dtype)
        for name, patch in self.patches.items():
            term = getattr(patch, "constant_term", None)
            if term is None or self.folded.get(name) is patch:
                continue
            c = term(dtype, device)
            if c is not None:
                total = c if total is None else total + c
        return total

    def _native_matmul(self, x: torch.Tensor, opts: RunOptions) -> torch.Tensor | None:
        """``x @ W^T + b`` on quantized operands, where this call asks and this layer and device
        allow it; None means decode the weight."""
        if opts.fp8_matmul is not None and self.weight.dtype in FP8_DTYPES and self.comfy_quant is None:
            # float8 tensor cores, when the device has them.
            return fp8_matmul.try_linear(x, self.weight, self.weight_scale, self.bias, opts.fp8_matmul,
                                         opts.fp8_on_cpu, opts.fp8_compile)
        if opts.int8_matmul and int8_matmul.applies(self.comfy_quant):
            # int8 tensor cores.
            return int8_matmul.try_linear(x, self.comfy_quant, self.weight, self.weight_scale, self.bias,
                                          opts.int8_on_cpu)
        if opts.blockscaled_matmul and blockscaled_matmul.applies(self.comfy_quant):
            # nvfp4 / mxfp8 tensor cores (Blackwell).
            w = self.weight if self.weight.device == x.device else self.weight.to(x.device, non_blocking=True)
            return blockscaled_matmul.try_linear(x, self.comfy_quant, w, self.quant_side(x.device), self.bias,
                                                 self.quant_shape[0], opts.blockscaled_on_cpu)
        return None

    def forward(self, x: torch.Tensor, options: RunOptions | None = None) -> torch.Tensor:
        opts = DEFAULT if options is None else options
        y = None if self.full_precision_mm else self._native_matmul(x, opts)
        if y is None:
            w = self.dense_weight(x.dtype, x.device, opts.fused_dequant)
            b = self.bias
            if b is not None and (b.dtype != x.dtype or b.device != x.device):
                b = b.to(device=x.device, dtype=x.dtype)
            # nvfp4's pre_quant_scale (AWQ smoothing) is part of the layer; patches see the plain input.
            x_in = comfy_quant.prepare_input(x, self.quant_side()) if self.comfy_quant is not None else x
            y = F.linear(x_in, w, b)
        for name, patch in self.patches.items():
            if self.folded.get(name) is not patch:
                y = patch(x, y)
        return y


class Embedding(_CompactWeight, nn.Embedding):
    """``nn.Embedding`` whose table may stay quantized: only the looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self._init_compact()
        self.compute_dtype: torch.dtype | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or (self.weight.dtype if self.weight.is_floating_point() and self.weight.dtype not in FP8_DTYPES else torch.float32)
        if self.quant_type is not None:
            rows = self.weight.index_select(0, ids.reshape(-1).to(self.weight.device))
            out = dequantize_blocks(rows, self.quant_type, self.embedding_dim, dtype)
            return out.reshape(*ids.shape, self.embedding_dim)
        rows = F.embedding(ids.to(self.weight.device), self.weight)
        rows = rows.to(dtype)
        if self.weight_scale is not None:
            rows = rows * self.weight_scale.to(device=rows.device, dtype=dtype)
        return rows
