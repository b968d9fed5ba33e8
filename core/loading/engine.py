"""The machinery every weight loader shares (see ``load``): opening a source, planning and
checking the key mapping, streaming converted tensors into a meta-built module, and cleaning up
after a failure."""
from __future__ import annotations

import contextlib
import gc
import logging
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn as nn

from ..layers import file_views
from ..keymaps.detect import EXPECTED, detect, mismatch_message
from ..errors import WeightFileError
from ..keymaps.mmdit import float8_storage, layer_quant, quant_side_tensors, scaled_fp8_full_precision
from ..quant import comfy_quant
from ..quant.gguf_dequant import dequantize as dequantize_blocks
from ..layers.linear import FP8_DTYPES, Embedding, Linear, QuantizedTensor
from ..formats.safetensors_io import WeightSource, is_gguf, open_weights

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp32", "fp8_e4m3fn")
_FLOAT_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
_FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
# Values converted to float8 per step on the CPU: the float32 working slice (4 MiB) stays in
# cache between its read, scaling and write. On a GPU one pass over the whole tensor is faster.
_FP8_SLICE = 1 << 20


# ---------------------------------------------------------------------------------------------
# sources


class GGUFSource:
    """The tensors of a GGUF file behind the same interface as ``WeightSource``."""

    def __init__(self, path: Path, contents):
        self.path = path
        self.arch = getattr(contents, "arch", None)
        self.layout = f"GGUF ({self.arch})" if self.arch else "GGUF"
        self.config = None
        self.metadata: dict = dict(getattr(contents, "metadata", None) or {})
        self._tensors = dict(contents.tensors)

    def keys(self):
        return self._tensors.keys()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._tensors.items()}

    def in_file_order(self) -> list[str]:
        return list(self._tensors)

    @property
    def tensors(self) -> dict:
        return self._tensors

    def get(self, name: str):
        return self._tensors[name]

    def close(self) -> None:
        self._tensors = {}


def read_gguf_file(path: Path, expect: str):
    try:
        from .gguf import read_gguf
    except ImportError as e:
        raise WeightFileError(path, f"is a GGUF file, but GGUF support is not available ({e}).",
                              "a .safetensors file, or install the pack completely (the 'gguf' package)") from None
    try:
        return read_gguf(path, expect)
    except WeightFileError:
        raise
    except Exception as e:
        raise WeightFileError(path, f"could not be read as GGUF ({type(e).__name__}: {e}).", "a valid GGUF file") from None


def _open_source(path, component: str, gguf_expect: str | None):
    p = Path(path).expanduser()
    if p.is_file() and is_gguf(p):
        if gguf_expect is None:
            raise WeightFileError(p, f"is a GGUF file; the {component} is not loaded from GGUF.", "a .safetensors file")
        return GGUFSource(p, read_gguf_file(p, gguf_expect))
    return open_weights(p, component=component)


# ---------------------------------------------------------------------------------------------
# conversion policy


def as_dtype(value, what: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower() in _FLOAT_NAMES:
        return _FLOAT_NAMES[value.lower()]
    raise ValueError(f"{what} must be a torch dtype or one of bf16/fp16/fp32, got {value!r}")


@dataclass
class Policy:
    """How each tensor is stored once loaded."""

    weight_dtype: str
    device: torch.device
    compute_dtype: torch.dtype | None
    from_gguf: bool = False
    # target name -> store as float8 with a scale when weight_dtype == "fp8_e4m3fn"
    fp8_eligible: Callable[[str], bool] = lambda name: False

    @property
    def forced(self) -> torch.dtype | None:
        return _FLOAT_NAMES.get(self.weight_dtype)

    def dense_dtype(self, stored: torch.dtype) -> torch.dtype:
        """dtype of a tensor that must end up as a plain float tensor."""
        if self.forced is not None:
            return self.forced
        if self.compute_dtype is not None:
            return self.compute_dtype
        if self.weight_dtype == "fp8_e4m3fn" or self.from_gguf or stored in FP8_DTYPES:
            return torch.bfloat16
        return stored

    def convert(self, name: str, t: torch.Tensor, scale: torch.Tensor | None, compact: bool):
        """``(tensor, scale_or_None)`` for one file tensor already on the target device."""
        if not t.is_floating_point():
            return t, None
        fp8 = t.dtype in FP8_DTYPES
        per_tensor = scale is None or scale.numel() == 1
        if compact and per_tensor and self.forced is None:
            if self.weight_dtype == "fp8_e4m3fn" and self.fp8_eligible(name):
                return (t, scale) if fp8 else _quantize_fp8(name, t)
            if self.weight_dtype == "default" and (fp8 or scale is None) and not self.from_gguf:
                return t, scale
        return dense(t, scale, self.dense_dtype(t.dtype)), None


def dense(t: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return t.to(dtype)
    s = scale.to(device=t.device, dtype=torch.float32)
    if s.numel() != 1:
        if s.numel() != t.shape[0]:
            raise ValueError(f"scale of {s.numel()} values does not fit a weight of shape {list(t.shape)}")
        s = s.reshape(-1, *([1] * (t.dim() - 1)))
    return (t.to(torch.float32) * s).to(dtype)


def _abs_max(t: torch.Tensor) -> torch.Tensor:
    """max |t| in float32 (NaN if any value is), in one pass and without an |t| copy."""
    lo, hi = torch.aminmax(t)
    return torch.maximum(lo.float().abs(), hi.float().abs())


def _quantize_fp8(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn with a per-tensor scale amax/448, so the full fp8 range is used.

    Written straight from ``t`` (on the CPU, usually the file's mapping) into the final float8
    tensor, a slice at a time: no full-size float32 copy (twice the size of a bf16 source),
    and each slice is scaled while it is in cache. Same arithmetic as ``(t.float() / scale)
    .clamp(-448, 448).to(float8)``: float32 division, then one rounding."""
    amax = _abs_max(t)
    if not torch.isfinite(amax):
        raise ValueError(f"tensor '{name}' contains inf or NaN values")
    scale = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
    out = torch.empty(t.shape, dtype=torch.float8_e4m3fn, device=t.device)
    src, dst = t.reshape(-1), out.view(-1)
    step = _FP8_SLICE if t.device.type == "cpu" else max(1, src.numel())
    work = torch.empty(min(step, src.numel()), dtype=torch.float32, device=t.device)
    for start in range(0, src.numel(), step):
        n = min(step, src.numel() - start)
        w = work[:n].copy_(src[start:start + n]).div_(scale).clamp_(-_FP8_MAX, _FP8_MAX)
        dst[start:start + n].copy_(w)
    return out, scale


# ---------------------------------------------------------------------------------------------
# building on meta, checking the plan, streaming


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build the module on the meta device: every parameter is replaced from the file, so
    allocating and randomly initialising 20 B parameters first would only cost time and RAM.

    A device context (not a patched ``nn.Module``) keeps this local to the loading thread. Our
    models register no buffers with computed values (rotary tables are rebuilt per call), so
    nothing that the file lacks is lost.
    """
    with torch.device("meta"):
        yield


@dataclass
class Plan:
    routes: dict[str, str] = field(default_factory=dict)  # file key -> parameter / buffer name
    vision: dict[str, str] = field(default_factory=dict)  # file key -> name inside the vision tower
    scales: dict[str, str] = field(default_factory=dict)  # file key of a weight -> its scale's key
    formats: dict[str, torch.dtype] = field(default_factory=dict)  # weight key -> declared float8 storage
    # weight keys of float8 layers the file wants computed on their decoded weights (ComfyUI's
    # full_precision_matrix_mult: no float8 matmul); the other formats carry it in their LayerQuant
    full_precision: set[str] = field(default_factory=set)
    # weight key -> ComfyUI mixed-precision format kept as stored, and its side tensors' keys
    layer_quant: dict[str, comfy_quant.LayerQuant] = field(default_factory=dict)
    quant_side: dict[str, dict[str, str]] = field(default_factory=dict)
    # weight key -> dense [out, in] of a quantized layer no module of the model gives (the vision
    # tower's, returned as plain tensors); the loader fills it in
    dense_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)


def plan_quant(plan: Plan, source, path: Path) -> set[str]:
    """Fill in scales and declared formats; returns the side-tensor keys (not parameters).

    Per-tensor float8 layers stay on the float8 path (scaled matmuls); every other ComfyUI format
    is kept as stored with its side tensors and decoded inside the layer."""
    names = set(source.keys())
    side = quant_side_tensors(names, getattr(source, "metadata", None))
    plan.scales = dict(side.scales)
    side_keys = set(side.side_keys)
    configs = {weight: source.get(key) for weight, key in side.configs.items()}
    configs.update(side.meta_configs)  # the header's entry wins over the tensor, as in ComfyUI
    for weight, raw in configs.items():
        quant = layer_quant(raw, weight, path)
        storage = float8_storage(quant)
        if storage is not None:
            plan.formats[weight] = storage
            if quant.full_precision_matrix_mult:
                plan.full_precision.add(weight)
            continue
        layer = weight[: -len("weight")]
        plan.scales.pop(weight, None)
        plan.layer_quant[weight] = quant
        plan.quant_side[weight] = {s: layer + s for s in comfy_quant.SIDE_TENSORS[quant.format] if layer + s in names}
        side_keys |= set(plan.quant_side[weight].values())
    if scaled_fp8_full_precision(source.shapes(), getattr(source, "metadata", None)):
        plan.full_precision |= set(plan.scales)
    return side_keys


def _state_names(model: nn.Module) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(persistent parameters and buffers by name, names of non-persistent buffers)."""
    expected: dict[str, torch.Tensor] = {}
    transient: set[str] = set()
    for mod_name, mod in model.named_modules():
        pre = mod_name + "." if mod_name else ""
        for n, p in mod._parameters.items():
            if p is not None:
                expected[pre + n] = p
        for n, b in mod._buffers.items():
            if n in mod._non_persistent_buffers_set:
                transient.add(pre + n)
            elif b is not None:
                expected[pre + n] = b
    return expected, transient


def _few(names, n: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _check_plan(model: nn.Module, plan: Plan, shapes: dict, path: Path, what: str) -> None:
    expected, transient = _state_names(model)
    for key in [k for k, t in plan.routes.items() if t in transient]:
        del plan.routes[key]  # recomputed by the model, whatever the file says
    unknown = [k for k, t in plan.routes.items() if t not in expected] + plan.unexpected
    if unknown:
        raise WeightFileError(path, f"has {len(unknown)} tensors that are not part of {what}: {_few(unknown)}.",
                              f"exactly the tensors of {what}")
    covered = set(plan.routes.values())
    missing = [n for n in expected if n not in covered and expected[n].is_meta]
    if missing:
        raise WeightFileError(path, f"lacks {len(missing)} tensors of {what}: {_few(missing)}.",
                              f"a complete {what} file (the file may be cut short or of another variant)")
    for key, target in plan.routes.items():
        want, got = tuple(expected[target].shape), tuple(shapes[key])
        if key in plan.layer_quant:
            _check_quant_holder(model, target, key, plan.layer_quant[key], path)
            try:  # packed / padded storage: the file's shape must be what this layer's format stores
                comfy_quant.logical_shape(plan.layer_quant[key], got, *want)
            except ValueError as e:
                raise WeightFileError(path, f"quantized tensor '{key}' does not fit the model built from its config "
                                            f"({e}).", f"tensors matching one {what} configuration") from None
            continue
        if want != got:
            raise WeightFileError(path, f"tensor '{key}' has shape {list(got)}, but the model built from its config "
                                        f"needs {list(want)}.", f"tensors matching one {what} configuration")
    dup = [t for t, c in Counter(plan.routes.values()).items() if c > 1]
    if dup:
        raise WeightFileError(path, f"holds several tensors for the same parameter ({_few(dup)}): mixed key layouts.",
                              "one key layout per file")


def _check_quant_holder(model: nn.Module, target: str, key: str, quant, path: Path) -> None:
    """A ComfyUI-quantized weight is decoded by a Linear (in its forward) or an Embedding (once, at
    load); any other module would take the packed bytes as its weight."""
    mod = model.get_submodule(target.rpartition(".")[0])
    if not isinstance(mod, (Linear, Embedding)) or target.rpartition(".")[2] != "weight":
        raise WeightFileError(path, f"has a quantized layer '{key}' ({quant.format}) where the model has a "
                                    f"{type(mod).__name__}, which cannot hold one.",
                              "ComfyUI-quantized weights on Linear or Embedding layers only")


def _assign(model: nn.Module, target: str, value, scale: torch.Tensor | None, from_file: bool = False) -> None:
    """``from_file``: ``value`` is the file's own memory (not converted), see host_memory."""
    mod_name, _, attr = target.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if isinstance(value, QuantizedTensor):
        mod.set_quantized(value.blocks, value.qtype, value.shape)
        if from_file:
            file_views.keep_file_view(mod, "weight")
        return
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
        if from_file:
            file_views.keep_file_view(mod, attr)
    else:
        mod._buffers[attr] = value
        if from_file:  # DFloat11 groups: compressed tensors kept as stored
            file_views.keep_file_view(mod, attr)
    if isinstance(mod, (Linear, Embedding)) and attr == "weight":
        mod.set_scale(scale)


def _is_compact(model: nn.Module, target: str) -> bool:
    mod_name, _, attr = target.rpartition(".")
    return attr == "weight" and isinstance(model.get_submodule(mod_name) if mod_name else model, (Linear, Embedding))


def _nbytes(raw) -> int:
    t = raw.blocks if isinstance(raw, QuantizedTensor) else raw
    return t.numel() * t.element_size()


def _same_memory(value: torch.Tensor, raw: torch.Tensor) -> bool:
    """``value`` (what is kept) is ``raw`` (what the file gave) itself: a view of the file's mapping."""
    return value.device.type == "cpu" and value.data_ptr() == raw.data_ptr()


def _file_of(source, key: str, path: Path) -> Path:
    return source[key].file if isinstance(source, WeightSource) else path


class _Read(NamedTuple):
    """A file tensor of a quantized layer: its bytes, and whether the model keeps it as the file's
    own memory (then under ``target``, a parameter or buffer name)."""

    key: str
    nbytes: int
    from_file: bool
    target: str | None


def _stream(model: nn.Module, source, plan: Plan, policy: Policy, path: Path) -> dict[str, torch.Tensor]:
    """Read, convert and assign every planned tensor; returns the vision tensors, if any."""
    vision: dict[str, torch.Tensor] = {}
    device = policy.device
    usage: dict[Path, file_views.FileUse] = {}

    def count(key: str, nbytes: int, from_file: bool, target: str | None, vision_name: str | None = None):
        use = usage.setdefault(_file_of(source, key, path), file_views.FileUse())
        use.add(nbytes, from_file, target, vision_name)

    for key in source.in_file_order():
        target = plan.routes.get(key)
        if target is None and key not in plan.vision:
            continue
        raw = source.get(key)
        if key in plan.layer_quant:  # ComfyUI's mixed precision: the weight and its side tensors
            if target is None:  # a vision-tower layer: the tower takes plain tensors
                vision[plan.vision[key]], reads = _decoded_comfy_quant(source, plan, key, raw, policy, path)
            else:
                reads = _assign_comfy_quant(model, source, plan, key, target, raw, policy, path)
            for r in reads:
                count(*r)
            continue
        nbytes = _nbytes(raw)
        compact = target is not None and _is_compact(model, target)
        if isinstance(raw, QuantizedTensor):
            value, scale = gguf_value(raw, compact, policy)
            from_file = isinstance(value, QuantizedTensor) and value.blocks.data_ptr() == raw.blocks.data_ptr()
        else:
            declared = plan.formats.get(key)
            if declared is not None and raw.dtype == torch.uint8:
                raw = raw.view(declared)  # fp8 bytes stored in a uint8 container
            if target is not None:
                _check_floating(model, target, key, raw, _file_of(source, key, path))
            scale = source.get(plan.scales[key]).to(device) if key in plan.scales else None
            try:
                value, scale = policy.convert(target or key, raw.to(device), scale, compact)
            except ValueError as e:
                raise WeightFileError(_file_of(source, key, path), f"has an unusable tensor '{key}': {e}.",
                                      "finite weights (the file may be damaged)") from None
            from_file = _same_memory(value, raw)
        del raw
        count(key, nbytes, from_file, target, plan.vision.get(key) if target is None else None)
        if target is None:
            vision[plan.vision[key]] = value
            continue
        _assign(model, target, value, scale, from_file)
        if key in plan.full_precision:  # no float8 matmul for this layer (Linear.forward)
            model.get_submodule(target.rpartition(".")[0]).full_precision_mm = True
    _own_memory_where_converted(model, vision, usage)
    return vision


def _check_floating(model: nn.Module, target: str, key: str, t: torch.Tensor, file: Path) -> None:
    """An integer tensor (int8, uint8) for a floating parameter is a quantized weight whose layer
    config the file does not give (or names differently): cast to float, its scale dropped, it
    would compute garbage without an error."""
    mod_name, _, attr = target.rpartition(".")
    p = (model.get_submodule(mod_name) if mod_name else model)._parameters.get(attr)
    if t.is_floating_point() or p is None or not p.is_floating_point():
        return
    raise WeightFileError(file, f"has an integer tensor '{key}' ({str(t.dtype).replace('torch.', '')}) for the "
                                f"weight '{target}', but no quantization config for its layer.",
                          "a comfy_quant config for each quantized layer (a '<layer>.comfy_quant' tensor, or the "
                          "layer in the header's _quantization_metadata), or float weights")


def _quant_side(source, plan: Plan, key: str, policy: Policy,
                holder: str | None = None) -> tuple[dict[str, torch.Tensor], list[_Read]]:
    """The layer's side tensors on the target device (E8M0 scales as their bytes), and what was read:
    kept under ``holder`` (the layer's module name) as buffers of the same names."""
    side, reads = {}, []
    for name, side_key in plan.quant_side[key].items():
        raw = source.get(side_key)
        t = raw.to(policy.device)
        side[name] = t.view(torch.uint8) if "e8m0" in str(t.dtype) else t
        target = None if holder is None else f"{holder}.{name}" if holder else name
        reads.append(_Read(side_key, _nbytes(raw), _same_memory(t, raw), target))
    return side, reads


def _undecodable(path: Path, key: str, quant, e: ValueError) -> WeightFileError:
    return WeightFileError(path, f"has a quantized layer '{key}' ({quant.format}) that cannot be decoded: {e}.",
                           f"layers as ComfyUI writes them ({', '.join(comfy_quant.SUPPORTED)})")


def _assign_comfy_quant(model: nn.Module, source, plan: Plan, key: str, target: str, raw: torch.Tensor,
                        policy: Policy, path: Path) -> list[_Read]:
    """One ComfyUI mixed-precision layer. A Linear keeps it as stored (decoded in its forward) and
    records which of its tensors are the file's own memory (``file_views``: they return there, not
    to private copies, when the model leaves the GPU); decoded once here when a float dtype was
    asked for. An Embedding (a lookup table: ComfyUI's int8 ones) is always decoded here."""
    quant = plan.layer_quant[key]
    holder = target.rpartition(".")[0]
    mod = model.get_submodule(holder)
    side, reads = _quant_side(source, plan, key, policy, holder)
    linear = isinstance(mod, Linear)  # else an Embedding (_check_quant_holder)
    shape = (mod.out_features, mod.in_features) if linear else (mod.num_embeddings, mod.embedding_dim)
    try:
        comfy_quant.check_side(quant, side)
        comfy_quant.check_side_shapes(quant, side, *shape)
        if not linear and "pre_quant_scale" in side:
            raise ValueError("an embedding has no input to smooth, yet the layer has a pre_quant_scale")
        weight = raw.to(policy.device)
        if linear and policy.forced is None:
            mod.set_comfy_quant(weight, side, quant, shape)
        else:
            dense_value = comfy_quant.smoothed_weight(quant, weight, side, *shape,
                                                      policy.dense_dtype(torch.float8_e4m3fn))
    except ValueError as e:
        raise _undecodable(path, key, quant, e) from None
    if not linear or policy.forced is not None:
        _assign(model, target, dense_value, None)
        return [_Read(key, _nbytes(raw), False, target)] + [r._replace(from_file=False) for r in reads]
    reads.insert(0, _Read(key, _nbytes(raw), _same_memory(weight, raw), target))
    for r in reads:
        if r.from_file:
            file_views.keep_file_view(mod, r.target.rpartition(".")[2])
    return reads


def _decoded_comfy_quant(source, plan: Plan, key: str, raw: torch.Tensor, policy: Policy,
                         path: Path) -> tuple[torch.Tensor, list[_Read]]:
    """A ComfyUI mixed-precision layer outside the model (the vision tower's) as a plain tensor of
    the dtype quantized weights expand to (``weight_dtype``, else the compute dtype, else bf16),
    and what was read (all of it converted)."""
    quant = plan.layer_quant[key]
    side, reads = _quant_side(source, plan, key, policy)
    try:
        comfy_quant.check_side(quant, side)
        shape = comfy_quant.logical_shape(quant, raw.shape, *plan.dense_shapes.get(key, (None, None)))
        comfy_quant.check_side_shapes(quant, side, *shape)
        dense_value = comfy_quant.smoothed_weight(quant, raw.to(policy.device), side, *shape,
                                                  policy.dense_dtype(torch.float8_e4m3fn))
    except ValueError as e:
        raise _undecodable(path, key, quant, e) from None
    return dense_value, [_Read(key, _nbytes(raw), False, None)] + [r._replace(from_file=False) for r in reads]


def _own_memory_where_converted(model: nn.Module, vision: dict, usage: dict[Path, file_views.FileUse]) -> None:
    """Let the mapping of a file the load mostly converted close (``file_views.FileUse``): the few
    views kept from it (a norm, a bias) are copied and stop being file views."""
    for use in (u for u in usage.values() if u.mostly_converted):
        for target, vision_name in use.views:
            if target is None:
                vision[vision_name] = vision[vision_name].clone()
                continue
            mod_name, _, attr = target.rpartition(".")
            file_views.copy_out(model.get_submodule(mod_name) if mod_name else model, attr)


def gguf_value(q: QuantizedTensor, compact: bool, policy: Policy):
    blocks = q.blocks.to(policy.device)
    if compact:
        return QuantizedTensor(blocks, q.qtype, tuple(q.shape)), None
    cols = 1
    for n in q.shape[1:]:
        cols *= n
    dense = dequantize_blocks(blocks.reshape(q.shape[0], -1), q.qtype, cols, policy.dense_dtype(torch.float32))
    return dense.reshape(q.shape), None


def _finish(model: nn.Module, policy: Policy, path: Path, what: str) -> None:
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise WeightFileError(path, f"did not provide {len(left)} tensors of {what}: {_few(left)}.", f"a complete {what}")
    for mod in model.modules():
        for n, b in mod._buffers.items():
            if b is not None and b.device != policy.device:
                mod._buffers[n] = b.to(policy.device)
        if policy.compute_dtype is not None and isinstance(mod, Embedding):
            mod.compute_dtype = policy.compute_dtype
    if policy.compute_dtype is not None and hasattr(type(model), "compute_dtype"):
        with contextlib.suppress(AttributeError):
            model.compute_dtype = policy.compute_dtype
    model.eval()


def load_module(path, component: str, gguf_expect: str, wanted: str, weight_dtype: str, device, compute_dtype,
          prepare: Callable, fp8_eligible: Callable[[str], bool]):
    """Shared skeleton; ``prepare(source, found) -> (plan, build)`` where ``build()`` makes the module."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    compute_dtype = as_dtype(compute_dtype, "compute_dtype")
    device = torch.device(device)
    p = Path(path).expanduser()
    what = EXPECTED[wanted].split(" (")[0]
    model = source = None
    failure: BaseException | None = None
    try:
        source = _open_source(p, component, gguf_expect)
        shapes = source.shapes()
        found = detect(list(source.keys()), shapes, getattr(source, "arch", None))
        if not found.has(wanted):
            raise WeightFileError(p, mismatch_message(found, wanted), None)
        plan, build = prepare(source, found, shapes, p)
        with _parameters_on_meta():
            model = build()
        _check_plan(model, plan, shapes, p, what)
        policy = Policy(weight_dtype, device, compute_dtype, isinstance(source, GGUFSource), fp8_eligible)
        vision = _stream(model, source, plan, policy, p)
        _finish(model, policy, p, what)
        return model, vision
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear error, see below
        failure = _as_weight_error(e, p, what)
    finally:
        if source is not None:
            source.close()
    # Outside the except block: the traceback that pinned the half-built model is gone.
    del model, source
    _free_memory(device)
    raise failure


def _as_weight_error(e: Exception, path: Path, what: str) -> WeightFileError:
    if isinstance(e, WeightFileError):
        err = WeightFileError(e.path, e.problem, e.expected)
    elif isinstance(e, getattr(torch, "OutOfMemoryError", ())) or isinstance(e, MemoryError):
        err = WeightFileError(path, f"did not fit in memory while loading ({e}).",
                              "more free memory: close other models, or choose weight_dtype fp8_e4m3fn or a GGUF file")
    else:
        # Formatted to text: a log record holding exc_info would keep the model alive via its frames.
        logger.error("loading %s failed:\n%s", path, "".join(traceback.format_exception(e)))
        err = WeightFileError(path, f"could not be loaded as {what} ({type(e).__name__}: {e}).", None)
    e.__traceback__ = None
    return err


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
