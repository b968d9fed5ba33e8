#!/usr/bin/env python
"""Step 2 of bench/gpu_check.sh: the pack inside a real ComfyUI (COMFYUI_DIR) on the GPU.

One ComfyUI server with this checkout linked into custom_nodes, started with its default flags
(``--mode dynamic``: DynamicVRAM on, where ComfyUI enables it) or with ``--disable-dynamic-vram``
(``--mode static``). It
1. runs every bundled API workflow on the tiny models of the integration tests (their harness,
   tests/integration/comfyui_harness.py, writes them and starts the server), pressing "Unload
   models" (POST /free) after each one;
2. (first, in fact, so that a time limit costs workflows rather than this check) leaves our t2i
   models on the GPU, takes most of the free VRAM from this process (as another program on the
   same card would) and runs a core-only graph (core VAE encode / decode): ComfyUI must evict
   ours to load its model; then our t2i must run again;
3. reads ComfyUI's log for errors, from the moment the server answered.

Results go to ``--out`` as JSON, rewritten after every run so that a step stopped by its time
limit keeps what it did; the last line printed is the verdict. Without CUDA the same runs on the
CPU (``--cpu``), minus the eviction check. ``--dry-run`` only checks that ComfyUI and its Python
are there and says what would run (seconds, no server).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT / "tests", ROOT / "tests" / "integration"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

API_WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("*.json"))
SHIMS = ROOT / "bench" / "shims"
CORE_VAE = "core_wan21_vae_tiny.safetensors"  # a Wan 2.1 VAE in its original layout: ComfyUI's own VAELoader reads it
KEEP_FREE = 512 << 20  # VRAM left free while this process holds the rest: less than ComfyUI reserves for inference
# What an error looks like in ComfyUI's log (its logger, a node's traceback, a failed prompt).
ERROR_LINE = re.compile(r"Traceback \(most recent call last\)|!!! Exception|\[ERROR\]|^ERROR\b|Error: |Exception: ")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# ComfyUI (DEBUG) names each model it unloads; ours are Qwen* classes (the core model evicting them is a Wan VAE)
OURS_UNLOADED = re.compile(r"Unloading (Qwen\w+)")


# ----------------------------------------------------------------------------- set-up

def comfy_checkout() -> tuple[Path | None, str]:
    """(ComfyUI folder, "") or (None, why not)."""
    root = os.environ.get("COMFYUI_DIR", "")
    if not root:
        return None, "COMFYUI_DIR is not set"
    path = Path(root).resolve()
    if not (path / "main.py").is_file():
        return None, f"COMFYUI_DIR={root} has no main.py"
    return path, ""


def comfy_version(comfy: Path) -> str:
    text = (comfy / "comfyui_version.py").read_text(encoding="utf-8") if (comfy / "comfyui_version.py").is_file() else ""
    found = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    return found.group(1) if found else "unknown"


def missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def server_flags(mode: str, cuda: bool, work: Path) -> tuple[list[str], list[str]]:
    """(device flags, extra flags) for ComfyUI's command line."""
    extra = ["--disable-api-nodes", "--verbose", "DEBUG"]  # DEBUG: ComfyUI names each model it unloads
    if mode == "static":
        extra.append("--disable-dynamic-vram")
    if missing("comfyui_frontend_package"):  # ComfyUI refuses to start without a frontend; none is needed here
        web = work / "frontend"
        web.mkdir(parents=True, exist_ok=True)
        (web / "index.html").write_text("<!doctype html><title>no frontend</title>\n", encoding="utf-8")
        extra += ["--front-end-root", str(web)]
    return ([] if cuda else ["--cpu"]), extra


def server_env_path() -> None:
    """ComfyUI imports PyAV at start-up; where it is missing, a stand-in (bench/shims) is put on its path."""
    if missing("av"):
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIMS), os.environ.get("PYTHONPATH", "")]))


def write_core_vae(models: Path) -> None:
    """A tiny Wan 2.1 VAE with the key names and block counts ComfyUI's VAELoader expects."""
    import torch
    from safetensors.torch import save_file

    from qwenimage_pack.core.encoders.vae import VAEConfig, WanVAE

    torch.manual_seed(9)
    state = {k: v.contiguous() for k, v in WanVAE(VAEConfig(base_dim=16)).state_dict().items()}
    (models / "vae").mkdir(parents=True, exist_ok=True)
    save_file(state, str(models / "vae" / CORE_VAE))


def core_prompt() -> dict:
    """Core nodes only: an image through ComfyUI's own VAE and back."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": CORE_VAE}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "core_vae"}},
    }


# ----------------------------------------------------------------------------- results

class Report:
    """The step's JSON, saved after every change."""

    def __init__(self, path: Path | None, **fields):
        self.path = path
        self.data = {"workflows": {}, "log_errors": [], **fields}
        self.save()

    def __setitem__(self, key, value):
        self.data[key] = value
        self.save()

    def workflow(self, name: str, **result):
        self.data["workflows"][name] = result
        self.save()

    def save(self):
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1), encoding="utf-8")
            os.replace(tmp, self.path)


def log_errors(text: str, limit: int = 20) -> list[str]:
    lines = (ANSI.sub("", line).strip() for line in text.splitlines())  # ComfyUI colours its log levels
    return [line[:300] for line in lines if ERROR_LINE.search(line)][:limit]


def short(error: BaseException, limit: int = 1500) -> str:
    text = str(getattr(error, "msg", None) or error)
    return text if len(text) <= limit else text[:limit] + " ..."


# ----------------------------------------------------------------------------- runs

def run_workflow(server, test_comfyui, path: Path, object_info: dict, picture: Path, out: Path, timeout: float,
                 args: list[str] | None = None):
    """One workflow through the queue CLI (``args`` None: planned for the tiny files as the
    integration tests do); returns its result for the report."""
    import pytest

    prompt = json.loads(path.read_text(encoding="utf-8"))
    try:
        if args is None:
            args, _ = test_comfyui.plan(prompt, server.files, object_info, picture)
    except pytest.skip.Exception as e:
        return {"skipped": short(e)}
    t0 = time.monotonic()
    try:
        saved = test_comfyui.run_cli(server, path, args, out, timeout=timeout)
    except (AssertionError, subprocess.TimeoutExpired) as e:
        return {"ok": False, "s": round(time.monotonic() - t0, 2), "error": short(e)}
    return {"ok": bool(saved), "s": round(time.monotonic() - t0, 2), "images": len(saved)}


def unload_models(server) -> None:
    """ComfyUI's "Unload models" button."""
    server.post_json("/free", {"unload_models": True, "free_memory": True})
    time.sleep(1.2)  # the prompt worker acts on the flags within a second when idle


def take_vram():
    """Most of the free VRAM, held by this process until released."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    return torch.empty(max(0, free - KEEP_FREE), dtype=torch.uint8, device="cuda")


def forced_out(server, test_comfyui, picture: Path, work: Path, timeout: float, cuda: bool) -> dict:
    """Ours resident, VRAM taken, a core model loaded: ComfyUI must evict ours; ours run again
    after. Without CUDA only the runs themselves are checked (nothing to evict on the CPU)."""
    import torch

    t2i = ROOT / "workflows" / "api" / "qwen_image_t2i.json"
    info = server.get_json("/object_info", timeout=60)
    first = run_workflow(server, test_comfyui, t2i, info, picture, work / "forced_1", timeout)
    core_path = work / "core_vae.json"
    core_path.write_text(json.dumps(core_prompt()), encoding="utf-8")
    mark = server.log_path.stat().st_size
    hog = take_vram() if cuda else None
    try:
        core = run_workflow(server, test_comfyui, core_path, info, picture, work / "forced_core", timeout, args=[])
    finally:
        del hog
        if cuda:
            torch.cuda.empty_cache()
    with open(server.log_path, "rb") as f:
        f.seek(mark)
        evicted = sorted(set(OURS_UNLOADED.findall(f.read().decode("utf-8", "replace"))))
    after = run_workflow(server, test_comfyui, t2i, info, picture, work / "forced_2", timeout)
    runs_ok = bool(first.get("ok") and core.get("ok") and after.get("ok"))
    return {"checked": cuda, "ours_before": first, "core": core, "evicted": evicted, "ours_after": after,
            "ok": runs_ok and (bool(evicted) or not cuda)}


def chosen(only: str | None) -> list[Path]:
    names = {n.strip() for n in (only or "").split(",") if n.strip()}
    return [p for p in API_WORKFLOWS if not names or p.stem in names]


def note_pid(server, path: Path) -> None:
    """Write the server's process id to ``path`` once it runs (its own process group), so that
    gpu_check.sh can end it should this step be killed outright at its time limit."""
    def wait():
        while server.proc is None:
            time.sleep(0.05)
        path.write_text(str(server.proc.pid), encoding="utf-8")

    threading.Thread(target=wait, daemon=True).start()


def verdict(data: dict) -> str:
    runs = data["workflows"].values()
    failed = [n for n, r in data["workflows"].items() if r.get("ok") is False]
    forced = data.get("forced_out", {})
    ok = (data.get("started") and not failed and any(r.get("ok") for r in runs) and not data["log_errors"]
          and forced.get("ok"))
    ran = sum(1 for r in runs if "ok" in r)
    passed = sum(1 for r in runs if r.get("ok"))
    forced_text = "not run" if not forced else (
        f"evicted {','.join(forced['evicted']) or 'NOTHING' if forced['checked'] else 'n/a (CPU)'}, "
        f"core {'ok' if forced['core'].get('ok') else 'FAILED'}, ours after {'ok' if forced['ours_after'].get('ok') else 'FAILED'}")
    return (f"{'PASS' if ok else 'FAIL'}: ComfyUI {data.get('comfyui')} ({data['mode']}, {data.get('device')}): "
            f"{passed}/{ran} workflows ok{' (failed: ' + ', '.join(failed) + ')' if failed else ''}, forced out: "
            f"{forced_text}, log errors: {len(data['log_errors'])}")


def serve(args, comfy: Path, report: Report) -> None:
    import test_comfyui
    import torch
    from comfyui_harness import ComfyUIServer

    # A time limit's SIGTERM unwinds like an exception, so the server is stopped and the report kept.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cuda = torch.cuda.is_available()
    work = Path(args.work or tempfile.mkdtemp(prefix=f"qwenimage-gpu-comfyui-{args.mode}-"))
    report["device"] = "cuda" if cuda else "cpu"
    server = ComfyUIServer(comfy, Path(os.environ.get("COMFYUI_PYTHON") or sys.executable), work)
    server.device_flags, server.extra_flags = server_flags(args.mode, cuda, work)
    server.start_timeout = args.start_timeout
    report["flags"] = server.device_flags + server.extra_flags
    server_env_path()
    write_core_vae(server.models)
    if args.pid_file:
        note_pid(server, Path(args.pid_file))
    t0 = time.monotonic()
    try:
        server.start()
    except (RuntimeError, OSError) as e:
        report["started"] = False
        report["error"] = short(e, 4000)
        server.stop()
        return
    except BaseException:  # stopped at the time limit while starting
        server.stop()
        raise
    report["started"], report["start_s"] = True, round(time.monotonic() - t0, 1)
    started_at = server.log_path.stat().st_size
    try:
        picture = test_comfyui.make_picture(work)
        info = server.get_json("/object_info", timeout=60)
        # The eviction check first: should the step reach its time limit, only some workflows are lost.
        report["forced_out"] = forced_out(server, test_comfyui, picture, work, args.workflow_timeout, cuda)
        unload_models(server)
        for path in chosen(args.only):
            report.workflow(path.stem, **run_workflow(server, test_comfyui, path, info, picture, work / path.stem,
                                                      args.workflow_timeout))
            unload_models(server)
    finally:
        server.stop()
        with open(server.log_path, "rb") as f:
            f.seek(started_at)
            report["log_errors"] = log_errors(f.read().decode("utf-8", "replace"))
        report["log"] = str(server.log_path)


def starts(comfy: Path, args) -> str:
    """Whether this ComfyUI gets through its start-up here (its --quick-test-for-ci, on the CPU):
    a dry run's proof that the copy and the packages on the path are complete."""
    work = Path(args.work or tempfile.mkdtemp(prefix="qwenimage-gpu-comfyui-dry-"))
    _, extra = server_flags(args.mode, False, work)
    server_env_path()
    cmd = [os.environ.get("COMFYUI_PYTHON") or sys.executable, "main.py", "--cpu", "--quick-test-for-ci",
           "--disable-auto-launch", "--database-url", "sqlite:///:memory:", *extra]
    try:
        run = subprocess.run(cmd, cwd=comfy, capture_output=True, text=True, timeout=args.start_timeout)
    except subprocess.TimeoutExpired:
        return f"FAILS to start within {args.start_timeout:g} s"
    if run.returncode == 0:
        return "starts"
    last = ANSI.sub("", (run.stdout + run.stderr).strip().splitlines()[-1])[:300]
    missing_module = re.search(r"No module named '([\w.]+)'", last)
    if missing_module:
        top = missing_module.group(1).split(".")[0]
        if not ((comfy / top).exists() or (comfy / f"{top}.py").exists()):  # a package this Python lacks, not the copy
            return f"starts only with its packages ({last}; the GPU machine gets them from .whl)"
    return f"FAILS to start: {last}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("dynamic", "static"), default="dynamic",
                   help="dynamic: ComfyUI's default flags; static: --disable-dynamic-vram")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--work", default=None, help="folder for the models, inputs, outputs and log (default: a new temp folder)")
    p.add_argument("--workflow-timeout", type=float, default=60.0, help="seconds for one workflow")
    p.add_argument("--start-timeout", type=float, default=90.0, help="seconds for ComfyUI to start")
    p.add_argument("--only", default=None, help="comma-separated workflow names (default: every bundled API workflow)")
    p.add_argument("--pid-file", default=None, help="write the server's process id here (its own process group)")
    p.add_argument("--dry-run", action="store_true", help="check the set-up and list what would run; start nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    comfy, why = comfy_checkout()
    report = Report(Path(args.out) if args.out else None, mode=args.mode, dry_run=args.dry_run)
    if comfy is None:
        report["skipped"] = why
        print(f"SKIP: ComfyUI step ({args.mode}): {why}")
        return 0
    report["comfyui"] = comfy_version(comfy)
    if args.dry_run:
        planned = [p.stem for p in chosen(args.only)]
        report["planned"] = planned
        report["starts"] = starts(comfy, args)
        print(f"dry run: ComfyUI {report.data['comfyui']} at {comfy} {report.data['starts']}; would run {len(planned)} "
              f"workflows ({', '.join(planned)}) with --mode {args.mode}, then the forced-out check")
        return 1 if report.data["starts"].startswith("FAILS") else 0
    serve(args, comfy, report)
    line = verdict(report.data)
    report["verdict"] = line
    print(json.dumps(report.data, indent=1))
    print(line)
    return 0 if line.startswith("PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
