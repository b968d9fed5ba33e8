#!/usr/bin/env python
"""The last step of bench/gpu_check.sh: one table of every check and target, pass or miss.

Reads what the steps left in the output folder (steps.tsv, the pytest JUnit file, the ComfyUI
step's JSON, the benchmarks' JSON; each may be missing or partial when a step ran out of time)
and prints a Markdown table, last, also written to summary.md. Ratios come from one run, as
the issue asks. Paste it into bench/RESULTS.md as printed.

    python bench/gpu_summary.py OUT_DIR [--dry-run]
"""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
GIB = 1 << 30
TIMED_OUT = {"124", "137"}
DF11_TARGET = 1.15  # bench_formats.py


def load(out: Path, name: str) -> dict:
    try:
        return json.loads((out / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def rows_of(data: dict) -> dict:
    return data.get("rows", {})


def verdict(value: float | None, target: float | None, info: bool = False) -> str:
    if value is None:
        return "not measured"
    if info or target is None:
        return "info"
    return "pass" if value <= target else "MISS"


def gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def ms(s) -> str:
    return "-" if s is None else f"{s * 1000:.1f} ms"


def profile_note(row: dict, out: Path) -> str:
    path = row.get("profile")
    if not path:
        return ""
    try:
        return f" (profile: {Path(path).relative_to(out)})"
    except ValueError:
        return f" (profile: {Path(path).name})"


# -- the rows ----------------------------------------------------------------------------------

def cuda_tests_row(out: Path) -> list[str]:
    path = out / "cuda_tests.xml"
    if not path.is_file():
        return ["CUDA paths: tests marked cuda", "all pass", "no result (step did not finish)", "not measured"]
    counts = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0}
    failed = []
    for case in ET.parse(path).getroot().iter("testcase"):
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(case.get("name", "?"))
        elif skipped is not None:
            counts["xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"] += 1
        else:
            counts["passed"] += 1
    measured = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tests ran"
    if failed:
        measured += " (" + ", ".join(failed[:6]) + (", ..." if len(failed) > 6 else "") + ")"
    result = "pass" if counts["passed"] and not failed else ("MISS" if failed else "not measured")
    return ["CUDA paths: tests marked cuda (xfailed: not bit-exact, FMA-level only)", "all pass", measured, result]


def comfyui_row(out: Path, mode: str) -> list[str]:
    data = load(out, f"comfyui_{mode}.json")
    label = f"ComfyUI {data.get('comfyui', '0.30')} on CUDA, " + ("default flags (DynamicVRAM)" if mode == "dynamic"
                                                                  else "--disable-dynamic-vram")
    target = "every bundled workflow runs, Unload models between, ours evicted by a core model, no log errors"
    if not data:
        return [label, target, "no result (step did not run or finish)", "not measured"]
    if data.get("skipped"):
        return [label, target, f"skipped: {data['skipped']}", "not measured"]
    if data.get("dry_run"):
        return [label, target, f"dry run: {len(data.get('planned', []))} workflows planned", "not measured"]
    if not data.get("started", True):
        return [label, target, f"server did not start: {str(data.get('error', ''))[:160]}", "MISS"]
    if data.get("verdict"):
        return [label, target, data["verdict"].split(": ", 1)[-1], "pass" if data["verdict"].startswith("PASS") else "MISS"]
    runs = data.get("workflows", {})
    done = sum(1 for r in runs.values() if r.get("ok"))
    return [label, target, f"stopped early: {done}/{len(runs)} workflows ok", "MISS"]


def mmdit_rows(out: Path) -> list[list[str]]:
    data = load(out, "mmdit.json")
    rows = rows_of(data)
    floor_t, comfy_t = data.get("floor_target", 1.25), data.get("comfy_target", 0.80)
    sizes = data.get("sizes") or [1328]
    out_rows = []
    for size in sizes:  # the targets are about the first (1328^2); the others are information
        ours = rows.get(f"ours {size}^2 b1", {})
        if not ours and size != sizes[0]:
            continue
        vs_floor = ours.get("vs_floor")
        out_rows.append([f"bf16 MMDiT forward {size}^2 b1 vs the FLOP floor", f"<= {floor_t}x",
                         "-" if not ours else f"{ms(ours.get('s'))} = {vs_floor:.2f}x floor ({ms(ours.get('floor_s'))}), "
                         f"peak {gib(ours.get('peak'))}" + profile_note(ours, out),
                         verdict(vs_floor, floor_t, info=size != sizes[0])])
        for other, target in (("comfy", comfy_t), ("diffusers", None)):
            theirs = rows.get(f"{other} {size}^2 b1", {})
            ratio = ours["s"] / theirs["s"] if ours.get("s") and theirs.get("s") else None
            name = "ComfyUI native" if other == "comfy" else "diffusers"
            out_rows.append([f"bf16 forward {size}^2 b1: ours vs {name}", f"<= {target}x" if target else "-",
                             "-" if ratio is None else f"{ratio:.2f}x ({ms(ours.get('s'))} vs {ms(theirs.get('s'))}, "
                             f"their peak {gib(theirs.get('peak'))})",
                             verdict(ratio, target, info=target is None or size != sizes[0])])
    return out_rows


def fp8_rows(out: Path) -> list[list[str]]:
    data = load(out, "fp8.json")
    rows, size = rows_of(data), data.get("size", 1328)
    result = []
    for mode in ("row", "tensor"):
        r = rows.get(f"fp8 matmul, {mode} scales b1", {})
        result.append([f"fp8 matmul ({mode}-wise activation scales) vs our bf16, {size}^2", "<= 0.75x",
                       "-" if not r else f"{r['ratio']:.2f}x, rel. err {r.get('rel_err', 0):.2e} vs bf16, "
                       f"peak {gib(r.get('peak'))}" + profile_note(r, out), verdict(r.get("ratio"), r.get("target", 0.75))])
    return result


def gguf_rows(out: Path) -> list[list[str]]:
    data = load(out, "gguf.json")
    rows, size = rows_of(data), data.get("size", 1328)
    result = []
    for scheme, label in (("Q8_0", "Q8_0"), ("Q4_0", "Q4_0"), ("Q4_K", "Q4_K"), ("Q4_K_M", "Q4_K_M-like mix")):
        r = rows.get(scheme, {})
        result.append([f"GGUF {label} vs our bf16, {size}^2", f"<= {r.get('target', '-')}x",
                       "-" if not r else f"{r['ratio']:.2f}x ({ms(r.get('s'))}), peak {gib(r.get('peak'))}"
                       + profile_note(r, out), verdict(r.get("ratio"), r.get("target"))])
    m = rows.get("Q4_K_M", {})
    limit = m["bytes"] + 1.5 * GB if m.get("bytes") else None
    result.append([f"peak VRAM, Q4_K_M-like MMDiT at {size}^2", "<= weights + 1.5 GB",
                   "-" if m.get("peak") is None else f"{gib(m['peak'])} vs {gib(m['bytes'])} + 1.5 GB",
                   "not measured" if m.get("peak") is None else ("pass" if m["peak"] <= limit else "MISS")])
    return result


def lora_rows(out: Path) -> list[list[str]]:
    data = load(out, "lora.json")
    rows, size = rows_of(data), data.get("size", 1328)
    result = []
    for key, label in (("additive", "rank-64 LoRA, additive"), ("folded", "rank-64 LoRA, folded into the weights")):
        r = rows.get(key, {})
        result.append([f"{label} vs no LoRA, {size}^2", f"<= {r.get('target', '1.05' if key == 'additive' else '1.01')}x",
                       "-" if not r else f"{r['ratio']:.3f}x, peak {gib(r.get('peak'))}" + profile_note(r, out),
                       verdict(r.get("ratio"), r.get("target"))])
    return result


def formats_rows(out: Path) -> list[list[str]]:
    data = load(out, "formats.json")
    rows, size = rows_of(data), data.get("size", 1328)
    result = []
    # Block-scaled rows exist only where the GPU has those tensor cores (Blackwell) or on a dry run.
    blockscaled = [k for k in rows if "block-scaled" in k]
    for key in ("nvfp4", "mxfp8", "int8_convrot", "int8_convrot, int8 tensor cores", *blockscaled):
        r = rows.get(key, {})
        result.append([f"ComfyUI {key} layers vs our bf16, {size}^2", "-",
                       "-" if not r else f"{r['ratio']:.2f}x, rel. err {r.get('rel_err', 0):.2e} vs bf16, "
                       f"peak {gib(r.get('peak'))}", verdict(r.get("ratio"), None, info=True)])
    r = rows.get("DFloat11", {})
    exact = r.get("exact", True)
    result.append([f"DFloat11 vs our bf16, {size}^2 (bf16 + decode at the measured rate)", f"<= {DF11_TARGET}x",
                   "-" if not r else f"{r['ratio']:.2f}x, {r.get('decode_values_per_s', 0) / 1e9:.1f} G values/s, "
                   f"{'bit-exact' if exact else 'NOT bit-exact'}",
                   verdict(r.get("ratio") if exact else float("inf"), DF11_TARGET) if r else "not measured"])
    return result


def e2e_rows(out: Path) -> list[list[str]]:
    data = load(out, "e2e.json")
    rows = rows_of(data)
    gen, step = rows.get("generation", {}), rows.get("cfg step", {})
    stages = ", ".join(f"{k.split(' (')[0]} {v:.2f} s" for k, v in gen.get("stages", {}).items())
    result = [[f"end to end {data.get('size', 1328)}^2 Lightning {data.get('steps', 4)}-step cfg 1 "
               "(encode + steps + VAE decode)", f"<= {data.get('target_s', 1.0)} s",
               "-" if not gen else f"{gen['total_s']:.2f} s ({stages}), peak {gib(gen.get('peak'))}" + profile_note(gen, out),
               verdict(gen.get("total_s"), data.get("target_s"))]]
    if step:
        result.append([f"one cfg-{step.get('cfg', 4):g} step; a 50-step image (estimate)", "-",
                       f"{step['s_per_step']:.3f} s per step; {step['estimate_50_steps_s']:.1f} s per image", "info"])
    return result


# -- the table ---------------------------------------------------------------------------------

def steps_rows(out: Path) -> list[list[str]]:
    rows = []
    try:
        lines = (out / "steps.tsv").read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        parts = line.split("\t")
        if len(parts) == 4:
            name, limit, took, rc = parts
            status = "timed out" if rc in TIMED_OUT else ("ok" if rc == "0" else f"exit {rc}")
            rows.append([name, f"{limit} s", f"{took} s", status])
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return lines + ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]


def environment(out: Path) -> str:
    gpu, torch_version = "?", "?"
    for name in ("mmdit.json", "gguf.json", "fp8.json", "lora.json", "e2e.json"):
        data = load(out, name)
        if data:
            gpu, torch_version = data.get("gpu", gpu), data.get("torch", torch_version)
            break
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"date {date} | GPU {gpu} | torch {torch_version} | commit {commit} | command: bash bench/gpu_check.sh"


def summary(out: Path) -> str:
    checks = ([cuda_tests_row(out), comfyui_row(out, "dynamic"), comfyui_row(out, "static")]
              + mmdit_rows(out) + fp8_rows(out) + gguf_rows(out) + lora_rows(out) + formats_rows(out) + e2e_rows(out))
    missed = sum(1 for r in checks if r[-1] == "MISS")
    unmeasured = sum(1 for r in checks if r[-1] == "not measured")
    lines = [environment(out), "", "GPU check: every check and target (ratios from this run)", ""]
    lines += markdown(["check", "target", "measured", "result"], checks)
    steps = steps_rows(out)
    if steps:
        lines += ["", "Steps (each time-boxed):", ""] + markdown(["step", "limit", "took", "status"], steps)
    lines += ["", f"- {len(checks) - missed - unmeasured} pass or info, {missed} missed, {unmeasured} not measured; "
              "profiles of misses and every log are in the output folder"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = Path(argv[0])
    text = summary(out)
    if dry:
        text = "DRY RUN on a CPU with tiny shapes: the plan works; no number below means anything\n" + text
    (out / "summary.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
