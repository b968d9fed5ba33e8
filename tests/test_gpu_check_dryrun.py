"""bench/gpu_check.sh, the one GPU check, proven on this CPU before a GPU is lent.

The dry run runs every step's real command with tiny shapes (the CUDA tests skip), prints the
plan (time per step, what would travel to the GPU machine) and ends with the summary table;
nothing is carried here (CI has no .whl / .comfy). The helpers' logic is checked on made-up
results: the summary's pass / miss, the plan's size check, the ComfyUI step's verdict.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT

BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import gpu_comfyui  # noqa: E402
import gpu_plan  # noqa: E402
import gpu_summary  # noqa: E402


def test_dry_run_starts_every_step_and_prints_the_table_last(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, WHEELS="", COMFYUI_DIR="", CARRY="")
    run = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run", "--pack", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    text = run.stdout
    assert run.returncode == 0, text[-6000:] + run.stderr[-2000:]
    for name, *_ in gpu_plan.STEPS:
        assert f"| {name} |" in text  # in the plan, with its estimate and limit
    for name, *_ in gpu_plan.STEPS[1:]:
        assert f"== {name} (limit" in text
    assert text.count("   ok, ") == len(gpu_plan.STEPS) - 1, text
    assert "total that travels" in text and ": fits" in text
    assert "SKIP: ComfyUI step (dynamic): COMFYUI_DIR is not set" in text
    # the summary table is the last thing printed
    tail = text.rstrip().splitlines()
    assert tail[-1].startswith("- ") and "missed" in tail[-1]
    assert any(line.startswith("| CUDA paths") for line in tail[-60:])
    # what comes back from the device tool: at most 8 files
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "gpu_check.tar.gz", "summary.md"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = {n.lstrip("./") for n in tar.getnames()}
    for name in ("steps.tsv", "cuda_tests.xml", "comfyui_dynamic.json", "mmdit.json", "fp8.json", "gguf.json",
                 "lora.json", "e2e.json", "logs/cuda_tests.log"):
        assert name in names, sorted(names)
    assert any(n.startswith("profiles/profile_") for n in names)  # every target misses on a CPU: profiled


def test_plan_fits_a_lease_and_checks_what_travels(tmp_path, capsys):
    limits = [s[3] for s in gpu_plan.STEPS]
    assert sum(limits) <= 9 * 60 and max(limits) <= 600  # one run command, with room for the machine's start
    assert gpu_plan.main(["--check", "--carry", "no-such-folder"]) == 1
    assert "no-such-folder: MISSING" in capsys.readouterr().out
    assert gpu_plan.main(["--check", "--carry"]) == 0
    capsys.readouterr()
    assert gpu_plan.main(["--limit", "bench-gguf"]) == 0 and capsys.readouterr().out.strip() == "60"


def _write(out, name, data):
    (out / name).write_text(json.dumps(data), encoding="utf-8")


def test_summary_marks_each_target(tmp_path):
    out = tmp_path
    (out / "cuda_tests.xml").write_text(
        '<testsuites><testsuite><testcase name="a"/><testcase name="b"><skipped type="pytest.xfail" message="x"/>'
        '</testcase><testcase name="c"><failure message="boom"/></testcase></testsuite></testsuites>')
    _write(out, "mmdit.json", {"sizes": [1328, 1024], "gpu": "H200", "torch": "2.11", "rows": {
        "ours 1328^2 b1": {"s": 0.2, "floor_s": 0.167, "vs_floor": 1.2, "peak": 42 << 30, "profile": str(out / "p.txt")},
        "comfy 1328^2 b1": {"s": 0.24, "peak": 41 << 30}}})
    _write(out, "gguf.json", {"size": 1328, "rows": {
        "Q8_0": {"ratio": 1.2, "target": 1.10, "s": 0.24, "peak": 1, "bytes": 1},
        "Q4_K_M": {"ratio": 1.1, "target": 1.25, "s": 0.22, "peak": 14 << 30, "bytes": 12 << 30}}})
    _write(out, "comfyui_dynamic.json", {"mode": "dynamic", "comfyui": "0.30.0", "started": True, "workflows": {},
                                         "verdict": "PASS: ComfyUI 0.30.0 (dynamic, cuda): 11/11 workflows ok"})
    (out / "steps.tsv").write_text("cuda-tests\t120\t130\t124\n")
    table = {r[0]: r for r in (line.split(" | ") for line in gpu_summary.summary(out).splitlines() if line.startswith("| "))}

    def result(prefix):
        return next(r for k, r in table.items() if k.startswith("| " + prefix))[-1].strip(" |")

    assert result("CUDA paths") == "MISS"  # one failure
    assert result("bf16 MMDiT forward 1328^2") == "pass"  # 1.2x <= 1.25x
    assert result("bf16 forward 1328^2 b1: ours vs ComfyUI") == "MISS"  # 0.83x > 0.80x
    assert result("GGUF Q8_0") == "MISS" and result("GGUF Q4_K_M") == "pass"
    assert result("peak VRAM, Q4_K_M") == "MISS"  # 14 GiB > 12 GiB + 1.5 GB
    assert result("ComfyUI 0.30.0 on CUDA, default") == "pass"
    assert result("ComfyUI 0.30 on CUDA, --disable") == "not measured"
    assert result("fp8 matmul (row") == "not measured"
    assert "timed out" in table["| cuda-tests"][-1]
    assert "(profile: p.txt)" in next(r for k, r in table.items() if k.startswith("| bf16 MMDiT forward 1328"))[2]


def test_comfyui_verdict_and_log_errors():
    log = ("[INFO] got prompt\n[\x1b[31mERROR\x1b[0m] boom\nTraceback (most recent call last):\n"
           "[DEBUG] Unloading QwenImageMMDiT\n!!! Exception during processing !!! x\n")
    assert len(gpu_comfyui.log_errors(log)) == 3
    assert gpu_comfyui.OURS_UNLOADED.findall(log) == ["QwenImageMMDiT"]
    ok = {"ok": True}
    data = {"mode": "dynamic", "device": "cuda", "comfyui": "0.30.0", "started": True, "log_errors": [],
            "workflows": {"a": {"ok": True}, "b": {"skipped": "no Canny"}},
            "forced_out": {"checked": True, "evicted": ["QwenImageMMDiT"], "core": ok, "ours_after": ok, "ok": True}}
    assert gpu_comfyui.verdict(data).startswith("PASS: ComfyUI 0.30.0 (dynamic, cuda): 1/1 workflows ok")
    data["forced_out"] = dict(data["forced_out"], evicted=[], ok=False)
    assert "evicted NOTHING" in gpu_comfyui.verdict(data) and gpu_comfyui.verdict(data).startswith("FAIL")


def test_comfyui_step_skips_without_comfyui(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    assert gpu_comfyui.main(["--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["skipped"] == "COMFYUI_DIR is not set"


def test_av_stand_in_imports_and_refuses_use():
    code = ("import av; from av.container import InputContainer; from av.video.reformatter import ColorRange; "
            "ColorRange.JPEG\ntry:\n    av.open('x')\nexcept RuntimeError as e:\n    print('refused:', e)")
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(BENCH / "shims")),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "refused: PyAV is not installed here" in run.stdout, run.stderr


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_prepare.sh"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True).returncode == 0
