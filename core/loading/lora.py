"""LoRA files -> ``LoraWeights`` for a model (the patches themselves: ``layers/lora_patch.py``).

    sd = load_lora_file(path)
    weights = parse_lora(sd, model, path)
    apply_loras(model, [(weights, 1.0)])

Key layouts (kohya, diffusers / PEFT, LyCORIS, DiffSynth, ...) are named in ``keymaps/lora.py``.
Supported per layer: plain LoRA (down/up/alpha), LyCORIS LoHa and LoKr (non-Tucker), full
weight diffs and bias diffs. DoRA magnitudes are ignored with a warning, as diffusers does.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import defaultdict

import torch
import torch.nn as nn

from ..errors import WeightFileError
from ..formats.safetensors_io import is_gguf, read_header
from ..keymaps.lora import (
    FORMAT_NAMES,
    LayerNames,
    guess_other_model,
    key_format,
    looks_like_text_encoder,
    split_key,
)
from ..layers.lora_patch import LoraLayer, LoraWeights, named_linears

_KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "diff": "weight diff", "bias": "bias diff"}
_EXPECTED_FILE = "a LoRA for Qwen-Image saved as .safetensors"


class LoraStateDict(dict):
    """The tensors of a LoRA file; ``metadata`` holds the file's string metadata."""

    metadata: dict[str, str] = {}


def load_lora_file(path) -> LoraStateDict:
    """Read every tensor of a ``.safetensors`` LoRA onto the CPU. Pickles are never opened."""
    from safetensors import safe_open


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
    linears = named_linears(module)
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
