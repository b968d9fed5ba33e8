"""tools/qwenimage_queue.py's refusals and progress against a real ComfyUI (CPU, tiny models).

Runs when $COMFYUI_DIR points to a ComfyUI checkout (see comfyui_harness.py); skipped otherwise.
ComfyUI accepts a prompt partially when some outputs fail validation; the tool must treat that
as a failure and take the queued remainder back. A --set typo must be refused before queueing,
our errors must reach /history with a short type name, and the standard-library websocket must
show the sampler's steps.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_comfyui import CLI, object_info, picture, plan, server  # noqa: F401  (the fixtures are shared)

UNION_CANNY = ROOT / "workflows" / "api" / "qwen_image_controlnet_union_canny.json"


def _tool(server, workflow, args, out, timeout=300):
    cmd = [sys.executable, str(CLI), "--server", server.url, "--workflow", str(workflow), "--out", str(out),
           "--timeout", str(timeout), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60)


def _idle(server, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = server.get_json("/queue")
        if not q["queue_running"] and not q["queue_pending"]:
            return
        time.sleep(0.2)
    pytest.fail(f"ComfyUI's queue did not empty:\n{server.log_tail()}")


def _t2i_args(server, *extra):
    return ["--steps", "2", "--seed", "5", "--model", server.files["model"], "--text-encoder", server.files["text_encoder"],
            "--vae", server.files["vae"], "--set", "6.width=64", "--set", "6.height=64", "--set", "6.aspect_ratio=custom", *extra]


def test_missing_controlnet_file_fails_and_nothing_is_saved(server, object_info, picture, tmp_path):
    """The Canny preview passes validation, the ControlNet branch does not: ComfyUI queues the
    preview alone. The tool must exit 1 naming node 4's input and save nothing, even with --previews."""
    import json

    _idle(server)
    prompt = json.loads(UNION_CANNY.read_text(encoding="utf-8"))
    args, _ = plan(prompt, server.files, object_info, picture)
    args += ["--set", "4.controlnet_name=missing_controlnet.safetensors", "--previews"]
    result = _tool(server, UNION_CANNY, args, tmp_path / "out")
    assert result.returncode == 1, f"{result.stdout}\n{result.stderr}\n{server.log_tail()}"
    err = result.stderr
    assert "rejected part of the workflow" in err, err
    assert "node 4 (QwenImageControlNetLoader) input 'controlnet_name'" in err and "missing_controlnet.safetensors" in err, err
    assert "blocks output node(s) 14" in err, err
    assert not (tmp_path / "out").exists(), sorted((tmp_path / "out").iterdir())
    assert "queued" not in result.stdout
    _idle(server)  # the remainder was dequeued or interrupted: nothing is left running


def test_set_typo_is_refused_before_anything_is_queued(server, tmp_path):
    _idle(server)
    before = set(server.get_json("/history"))
    result = _tool(server, "qwen_image_t2i", _t2i_args(server, "--set", "6.widht=80"), tmp_path / "out")
    assert result.returncode == 2, f"{result.stdout}\n{result.stderr}"
    assert "node 6 (QwenImageEmptyLatent) has no input 'widht' (did you mean 'width'?)" in result.stderr, result.stderr
    assert "height" in result.stderr.split("its inputs:")[1]  # the valid names, from /object_info
    assert set(server.get_json("/history")) == before and not (tmp_path / "out").exists()


def test_a_bad_model_file_reports_a_short_error_type(server, tmp_path):
    """ComfyUI's /history (and its error dialog) name the exception type from __module__:
    our loaders' errors read qwenimage.WeightFileError, not the pack's folder path."""
    _idle(server)
    bad = server.models / "diffusion_models" / "not_a_model.safetensors"
    bad.write_bytes(b"this is not a safetensors file" * 10)
    try:
        result = _tool(server, "qwen_image_t2i", _t2i_args(server, "--model", bad.name), tmp_path / "out")
    finally:
        bad.unlink()
    assert result.returncode == 1, f"{result.stdout}\n{result.stderr}\n{server.log_tail()}"
    assert "failed at node 1 (QwenImageDiTLoader): qwenimage.WeightFileError: " in result.stderr, result.stderr
    assert "custom_nodes" not in result.stderr.split("WeightFileError")[0]


def test_step_progress_without_optional_packages(server, tmp_path):
    """The standard-library websocket reads ComfyUI's own progress messages (aiohttp's server)."""
    _idle(server)
    result = _tool(server, "qwen_image_t2i", _t2i_args(server, "--seed", "77"), tmp_path / "out")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{server.log_tail()}"
    out = result.stdout
    assert "no live step progress" not in out, out
    assert "running node 7 (QwenImageSampler)" in out and "node 7 (QwenImageSampler): step 2/2" in out, out
    assert len(list((tmp_path / "out").iterdir())) == 1
