#!/usr/bin/env python
"""CPU: loading a bf16 MMDiT file with ``weight_dtype=fp8_e4m3fn`` (time, memory, the file's mapping).

Writes a synthetic bf16 safetensors MMDiT (random values, real key names; ``--size-mib`` of
transformer blocks, ``--dim`` wide) and loads it, each way in a fresh process so the memory
counters start clean:

- ``load_mmdit fp8``: the pack's loader (block Linear weights to float8 with a per-tensor scale);
- ``plain cast``: what ComfyUI's fp8 weight dtype amounts to, each block weight cast to float8
  with no scale and the other tensors copied: the speed to beat.

Columns: wall seconds; the peak resident memory during the load (VmHWM, file pages included);
the process's anonymous memory (RssAnon: what the load costs in RAM) and
file-backed resident memory (RssFile) after the load; whether the source file is still mapped
(``/proc/self/maps``) and how much of it is resident in this process (``/proc/self/smaps``).
A mapping left behind keeps the whole file's pages counted against the process and pinned in
its address space although the converted model no longer reads them.

The file is read from the page cache (it was just written): disk speed is not measured.

    python bench/bench_fp8_convert.py                     # 256 MiB file
    python bench/bench_fp8_convert.py --size-mib 8192 --dim 3072
    python bench/bench_fp8_convert.py --threads 1     # steadier numbers on a busy machine
    python bench/bench_fp8_convert.py --smoke
"""
from __future__ import annotations

try:
    from . import common
except ImportError:  # run as a script
    import common

import gc
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {"ours": "load_mmdit fp8", "plain": "plain cast (ComfyUI-like)"}
MIB = 1 << 20


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--size-mib", type=int, default=None, help="bytes of transformer blocks (default 256; smoke 4)")
    p.add_argument("--dim", type=int, default=None, help="model width, a multiple of 128 (default 1024; smoke 256)")
    p.add_argument("--file", default=None, help="load this file instead of writing a synthetic one")
    p.add_argument("--repeat", type=int, default=None, help="loads per variant, the fastest reported (default 3; smoke 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the loading processes (default: torch's)")
    p.add_argument("--child", choices=sorted(VARIANTS), default=None, help=argparse_hidden())
    args = common.finish_args(p.parse_args(argv))
    args.size_mib = args.size_mib or (4 if args.smoke else 256)
    args.dim = args.dim or (256 if args.smoke else 1024)
    args.repeat = max(1, args.repeat or (1 if args.smoke else 3))
    if args.dim % 128:
        raise SystemExit("--dim must be a multiple of 128")
    return args


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


# -- the synthetic file ------------------------------------------------------------------------

def mmdit_config(dim: int, size_bytes: int):
    mmdit = common.pack("core.models.mmdit")
    one = mmdit.MMDiTConfig(num_layers=1, num_attention_heads=dim // 128, joint_attention_dim=dim)
    with torch.device("meta"):
        block = mmdit.QwenImageMMDiT(one).transformer_blocks[0]
    per_block = sum(p.numel() * 2 for p in block.parameters())
    layers = max(1, round(size_bytes / per_block))
    return mmdit.MMDiTConfig(num_layers=layers, num_attention_heads=dim // 128, joint_attention_dim=dim)


def write_synthetic(path: Path, cfg) -> int:
    """A bf16 safetensors file with the MMDiT's keys, written tensor by tensor (no second copy
    of the model in memory). Values: one random buffer reused (load speed does not depend on
    them); norms at 1."""
    mmdit = common.pack("core.models.mmdit")
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in mmdit.QwenImageMMDiT(cfg).state_dict().items()}
    header, offset = {}, 0
    for name, shape in names.items():
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    pool = (torch.randn(16 * MIB, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in names.items():
            numel = header[name]["data_offsets"][1] // 2 - header[name]["data_offsets"][0] // 2
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight",
                              "txt_norm.weight")):
                data = torch.ones(numel, dtype=torch.bfloat16)
            else:
                data = pool[:numel] if numel <= pool.numel() else pool.repeat(-(-numel // pool.numel()))[:numel]
            f.write(data.view(torch.uint8).numpy().tobytes())
    return offset


# -- one load, measured in its own process -----------------------------------------------------

def proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def file_mapping(path: Path) -> tuple[int, int]:
    """(bytes of address space mapping ``path``, bytes of it resident) from /proc/self/smaps."""
    target = str(path.resolve())
    size = rss = 0
    current = False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                current = len(head) >= 6 and head[5] == target
            elif current and head[0] == "Size:":
                size += int(head[1]) * 1024
            elif current and head[0] == "Rss:":
                rss += int(head[1]) * 1024
    return size, rss


def plain_cast(path: Path) -> dict:
    """Each block weight -> float8 with no scale, everything else copied (ComfyUI's fp8 dtype)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.startswith("transformer_blocks.") and key.endswith(".weight") and t.dim() == 2:
                out[key] = torch.empty(t.shape, dtype=torch.float8_e4m3fn).copy_(t)
            else:
                out[key] = t.clone()
            del t
    return out


def child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.file)
    load = common.pack("core.loading.load")
    common.pack("core.models.mmdit")  # imports outside the timing
    import safetensors.torch  # noqa: F401
    t0 = time.perf_counter()
    if args.child == "ours":
        model = load.load_mmdit(path, weight_dtype="fp8_e4m3fn")
    else:
        model = plain_cast(path)
    seconds = time.perf_counter() - t0
    gc.collect()
    mapped, resident = file_mapping(path)
    print(json.dumps({"seconds": seconds, **proc_status(), "mapped": mapped, "mapped_rss": resident}))
    del model


def fmt_mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB"


def run_child(variant: str, path: Path, threads: int | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--file", str(path), "--device", "cpu"]
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} load failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    print(common.environment("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        if args.file:
            path = Path(args.file)
            size = path.stat().st_size
            cfg_note = f"file {path.name}"
        else:
            cfg = mmdit_config(args.dim, args.size_mib * MIB)
            path = Path(tmp) / "mmdit_bf16.safetensors"
            size = write_synthetic(path, cfg)
            cfg_note = f"synthetic MMDiT, {cfg.num_layers} blocks of width {args.dim}"
        # Alternating variants, fastest of each (a shared machine's noise only ever adds time).
        runs = {v: [] for v in VARIANTS}
        for _ in range(args.repeat):
            for v in VARIANTS:
                runs[v].append(run_child(v, path, args.threads))
        results = {v: min(r, key=lambda x: x["seconds"]) for v, r in runs.items()}
    rows = []
    for v, r in results.items():
        rows.append([VARIANTS[v], f"{r['seconds']:.2f} s", fmt_mib(r["VmHWM"]), fmt_mib(r["RssAnon"]), fmt_mib(r["RssFile"]),
                     "yes" if r["mapped"] else "no", fmt_mib(r["mapped_rss"]) if r["mapped"] else "-"])
    ratio = results["ours"]["seconds"] / max(results["plain"]["seconds"], 1e-9)
    common.print_table(
        f"fp8 conversion at load (CPU, {size / 2**30:.2f} GiB bf16 {cfg_note}){common.smoke_note(args)}",
        ["load", "time", "peak RSS", "RssAnon after", "RssFile after", "file still mapped", "mapped resident"],
        rows,
        [f"load_mmdit takes {ratio:.2f}x the plain cast's time (fastest of {args.repeat} loads each)",
         f"torch threads {args.threads or torch.get_num_threads()}, {os.cpu_count()} CPUs; file read from the page cache"],
    )
    return results


if __name__ == "__main__":
    main()
