"""Shared helpers for the GPU benchmarks: full-size models with random weights built directly on
the device, weight-format conversions (fp8, GGUF types), CUDA-event timing, peak memory, tables.

Every benchmark has a ``--smoke`` mode (tiny shapes, CPU, a few seconds) that only proves the
script runs; its numbers mean nothing and are labelled so. Real numbers come from a GPU run and
go into bench/RESULTS.md with the header line ``environment()`` prints.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import os
import re
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 1 << 30


# -- the pack ---------------------------------------------------------------------------------

def pack(name: str):
    """``qwenimage_pack.<name>`` without running the pack's ComfyUI-facing ``__init__``."""
    if "qwenimage_pack" not in sys.modules:
        pkg = types.ModuleType("qwenimage_pack")
        pkg.__path__ = [str(ROOT)]
        sys.modules["qwenimage_pack"] = pkg
    return importlib.import_module(f"qwenimage_pack.{name}")


# -- arguments --------------------------------------------------------------------------------

def base_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs, numbers are meaningless")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--text-tokens", type=int, default=None)
    add_output_args(p)
    return p


def add_output_args(p: argparse.ArgumentParser) -> None:
    """The GPU check's outputs (bench/gpu_check.sh): measurements as JSON, profiles of misses."""
    p.add_argument("--json", default=None,
                   help="also write the measurements here as JSON (rewritten after each one: a run stopped at a time "
                        "limit keeps what it measured)")
    p.add_argument("--profile-dir", default=None,
                   help="a measurement that misses its target gets a torch.profiler table of its top kernels here")


def finish_args(args, warmup: int = 2, iters: int = 5, text_tokens: int = 128):
    """Fill defaults that depend on ``--smoke``."""
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    args.device = torch.device(args.device)
    if args.warmup is None:
        args.warmup = 0 if args.smoke else warmup
    if args.iters is None:
        args.iters = 1 if args.smoke else iters
    if args.text_tokens is None:
        args.text_tokens = 8 if args.smoke else text_tokens
    return args


def mmdit_config(smoke: bool, layers: int | None = None):
    """The full 20 B configuration, or a tiny one whose widths still suit 256-value K-quant blocks."""
    mmdit = pack("core.models.mmdit")
    if smoke:
        return mmdit.MMDiTConfig(num_layers=layers or 2, attention_head_dim=128, num_attention_heads=2,
                                 joint_attention_dim=64, axes_dims_rope=(16, 56, 56))
    return mmdit.MMDiTConfig(num_layers=layers or 60)


def smoke_note(args) -> str:
    return "  [smoke run: tiny shapes on the CPU, the numbers mean nothing]" if args.smoke else ""


# -- random weights ---------------------------------------------------------------------------

@torch.no_grad()
def init_weights(model: torch.nn.Module, device) -> None:
    """Same values for the same parameter name (seeded by name); sane magnitudes; norms at 1."""
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        if p.ndim == 1 and ("norm" in name or name.endswith("gamma")):
            p.fill_(1.0)
        elif p.ndim == 1:
            p.normal_(0.0, 0.02, generator=g)
        else:
            fan_in = p[0].numel()
            p.normal_(0.0, fan_in**-0.5, generator=g)


def materialize(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """A model built on the meta device -> real random weights on ``device`` (no host copy)."""
    model = model.to(dtype=dtype).to_empty(device=device)
    init_weights(model, device)
    return model.eval()


def build_mmdit(cfg, device, dtype=torch.bfloat16):
    mmdit = pack("core.models.mmdit")
    with torch.device("meta"):
        model = mmdit.QwenImageMMDiT(cfg)
    model = materialize(model, device, dtype)
    model.compute_dtype = dtype
    return model


def block_linears(model) -> list[tuple[str, torch.nn.Module]]:
    Linear = pack("core.layers.linear").Linear
    return [(f"transformer_blocks.{n}", m) for n, m in model.transformer_blocks.named_modules() if isinstance(m, Linear)]


@torch.no_grad()
def to_fp8(model) -> None:
    """Block Linear weights -> float8_e4m3fn with a per-tensor scale (amax / 448), as the loader's
    ``weight_dtype=fp8_e4m3fn`` stores them; the rest stays as it is."""
    for _, lin in block_linears(model):
        w = lin.weight.detach()
        scale = (w.abs().amax().float() / 448).clamp_min(1e-12)
        q = (w.float() / scale).clamp_(-448, 448).to(torch.float8_e4m3fn)
        lin.weight = torch.nn.Parameter(q, requires_grad=False)
        lin.set_scale(scale)


# GGUF: byte offsets of the fp16 scale fields per type, and how far one unit of the fp16 scale
# reaches in decoded values (so random blocks decode to about the wanted magnitude).
_K_FIELDS = {"Q4_K": ((0, 2), 945), "Q5_K": ((0, 2), 1953), "Q6_K": ((208,), 4096), "Q3_K": ((108,), 128),
             "Q2_K": ((80, 82), 45)}
_TEMPLATE_ROWS = 256


def _gguf_type(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def quantized_rows(qname: str, rows: int, cols: int, seed: int, device) -> torch.Tensor:
    """uint8 ``[rows, bytes_per_row]`` of GGUF type ``qname`` with weights of size ~1/sqrt(cols).

    Q8_0 / Q4_0 / ...: gguf-py quantizes a random template; K-quants: valid random blocks built
    byte by byte (gguf-py cannot write them). A template of up to 256 rows is tiled to ``rows``:
    speed depends on the bytes' layout, not their values, and it keeps setup to seconds."""
    from gguf import GGML_QUANT_SIZES, quants

    qtype = _gguf_type(qname)
    block, type_size = GGML_QUANT_SIZES[qtype]
    t_rows = min(rows, _TEMPLATE_ROWS)
    rng = np.random.default_rng(seed)
    magnitude = 2.0 / np.sqrt(cols)
    if qname in _K_FIELDS:
        offsets, span = _K_FIELDS[qname]
        raw = rng.integers(0, 256, size=(t_rows * cols // block, type_size), dtype=np.uint8)
        d = (rng.uniform(0.5, 1.0, size=raw.shape[0]) * magnitude / span).astype(np.float16)
        for off in offsets:
            raw[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
        raw = raw.reshape(t_rows, -1)
    else:
        values = rng.standard_normal((t_rows, cols), dtype=np.float32) * (magnitude / 2)
        raw = quants.quantize(values, qtype)
    template = torch.from_numpy(np.ascontiguousarray(raw)).to(device)
    reps = -(-rows // t_rows)
    return template.repeat(reps, 1)[:rows].contiguous()


def q4_k_m_type(name: str, layer: int) -> str:
    """A Q4_K_M-like mix: llama.cpp gives attention V and (every other layer's) MLP down Q6_K."""
    if name.endswith(("attn.to_v", "attn.add_v_proj")) or (name.endswith("net.2") and layer % 2 == 0):
        return "Q6_K"
    return "Q4_K"


@torch.no_grad()
def to_gguf(model, scheme: str, seed: int = 0) -> dict[str, int]:
    """Block Linear weights -> GGUF blocks of ``scheme`` (a type name, or "Q4_K_M" for the mix);
    non-block tensors stay dense as in real files. Returns the count of each type used."""
    counts: dict[str, int] = {}
    templates: dict[tuple, torch.Tensor] = {}
    for name, lin in block_linears(model):
        layer = int(name.split(".")[1])
        qname = q4_k_m_type(name, layer) if scheme == "Q4_K_M" else scheme
        device = lin.weight.device
        shape = (lin.out_features, lin.in_features)
        key = (qname, shape)
        if key not in templates:
            templates[key] = quantized_rows(qname, *shape, seed=seed + len(templates), device=device)
        lin.set_quantized(templates[key].clone(), int(_gguf_type(qname)), shape)
        lin.set_scale(None)
        counts[qname] = counts.get(qname, 0) + 1
    return counts


def module_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + [b for b in module.buffers() if b is not None]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# -- inputs, timing, memory --------------------------------------------------------------------

def mmdit_inputs(cfg, size: int, batch: int, text_tokens: int, device, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed + size * 10 + batch)
    lat = size // 8
    x = torch.randn(batch, cfg.out_channels, lat, lat, generator=g, device=device).to(dtype)
    context = torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g, device=device).to(dtype)
    sigma = torch.full((batch,), 0.6, device=device)
    return x, sigma, context


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, warmup: int = 2, iters: int = 5):
    """Mean seconds per call (CUDA events on the GPU, wall clock elsewhere) and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    iters = max(1, iters)
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            out = fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000 / iters, out
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    return (time.perf_counter() - t0) / iters, out


def wall(fn, device):
    """Seconds for one call, synchronized on both ends, and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> int | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


@contextlib.contextmanager
def memory_cap(device, gib: float | None):
    """Cap this process's CUDA allocations at ``gib`` GiB (an 8-24 GB card on a bigger GPU).
    No-op on the CPU or with ``gib`` None. Caching-allocator memory only (the CUDA context's
    few hundred MB come on top, as on a real card)."""
    device = torch.device(device)
    if device.type != "cuda" or gib is None:
        yield
        return
    free(device)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), device)
    reset_peak(device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        free(device)


def free(device=None) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def cos_sim(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def fmt_gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


# -- reporting --------------------------------------------------------------------------------

def _git(*cmd: str) -> str:
    try:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device) -> str:
    """The header line RESULTS.md wants: date, GPU, commit, command."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+uncommitted changes"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else Path("?")
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    command = "python " + " ".join([str(script)] + sys.argv[1:])
    return f"date {date} | GPU {gpu} | torch {torch.__version__} | commit {commit} | command: {command}"


class Record:
    """One script's measurements for bench/gpu_summary.py: ``put(name, **values)`` saves the
    JSON file at once (atomically), so a script stopped at its time limit leaves what it did."""

    def __init__(self, path, device, **fields):
        self.path = Path(path) if path else None
        device = torch.device(device)
        self.data = {"script": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "?",
                     "environment": environment(device),
                     "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "rows": {}, **fields}
        self.save()

    def put(self, name: str, **values) -> None:
        self.data["rows"].setdefault(name, {}).update(values)
        self.save()

    def set(self, **fields) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, self.path)


def profile_table(fn, device, rows: int = 25) -> str:
    """One call of ``fn`` under torch.profiler: its operators and kernels by self device time
    (CPU time on the CPU), as torch prints them."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.key_averages()
    for key in (["self_device_time_total", "self_cuda_time_total"] if cuda else ["self_cpu_time_total"]):
        try:
            return events.table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, ValueError):
            continue
    return events.table(row_limit=rows)


def profile_miss(args, name: str, fn, device, title: str) -> str | None:
    """For a measurement that missed its target: the profile of one more call, written to
    ``--profile-dir``/profile_<name>.txt (a profiler failure is written there instead)."""
    if not getattr(args, "profile_dir", None):
        return None
    path = Path(args.profile_dir) / f"profile_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        text = profile_table(fn, device)
    except Exception as e:  # noqa: BLE001 - a profile is extra information, never the reason a run fails
        text = f"profiling failed: {type(e).__name__}: {e}"
    path.write_text(f"{title}\n{environment(device)}\n\n{text}\n", encoding="utf-8")
    print(f"  profile of {name} (missed its target): {path}", flush=True)
    return str(path)


def prepare_fused(model) -> None:
    """Register the model's GGUF weight shapes for the compiled dequantization kernels, where
    gguf_kernels decides from the model what to compile (``prepare``); no-op otherwise."""
    prepare = getattr(pack("core.quant.gguf_kernels"), "prepare", None)
    if prepare is not None:
        prepare(model)


def print_table(title: str, header: list[str], rows: list[list[str]], notes: list[str] = ()) -> str:
    """Print a Markdown table (RESULTS.md takes it as is) and return its text."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [f"\n{title}", "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines += [f"- {n}" for n in notes]
    text = "\n".join(lines)
    print(text, flush=True)
    return text
