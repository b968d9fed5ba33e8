"""LoRA files -> additive patches on a model's Linear layers.

A LoRA never touches a stored weight: each targeted ``Linear`` gets a patch ``fn(x, y) -> y``
that adds ``strength * delta(x)`` after the base matmul, so the same file works on bf16, fp8
and GGUF weights, and changing or removing it needs no reload.

    sd = load_lora_file(path)
    weights = parse_lora(sd, model, path)
    apply_loras(model, [(weights, 1.0)])   # later: apply_loras(model, []) removes it

Supported per layer: plain LoRA (down/up/alpha), LyCORIS LoHa and LoKr (non-Tucker), full
weight diffs (``diff``) and bias diffs (``diff_b``). DoRA magnitudes are ignored with a warning,
as diffusers does.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fold as lora_bake
from ..errors import WeightFileError
from ..keymaps.lora import (
    FORMAT_NAMES,
    LayerNames,
    guess_other_model,
    key_format,
    looks_like_text_encoder,
    split_key,
)

PATCH_PREFIX = "lora:"
_KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "diff": "weight diff", "bias": "bias diff"}
_EXPECTED_FILE = "a LoRA for Qwen-Image saved as .safetensors"


class LoraStateDict(dict):
    """The tensors of a LoRA file; ``metadata`` holds the file's string metadata."""

    metadata: dict[str, str] = {}


def load_lora_file(path) -> LoraStateDict:
    """Read every tensor of a ``.safetensors`` LoRA onto the CPU. Pickles are never opened."""
    from safetensors import safe_open

    from ..formats.safetensors_io import is_gguf, read_header

    path = os.fspath(path)
    if os.path.isfile(path) and is_gguf(path):
        raise WeightFileError(path, "is a GGUF file; LoRAs are not read from GGUF.", _EXPECTED_FILE)
    # Checks the header by hand first: pickles, truncation and junk get a readable message.
    infos, metadata = read_header(path)
    if not infos:
        raise WeightFileError(path, "contains no tensors.", _EXPECTED_FILE)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = LoraStateDict((k, f.get_tensor(k)) for k in infos)
    except Exception as e:  # the header was valid, so this is an I/O problem or damaged data
        raise WeightFileError(path, f"could not be read ({type(e).__name__}: {e}).", _EXPECTED_FILE) from e
    tensors.metadata = metadata
    return tensors


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


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


class _PeftScales:
    """alpha / r from the JSON config diffusers and PEFT store in a file's metadata.

    PEFT files carry no alpha tensors; without this config their scale is 1.
    """

    def __init__(self, metadata: dict | None):
        self.config = None
        raw = (metadata or {}).get("lora_adapter_metadata")
        if not raw:
            return
        try:
            cfg = json.loads(raw)
        except ValueError:
            return
        if not isinstance(cfg, dict):
            return
        # Pipeline-level saves prefix each field with the component name.
        if any(k.startswith("transformer.") for k in cfg):
            cfg = {k[len("transformer."):]: v for k, v in cfg.items() if k.startswith("transformer.")}
        self.config = cfg

    @staticmethod
    def _pattern(patterns, name):
        for key, value in (patterns or {}).items():
            try:
                if re.match(rf"(.*\.)?({key})$", name):
                    return value
            except re.error:
                continue
        return None

    def scale(self, name: str, rank: int | None) -> float | None:
        cfg = self.config
        if not cfg:
            return None
        alpha = self._pattern(cfg.get("alpha_pattern"), name)
        if alpha is None:
            alpha = cfg.get("lora_alpha", cfg.get("alpha"))
        r = self._pattern(cfg.get("rank_pattern"), name) or cfg.get("r") or rank
        if alpha is None or not r:
            return None
        return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else float(r))


class _LayerBuilder:
    """Turns the tensors one file has for one Linear into a checked ``LoraLayer``."""

    def __init__(self, name: str, group: dict, lin: nn.Linear, source: str):
        self.name, self.lin, self.source = name, lin, source
        self.out_f, self.in_f = lin.out_features, lin.in_features
        self.t = {role: tensor for role, (key, tensor) in group.items()}
        self.k = {role: key for role, (key, tensor) in group.items()}

    def error(self, problem: str, expected: str):
        raise WeightFileError(self.source, problem, expected)

    def mismatch(self, detail: str, expected: str):
        self.error(
            f"layer {self.name} does not fit the model: {detail}, but the model's layer is "
            f"[{self.out_f}, {self.in_f}] (out, in). The LoRA may be for another model or model size.",
            expected,
        )

    def matrix(self, role: str) -> torch.Tensor:
        t = self.t[role]
        if t.ndim == 4 and t.shape[2:] == (1, 1):  # some trainers save Linear factors as 1x1 convs
            t = t[:, :, 0, 0]
        if t.ndim != 2:
            self.error(f"tensor {self.k[role]} has shape {tuple(t.shape)}.", "a 2-D matrix for a Linear layer")
        return t

    def kind(self) -> str | None:
        roles = self.t
        kinds = {
            kind
            for kind, present in (
                ("lora", "down" in roles or "up" in roles),
                ("loha", any(r.startswith("hada_") for r in roles)),
                ("lokr", any(r.startswith("lokr_") for r in roles)),
                ("diff", "diff" in roles),
            )
            if present
        }
        if len(kinds) > 1:
            self.error(f"layer {self.name} mixes {' and '.join(sorted(kinds))} tensors.", "one adapter kind per layer")
        return kinds.pop() if kinds else None

    def alpha(self) -> float | None:
        a = self.t.get("alpha")
        if a is None:
            return None
        if a.numel() != 1:
            self.error(f"{self.k['alpha']} has {a.numel()} values.", "a scalar alpha")
        return float(a.float().item())

    def build(self, peft: _PeftScales) -> LoraLayer | None:
        kind = self.kind()
        layer = LoraLayer(self.in_f, self.out_f, kind)
        if kind is not None:
            getattr(self, "_" + kind)(layer)
        if "diff_b" in self.t:
            b = self.t["diff_b"].reshape(-1)
            if b.numel() != self.out_f or self.lin.bias is None:
                self.mismatch(f"diff_b has {b.numel()} values", f"a bias delta of {self.out_f} values on a biased layer")
            layer.diff_b = b
        elif kind is None:
            return None
        alpha = self.alpha()
        if kind in ("diff", None):
            layer.scale = 1.0
        elif alpha is not None and layer.rank:
            layer.scale = alpha / layer.rank
        else:
            # No alpha tensor: PEFT's config decides, else the scale is 1 (alpha == rank).
            scale = peft.scale(self.name, layer.rank)
            layer.scale = 1.0 if scale is None else scale
        return layer

    def _lora(self, layer: LoraLayer) -> None:
        for have, need in (("down", "up"), ("up", "down")):
            if need not in self.t:
                self.error(f"{self.k[have]} has no matching {need} tensor.", "lora_down/lora_up (lora_A/lora_B) in pairs")
        down, up = self.matrix("down"), self.matrix("up")
        if down.shape[1] != self.in_f or up.shape[0] != self.out_f or up.shape[1] != down.shape[0]:
            self.mismatch(
                f"down is {tuple(down.shape)} and up is {tuple(up.shape)}",
                f"down [rank, {self.in_f}] and up [{self.out_f}, rank]",
            )
        layer.down, layer.up, layer.rank = down, up, down.shape[0]

    def _loha(self, layer: LoraLayer) -> None:
        needed = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        missing = [r for r in needed if r not in self.t]
        if missing:
            self.error(f"LoHa layer {self.name} lacks {', '.join(missing)}.", "hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b")
        if "hada_t1" in self.t or "hada_t2" in self.t:
            self.error(f"LoHa layer {self.name} has Tucker factors (hada_t1/t2), used only by convs.", "plain factors")
        f = {r: self.matrix(r) for r in needed}
        fits = all(
            f[a].shape[0] == self.out_f and f[b].shape[1] == self.in_f and f[a].shape[1] == f[b].shape[0]
            for a, b in (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b"))
        )
        if not fits:
            self.mismatch(
                ", ".join(f"{r} is {tuple(v.shape)}" for r, v in f.items()),
                f"hada_w*_a [{self.out_f}, r] and hada_w*_b [r, {self.in_f}]",
            )
        # LyCORIS divides alpha by the first Hadamard factor's rank.
        layer.factors, layer.rank = f, f["hada_w1_b"].shape[0]

    def _lokr(self, layer: LoraLayer) -> None:
        if "lokr_t2" in self.t:
            self.error(f"LoKr layer {self.name} has a Tucker factor (lokr_t2), used only by convolutions.", "plain factors")
        dims = []
        for w in ("w1", "w2"):
            if f"lokr_{w}" in self.t:
                m = layer.factors[w] = self.matrix(f"lokr_{w}")
                dims.append(tuple(m.shape))
            elif f"lokr_{w}_a" in self.t and f"lokr_{w}_b" in self.t:
                a, b = self.matrix(f"lokr_{w}_a"), self.matrix(f"lokr_{w}_b")
                if a.shape[1] != b.shape[0]:
                    self.mismatch(
                        f"lokr_{w}_a is {tuple(a.shape)} and lokr_{w}_b is {tuple(b.shape)}",
                        f"lokr_{w}_a [m, r] and lokr_{w}_b [r, n]",
                    )
                layer.factors[w + "_a"], layer.factors[w + "_b"] = a, b
                dims.append((a.shape[0], b.shape[1]))
                # LyCORIS divides alpha by the rank of the split factor (w2's when both are split);
                # with both factors full, alpha is ignored.
                layer.rank = b.shape[0]
            else:
                self.error(f"LoKr layer {self.name} lacks lokr_{w} (or lokr_{w}_a and lokr_{w}_b).", "both LoKr factors")
        if dims[0][0] * dims[1][0] != self.out_f or dims[0][1] * dims[1][1] != self.in_f:
            self.mismatch(
                f"its Kronecker factors are {dims[0]} and {dims[1]}",
                f"factors whose shapes multiply to [{self.out_f}, {self.in_f}]",
            )

    def _diff(self, layer: LoraLayer) -> None:
        d = self.matrix("diff")
        if tuple(d.shape) != (self.out_f, self.in_f):
            self.mismatch(f"diff is {tuple(d.shape)}", f"diff [{self.out_f}, {self.in_f}]")
        layer.factors = {"weight": d}


def parse_lora(state_dict: dict, module: nn.Module, source_name, metadata: dict | None = None) -> LoraWeights:
    """Map a LoRA state dict onto ``module``'s Linear layers (names = diffusers keys).

    ``metadata`` defaults to the file metadata ``load_lora_file`` attached. Nothing in
    ``module`` is changed. Raises ``WeightFileError`` for a LoRA of another model, one whose
    shapes do not fit, or one with no usable layer; warns once about keys it had to skip.
    """
    source = os.fspath(source_name) if source_name is not None else "<memory>"
    if metadata is None:
        metadata = getattr(state_dict, "metadata", None)
    linears = _linears(module)
    names = LayerNames(linears)
    groups: dict[str, dict] = defaultdict(dict)
    unresolved: dict[str, list[str]] = defaultdict(list)
    unknown: list[str] = []
    formats: set[str] = set()
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise WeightFileError(source, f"entry {key!r} is not a tensor.", _EXPECTED_FILE)
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        path, role = split
        target = names.resolve(path)
        if target is None:
            unresolved[path].append(key)
            continue
        group = groups[target]
        if role in group:
            raise WeightFileError(
                source, f"has two {role} tensors for layer {target}: {group[role][0]} and {key}.", "one adapter per file"
            )
        group[role] = (key, tensor)
        if role != "alpha":  # kohya-style alphas sit next to PEFT-style factors in some files
            formats.add(key_format(key))

    other = guess_other_model(unresolved)
    if other:
        examples = ", ".join(list(unresolved)[:3])
        raise WeightFileError(
            source,
            f"looks like {other}, not a Qwen-Image LoRA: {len(unresolved)} of its layers do not exist "
            f"in Qwen-Image (e.g. {examples}).",
            _EXPECTED_FILE,
        )
    if not groups:
        if not unresolved:
            problem = (
                "has no LoRA tensors (no lora_down/lora_up, lora_A/lora_B, LoHa or LoKr keys; "
                f"first keys: {', '.join(unknown[:3])})."
            )
        elif looks_like_text_encoder(unresolved):
            problem = "only has text-encoder layers; it adds nothing to the Qwen-Image diffusion model."
        else:
            examples = ", ".join(list(unresolved)[:3])
            problem = f"matches no layer of this Qwen-Image model ({len(unresolved)} layers, e.g. {examples})."
        raise WeightFileError(source, problem, _EXPECTED_FILE)

    peft = _PeftScales(metadata)
    layers: dict[str, LoraLayer] = {}
    skipped: list[str] = []
    for target, group in groups.items():
        layer = _LayerBuilder(target, group, linears[target], source).build(peft)
        skipped += [group[r][0] for r in ("dora", "mid", "lora_bias") if r in group]
        if layer is None:
            skipped += [key for key, _ in group.values() if key not in skipped]
        else:
            layers[target] = layer
    if not layers:
        raise WeightFileError(
            source, "has no LoRA layer that can be applied (only unsupported tensors such as DoRA scales).", _EXPECTED_FILE
        )

    ignored = unknown + [k for keys in unresolved.values() for k in keys] + skipped
    if ignored:
        has_dora = any("dora" in group for group in groups.values())
        note = " DoRA magnitudes are not supported and were dropped, as diffusers does." if has_dora else ""
        warnings.warn(
            f"{source}: {len(ignored)} of {len(state_dict)} LoRA tensors were not applied (no such Linear layer in "
            f"the model, or an unsupported kind), e.g. {', '.join(ignored[:5])}.{note}",
            stacklevel=2,
        )
    kinds = sorted({_KIND_NAMES[layer.kind or "bias"] for layer in layers.values()})
    fmt = " + ".join(FORMAT_NAMES[f] for f in sorted(formats))
    return LoraWeights(source, f"{fmt} {'/'.join(kinds)}", layers, ignored)


def _check_fits(weights: LoraWeights, linears: dict[str, nn.Linear]) -> None:
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
    linears = _linears(module)
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
        _check_fits(weights, linears)
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
        if (stale or fresh) and getattr(lin, "baked", None):
            lora_bake.restore(lin)  # the weight must not keep a delta its patches no longer describe
        for patch_name in stale:
            lin.remove_patch(patch_name)
        for patch_name, patch in fresh.items():
            lin.add_patch(patch_name, patch)


def lora_summary(weights: LoraWeights) -> str:
    """One line for display: file, format, rank(s), layer count."""
    ranks = sorted({layer.rank for layer in weights.layers.values() if layer.rank})
    if not ranks:
        rank_text = "full-rank"
    elif len(ranks) == 1:
        rank_text = f"rank {ranks[0]}"
    else:
        rank_text = f"ranks {ranks[0]}-{ranks[-1]}"
    n = len(weights.layers)
    text = f"{os.path.basename(weights.source)}: {weights.format}, {rank_text}, {n} layer{'s' if n != 1 else ''}"
    if weights.ignored:
        text += f", {len(weights.ignored)} tensors ignored"
    return text
