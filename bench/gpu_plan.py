#!/usr/bin/env python
"""The GPU check's plan: each step's time limit and estimate, and what travels to the GPU machine.

bench/gpu_check.sh takes every step's time limit from here (``--limit NAME``), so the plan
printed by ``--dry-run`` is the plan that runs. Estimates are for one H200 (minutes of device
time are scarce: a lent machine gets 15, its start included, at most 10 per command).

    python bench/gpu_plan.py                      # the plan
    python bench/gpu_plan.py --check --carry .whl .comfy   # and fail unless what travels fits
    python bench/gpu_plan.py --limit cuda-tests [--dry-run]

What travels (the device tool's rule): tracked files, untracked files git does not ignore, a
shared/ folder inside the checkout, and the carried (ignored) paths, at most 64 MiB together.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
TRAVEL_LIMIT_MIB = 64

# name, what it does, estimate on an H200 (s), limit (s), limit in a dry run on a CPU (s)
STEPS = (
    ("setup", "install the carried wheels, unpack ComfyUI", 15, 20, 30),
    ("cuda-tests", "1. CUDA paths and weight formats vs CPU references (pytest -m cuda)", 130, 155, 120),
    ("comfyui-dynamic", "2. ComfyUI 0.30 on CUDA, default flags (DynamicVRAM)", 40, 45, 60),
    ("comfyui-static", "2. ComfyUI 0.30 on CUDA, --disable-dynamic-vram", 40, 45, 60),
    ("bench-mmdit", "3. bf16 forward: ours, ComfyUI, diffusers, FLOP floor (1328^2, 1024^2)", 45, 50, 60),
    ("bench-fp8", "3. fp8 matmul vs bf16", 30, 35, 60),
    ("bench-gguf", "3. GGUF Q8_0 / Q4_0 / Q4_K / Q4_K_M vs bf16, peak VRAM", 45, 60, 60),
    ("bench-lora", "3. rank-64 LoRA additive / folded vs none", 35, 45, 60),
    ("bench-formats", "3. nvfp4 / mxfp8 / int8 layers, DFloat11 decode vs bf16", 35, 40, 90),
    ("bench-e2e", "3. end to end Lightning 4-step 1328^2, one cfg-4 step", 30, 35, 60),
    ("summary", "the table, packing", 3, 10, 30),
)


def limit_of(name: str, dry_run: bool) -> int:
    for step in STEPS:
        if step[0] == name:
            return step[4] if dry_run else step[3]
    raise SystemExit(f"gpu_plan: no step called {name!r}")


def plan_table() -> str:
    lines = ["| step | what | estimate (H200) | limit |", "|---|---|---|---|"]
    lines += [f"| {n} | {what} | {est} s | {limit} s |" for n, what, est, limit, _ in STEPS]
    est, limit = sum(s[2] for s in STEPS), sum(s[3] for s in STEPS)
    lines.append(f"| total | | {est} s ({est / 60:.1f} min) | {limit} s ({limit / 60:.1f} min) |")
    return "\n".join(lines)


def tree_files() -> list[Path]:
    """Tracked files and untracked files git does not ignore (what travels without ``carry``)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return [ROOT / p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]


def size_of(paths) -> tuple[int, int]:
    """(bytes, files) of the files under ``paths``; links count as links, as they travel."""
    total = count = 0
    for path in paths:
        if path.is_symlink() or path.is_file():
            total, count = total + path.lstat().st_size, count + 1
        elif path.is_dir():
            for folder, _dirs, files in os.walk(path):
                for f in files:
                    total, count = total + (Path(folder) / f).lstat().st_size, count + 1
    return total, count


def travel_report(carry: list[str]) -> tuple[bool, str]:
    """(fits and every carried path exists, text)."""
    tree_bytes, tree_count = size_of(p for p in tree_files() if p.exists() or p.is_symlink())
    lines = [f"- working tree (tracked + untracked, not ignored): {tree_bytes / MIB:.1f} MiB in {tree_count} files"]
    ok, total = True, tree_bytes
    shared = ROOT / "shared"
    if shared.is_dir():
        b, n = size_of([shared])
        total += b
        lines.append(f"- shared/: {b / MIB:.1f} MiB in {n} files")
    for name in carry:
        path = ROOT / name
        if not path.exists():
            ok = False
            lines.append(f"- carried {name}: MISSING (bench/gpu_prepare.sh makes it)")
            continue
        b, n = size_of([path])
        total += b
        lines.append(f"- carried {name}: {b / MIB:.1f} MiB in {n} files")
    if not carry:
        lines.append("- nothing carried: the GPU machine then lacks diffusers, gguf-py and ComfyUI (their checks skip)")
    fits = total <= TRAVEL_LIMIT_MIB * MIB
    ok = ok and fits
    lines.append(f"- total that travels: {total / MIB:.1f} MiB of {TRAVEL_LIMIT_MIB} MiB: {'fits' if fits else 'TOO BIG'}")
    return ok, "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", metavar="STEP", help="print STEP's time limit in seconds and exit")
    p.add_argument("--dry-run", action="store_true", help="with --limit: the dry run's limit")
    p.add_argument("--carry", nargs="*", default=[], help="carried paths, relative to the checkout")
    p.add_argument("--check", action="store_true", help="exit 1 unless the carried paths exist and everything fits")
    args = p.parse_args(argv)
    if args.limit:
        print(limit_of(args.limit, args.dry_run))
        return 0
    ok, travel = travel_report(args.carry)
    print("Plan: each step is killed at its limit; later steps still run.\n")
    print(plan_table())
    print("\nWhat travels to the GPU machine:")
    print(travel)
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
