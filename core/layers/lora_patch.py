"""LoRA patches on a model's Linear layers: what a LoRA adds at compute time.

A LoRA never touches a stored weight: each targeted ``Linear`` gets a patch ``fn(x, y) -> y``
that adds ``strength * delta(x)`` after the base matmul, so the same LoRA works on bf16, fp8
and GGUF weights, and changing or removing it needs no reload. Reading LoRA files into
``LoraWeights`` is the loading floor's job (``core/loading/lora.py``).

    apply_loras(model, [(weights, 1.0)])   # later: apply_loras(model, []) removes it

Per layer: plain LoRA (down/up), LyCORIS LoHa and LoKr (non-Tucker), full weight diffs
(``diff``) and bias diffs (``diff_b``).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fold
from ..errors import WeightFileError

PATCH_PREFIX = "lora:"


@dataclass(eq=False)
class LoraLayer:
    """What one LoRA file adds to one Linear: ``delta W = scale * f(factors)``.

    ``kind`` "lora": ``down`` [r, in], ``up`` [out, r]; "loha": ``factors`` hada_w1_a/b,
    hada_w2_a/b; "lokr": ``factors`` w1 (or w1_a, w1_b), w2 (or w2_a, w2_b); "diff": ``factors``
    weight [out, in]; None: bias only. ``diff_b`` [out] is an optional bias delta.
    """

    in_features: int
    out_features: int
    kind: str | None
    scale: float = 1.0
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    diff_b: torch.Tensor | None = None
    rank: int | None = None
    # (device, dtype) -> tensors ready for that input; filled on first use.
    _cache: dict = field(default_factory=dict, repr=False)

    def delta_weight(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The dense scaled weight delta [out, in] (strength 1), computed in fp32."""
        def g(t):
            return t.to(device=device, dtype=torch.float32)

        if self.kind == "lora":
            w = g(self.up) @ g(self.down)
        elif self.kind == "loha":
            f = self.factors
            w = (g(f["hada_w1_a"]) @ g(f["hada_w1_b"])) * (g(f["hada_w2_a"]) @ g(f["hada_w2_b"]))
        elif self.kind == "lokr":
            w = torch.kron(self._lokr_factor("w1", g), self._lokr_factor("w2", g))
        elif self.kind == "diff":
            w = g(self.factors["weight"])
        else:
            w = torch.zeros(self.out_features, self.in_features, device=device)
        return (w * self.scale).to(dtype)

    def _lokr_factor(self, name, g):
        f = self.factors
        if name in f:
            return g(f[name])
        return g(f[name + "_a"]) @ g(f[name + "_b"])

    def _ready(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        hit = self._cache.get(key)
        if hit is None:
            def cast(t):
                return None if t is None else t.to(device).to(dtype).contiguous()

            if self.kind == "lora":
                weight = (cast(self.down), cast(self.up))
            elif self.kind is not None:
                # LoHa / LoKr products are built once per device and dtype, then used as one matmul.
                weight = self.delta_weight(dtype, device).contiguous()
            else:
                weight = None
            hit = self._cache[key] = (weight, cast(self.diff_b))
        return hit

    def device_copy_bytes(self) -> int:
        """Bytes of the cached copies on devices other than the CPU (a parsed tensor that was
        already on that device and in that dtype is used uncopied: not counted)."""
        own = {id(t) for t in (self.down, self.up, self.diff_b, *self.factors.values())}
        cached = (t for (device, _), (weight, bias) in self._cache.items() if device.type != "cpu"
                  for t in (*(weight if isinstance(weight, tuple) else (weight,)), bias))
        return sum(t.numel() * t.element_size() for t in cached if t is not None and id(t) not in own)

    def release_device_copies(self) -> None:
        """Forget the cached copies on devices other than the CPU; rebuilt on next use."""
        for key in [k for k in self._cache if k[0].type != "cpu"]:
            del self._cache[key]

    def add_to(self, x: torch.Tensor, y: torch.Tensor, strength: float) -> torch.Tensor:
        """``y + strength * delta(x)``; in place on ``y`` when autograd does not need it."""
        weight, bias = self._ready(x.device, x.dtype)
        inplace = not y.requires_grad and y.is_contiguous()
        out = y.shape[-1]
        if self.kind == "lora":
            down, up = weight
            h = F.linear(x, down)
            s = self.scale * strength
            if inplace:
                y.view(-1, out).addmm_(h.reshape(-1, h.shape[-1]).mul_(s), up.t())
            else:
                y = y + F.linear(h * s, up)
        elif weight is not None:
            if inplace:
                y.view(-1, out).addmm_(x.reshape(-1, x.shape[-1]), weight.t(), alpha=strength)
            else:
                y = y + F.linear(x, weight) * strength
        if bias is not None:
            y = y.add_(bias, alpha=strength) if inplace else y + bias * strength
        return y


class LoraPatch:
    """The callable attached to a Linear: one LoRA layer at one strength."""

    __slots__ = ("layer", "strength")

    def __init__(self, layer: LoraLayer, strength: float):
        self.layer = layer
        self.strength = float(strength)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.layer.add_to(x, y, self.strength)

    def constant_term(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The input-independent part of what this patch adds (``strength * diff_b``), or None:
        see ``Linear.constant_term``."""
        if self.layer.diff_b is None:
            return None
        _, bias = self.layer._ready(torch.device(device), dtype)
        return bias * self.strength

    def __repr__(self) -> str:
        return f"LoraPatch({self.layer.kind}, rank={self.layer.rank}, strength={self.strength})"


@dataclass(eq=False)
class LoraWeights:
    """A parsed LoRA file: Linear name -> ``LoraLayer``."""

    source: str
    format: str
    layers: dict[str, LoraLayer]
    ignored: list[str] = field(default_factory=list)

    def release_device_copies(self) -> None:
        """Drop the per-device copies made on first use (e.g. after offloading the model)."""
        for layer in self.layers.values():
            layer._cache.clear()


def _patched_layers(module: nn.Module) -> list[LoraLayer]:
    """The LoRA layers attached to ``module``'s Linears, each once."""
    layers: dict[int, LoraLayer] = {}
    for mod in module.modules():
        for patch in (getattr(mod, "patches", None) or {}).values():
            if isinstance(patch, LoraPatch):
                layers.setdefault(id(patch.layer), patch.layer)
    return list(layers.values())


def device_copy_bytes(module: nn.Module) -> int:
    """Bytes the LoRAs patched into ``module`` hold on compute devices (anything but the CPU).

    Each LoRA layer copies its factors (LoHa / LoKr: its whole dense delta) to the device and
    dtype of its first input and keeps them there for the next step. That memory belongs to the
    model while it is resident: add it to the model's size wherever memory is accounted."""
    return sum(layer.device_copy_bytes() for layer in _patched_layers(module))


def release_device_copies(module: nn.Module) -> None:
    """Free every device copy counted by ``device_copy_bytes(module)`` (idempotent). The next
    forward on a device rebuilds what it needs. ``host_memory.move`` calls this when a model
    goes to the CPU, so an evicted model leaves no LoRA memory behind on the GPU."""
    for layer in _patched_layers(module):
        layer.release_device_copies()


def named_linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def check_fits(weights: LoraWeights, linears: dict[str, nn.Linear]) -> None:
    """Every layer of ``weights`` exists in ``linears`` with the same shape and takes patches."""
    for name, layer in weights.layers.items():
        lin = linears.get(name)
        if lin is None:
            raise WeightFileError(
                weights.source, f"targets layer {name}, which this model does not have.", "a LoRA parsed for this model"
            )
        if (lin.in_features, lin.out_features) != (layer.in_features, layer.out_features):
            raise WeightFileError(
                weights.source,
                f"layer {name} is [{layer.out_features}, {layer.in_features}] in the LoRA but "
                f"[{lin.out_features}, {lin.in_features}] in the model.",
                "a LoRA parsed for this model",
            )
        if not hasattr(lin, "add_patch"):
            raise ValueError(f"layer {name} is a plain torch.nn.Linear; LoRA patches need core.layers.linear.Linear")


def apply_loras(module: nn.Module, applications) -> None:
    """Make every Linear of ``module`` carry exactly the LoRA patches of ``applications``.

    ``applications`` is a list of ``(LoraWeights, strength)``. Patches from earlier calls that
    are not wanted any more are removed; unchanged ones are kept (with their device copies).
    Strength 0 and an empty list leave the model as it is without LoRA. Everything is checked
    before the first patch changes, so a bad application leaves the model untouched.
    """
    linears = named_linears(module)
    wanted: dict[str, dict[str, tuple[LoraLayer, float]]] = defaultdict(dict)
    for i, app in enumerate(applications):
        try:
            weights, strength = app
        except (TypeError, ValueError):
            raise ValueError(f"LoRA application {i} should be (LoraWeights, strength), got {app!r}") from None
        if not isinstance(weights, LoraWeights):
            raise ValueError(f"LoRA application {i} should start with a LoraWeights, got {type(weights).__name__}")
        strength = float(strength)
        if not math.isfinite(strength):
            raise ValueError(f"LoRA strength for {weights.source} must be a finite number, got {strength}")
        check_fits(weights, linears)
        if strength == 0.0:
            continue
        patch_name = f"{PATCH_PREFIX}{i}:{weights.source}"
        for name, layer in weights.layers.items():
            wanted[name][patch_name] = (layer, strength)

    for name, lin in linears.items():
        patches = getattr(lin, "patches", None)
        if patches is None:
            continue
        want = wanted.get(name, {})
        stale = [p for p in patches if p.startswith(PATCH_PREFIX) and p not in want]
        fresh = {}
        for patch_name, (layer, strength) in want.items():
            current = patches.get(patch_name)
            if not (isinstance(current, LoraPatch) and current.layer is layer and current.strength == strength):
                fresh[patch_name] = LoraPatch(layer, strength)
        if stale or fresh:
            fold.restore(lin)  # the weight must not keep a delta its patches no longer describe
        for patch_name in stale:
            lin.remove_patch(patch_name)
        for patch_name, patch in fresh.items():
            lin.add_patch(patch_name, patch)
