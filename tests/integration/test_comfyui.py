"""Every bundled API workflow, queued with tools/qwenimage_queue.py on a real ComfyUI (CPU, tiny models).

Runs when $COMFYUI_DIR points to a ComfyUI checkout (see comfyui_harness.py and the README);
skipped otherwise. Checks the images that come back, an interrupt during sampling, and a
queue of two prompts.
"""
from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from comfyui_harness import MODEL_SUFFIXES, controlnet_file_for, load_cli, shared_server
from conftest import ROOT

API_WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("*.json"))
CLI = ROOT / "tools" / "qwenimage_queue.py"
WIDTH, HEIGHT = 64, 48  # not square: a swapped width / height shows
PICTURE_SIZE = (96, 64)  # the input picture for LoadImage: 3:2, sides multiples of 16
LATENT_NODES = ("QwenImageEmptyLatent", "EmptySD3LatentImage", "EmptyLatentImage")
_seeds = itertools.count(1000)


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get_json("/object_info", timeout=60)


def _id_order(ids):
    return sorted(ids, key=lambda i: (len(i), i))


def plan(prompt: dict, files: dict, object_info: dict, picture: Path):
    """CLI arguments that make ``prompt`` run on the tiny files, and the image size expected:
    the empty latent's, or else the input picture's (edit and inpaint keep the input geometry)."""
    missing = sorted({n["class_type"] for n in prompt.values()} - set(object_info))
    if missing:
        pytest.skip(f"nodes not available in this ComfyUI: {', '.join(missing)}")
    args = ["--steps", "2", "--seed", str(next(_seeds))]
    handled = {}
    for node_id, node in prompt.items():
        t, inputs = node["class_type"], node["inputs"]
        if t == "QwenImageDiTLoader":
            name = inputs["model_name"].lower()
            key = "model_gguf" if name.endswith(".gguf") else "model_layered" if "layered" in name else "model"
            args += ["--set", f"{node_id}.model_name={files[key]}"]
            handled[(node_id, "model_name")] = True
        elif t == "QwenImageTextEncoderLoader":
            args += ["--set", f"{node_id}.text_encoder_name={files['text_encoder']}"]
            handled[(node_id, "text_encoder_name")] = True
        elif t == "QwenImageVAELoader":
            if "layered" in inputs["vae_name"].lower():  # the RGBA VAE
                args += ["--set", f"{node_id}.vae_name={files['vae_layered']}"]
            handled[(node_id, "vae_name")] = True
        elif t == "QwenImageLoraLoader":
            handled[(node_id, "lora_name")] = True
        elif t == "QwenImageControlNetLoader":
            args += ["--set", f"{node_id}.controlnet_name={files[controlnet_file_for(inputs['controlnet_name'])]}"]
            handled[(node_id, "controlnet_name")] = True
    if any(n["class_type"] == "QwenImageVAELoader" and "layered" not in n["inputs"]["vae_name"].lower()
           for n in prompt.values()):
        args += ["--vae", files["vae"]]
    if any(n["class_type"] == "QwenImageLoraLoader" for n in prompt.values()):
        args += ["--lora", files["lora"]]
    for node_id, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, str) and value.lower().endswith(MODEL_SUFFIXES) and (node_id, name) not in handled:
                pytest.skip(f"no tiny checkpoint for node {node_id} ({node['class_type']}) input {name!r} = {value!r} yet")
    size = PICTURE_SIZE
    for node_id in _id_order(prompt):
        node = prompt[node_id]
        if node["class_type"] in LATENT_NODES:
            args += ["--set", f"{node_id}.width={WIDTH}", "--set", f"{node_id}.height={HEIGHT}"]
            if "aspect_ratio" in node["inputs"]:
                args += ["--set", f"{node_id}.aspect_ratio=custom"]
            size = (WIDTH, HEIGHT)
    for node_id, node in prompt.items():
        if node["class_type"] == "ImageScaleToMaxDimension":
            # Small, not 1328: the control map then sets an output of round(side * scale),
            # cropped to multiples of 8 by the VAE encode (Control Reference).
            largest = 128
            args += ["--set", f"{node_id}.largest_size={largest}"]
            scale = largest / max(PICTURE_SIZE)
            size = tuple(round(side * scale) // 8 * 8 for side in PICTURE_SIZE)
            if any(n["class_type"] == "QwenImageEmptyLayeredLatent" for n in prompt.values()):
                size = tuple(side // 16 * 16 for side in size)  # the layered latent takes the input's size in 16s
    if any(n["class_type"] == "LoadImage" for n in prompt.values()):
        args += ["--image", str(picture)]
    return args, size


def run_cli(server, workflow: Path | str, args: list[str], out: Path, timeout: float = 300):
    cmd = [sys.executable, str(CLI), "--server", server.url, "--workflow", str(workflow), "--out", str(out),
           "--timeout", str(timeout), "--quiet", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60)
    assert result.returncode == 0, (
        f"queue tool failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n--- ComfyUI log ---\n{server.log_tail()}"
    )
    return sorted(out.iterdir())


def make_picture(folder: Path) -> Path:
    """The input picture for LoadImage (also used by bench/gpu_comfyui.py)."""
    from PIL import Image

    # RGBA: LoadImage's MASK comes from the alpha channel (transparent = inpaint here).
    img = Image.new("RGBA", PICTURE_SIZE, (200, 120, 40, 255))
    img.paste((30, 160, 220, 0), (24, 16, 72, 48))
    path = folder / "input_96x64.png"
    img.save(path)
    return path


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    return make_picture(tmp_path_factory.mktemp("input"))


@pytest.mark.parametrize("workflow", API_WORKFLOWS, ids=lambda p: p.stem)
def test_bundled_workflow_runs(server, object_info, picture, workflow, tmp_path):
    from PIL import Image

    prompt = json.loads(workflow.read_text(encoding="utf-8"))
    args, size = plan(prompt, server.files, object_info, picture)
    saved = run_cli(server, workflow, args, tmp_path / "out")
    batch = sum(int(n["inputs"].get("batch_size", 1)) for n in prompt.values() if n["class_type"] in LATENT_NODES) or 1
    batch *= max([int(n["inputs"]["layers"]) for n in prompt.values() if n["class_type"] == "QwenImageEmptyLayeredLatent"]
                 or [1])  # one image per layer
    assert len(saved) == batch * sum(1 for n in prompt.values() if n["class_type"] == "SaveImage"), saved
    for path in saved:
        with Image.open(path) as img:
            img.load()
            assert img.size == size, f"{path.name}: {img.size}, expected {size}"


def _t2i_prompt(server, seed: int, steps: int = 2, size: int = 64) -> dict:
    cli = load_cli()
    prompt = cli.load_workflow("qwen_image_t2i")
    args = cli.build_parser().parse_args([
        "--workflow", "qwen_image_t2i", "--seed", str(seed), "--steps", str(steps),
        "--model", server.files["model"], "--text-encoder", server.files["text_encoder"], "--vae", server.files["vae"],
        "--set", f"6.width={size}", "--set", f"6.height={size}", "--set", "6.aspect_ratio=custom",
    ])
    cli.apply_overrides(prompt, args)
    return prompt


def _queue(server, prompt: dict) -> str:
    reply = server.post_json("/prompt", {"prompt": prompt, "client_id": "qwenimage-integration"})
    assert reply and "prompt_id" in reply, reply
    return reply["prompt_id"]


def _wait(server, prompt_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.get_json(f"/history/{prompt_id}").get(prompt_id)
        if entry:
            return entry
        time.sleep(0.2)
    pytest.fail(f"prompt {prompt_id} did not finish within {timeout} s:\n{server.log_tail()}")


def _succeeded(entry: dict) -> bool:
    return (entry.get("status") or {}).get("status_str") == "success"


def _images(entry: dict) -> list[dict]:
    return [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])]


def _idle(server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = server.get_json("/queue")
        if not q["queue_running"] and not q["queue_pending"]:
            return
        time.sleep(0.2)
    pytest.fail("ComfyUI's queue did not empty")


def test_interrupt_stops_sampling_and_the_next_prompt_runs(server):
    _idle(server)
    # Warm the loaders and text encoders (cached by ComfyUI), so the long prompt goes straight to sampling.
    assert _succeeded(_wait(server, _queue(server, _t2i_prompt(server, seed=1))))
    long_id = _queue(server, _t2i_prompt(server, seed=2, steps=1000, size=512))  # minutes uninterrupted
    deadline = time.monotonic() + 60
    while not any(item[1] == long_id for item in server.get_json("/queue")["queue_running"]):
        assert time.monotonic() < deadline, "the long prompt never started"
        time.sleep(0.1)
    time.sleep(2.0)  # into the 1000 steps (loaders and text encodes are cached)
    asked = time.monotonic()
    server.post_json("/interrupt", {})
    entry = _wait(server, long_id, timeout=60)
    stopped_after = time.monotonic() - asked
    status = entry["status"]
    events = dict((event, data) for event, data in status["messages"])
    assert status["status_str"] == "error" and "execution_interrupted" in events, (
        f"the 1000-step prompt was not interrupted: {status}\n{server.log_tail()}"
    )
    assert events["execution_interrupted"]["node_type"] == "QwenImageSampler"
    assert "execution_error" not in events, events.get("execution_error")
    assert stopped_after < 30, f"sampling took {stopped_after:.1f} s to stop"
    _idle(server)
    after = _wait(server, _queue(server, _t2i_prompt(server, seed=3)))
    assert _succeeded(after) and len(_images(after)) == 1, after.get("status")


def test_two_queued_prompts_both_finish(server):
    _idle(server)
    first = _queue(server, _t2i_prompt(server, seed=11))
    second = _queue(server, _t2i_prompt(server, seed=12))
    entries = [_wait(server, first), _wait(server, second)]
    assert all(_succeeded(e) for e in entries), [e.get("status") for e in entries]
    names = [img["filename"] for e in entries for img in _images(e)]
    assert len(names) == 2 and len(set(names)) == 2, names


def test_the_optional_speed_nodes_run_when_switched_on(server):
    """The t2i workflow's bypassed Speed Options and Torch Compile nodes, switched on (the eager
    backend: no compiler needed on this CPU), give the same image as the plain graph. The int8 and
    block-scaled matmuls, asked for on a bf16 model, change nothing (a warning says so)."""
    from PIL import Image

    _idle(server)
    plain = _wait(server, _queue(server, _t2i_prompt(server, seed=21)))
    fast = _t2i_prompt(server, seed=21)
    fast["11"] = {"class_type": "QwenImageSpeedOptions", "inputs": {"model": ["1", 0], "attention": "sdpa",
                                                                     "fp8_matmul": "off", "int8_matmul": "on",
                                                                     "blockscaled_matmul": "on"}}
    fast["12"] = {"class_type": "QwenImageTorchCompile", "inputs": {"model": ["11", 0], "backend": "eager",
                                                                     "mode": "default"}}
    fast["7"]["inputs"]["model"] = ["12", 0]
    fast["9"]["inputs"]["filename_prefix"] = "speed-nodes"
    entry = _wait(server, _queue(server, fast))
    assert _succeeded(plain) and _succeeded(entry), (entry.get("status"), server.log_tail())
    pixels = []
    for e in (plain, entry):
        with urllib.request.urlopen(server.url + "/view?" + urllib.parse.urlencode(_images(e)[0]), timeout=30) as r:
            pixels.append(Image.open(io.BytesIO(r.read())).convert("RGB").tobytes())
    assert pixels[0] == pixels[1]


def test_template_browser_lists_every_ui_workflow(server):
    """ComfyUI's template browser lists <pack>/workflows/*.json (not the api/ twins, which would
    not open as UI workflows)."""
    templates = server.get_json("/workflow_templates")
    ours = [
        names for pack, names in templates.items()
        if (Path(server.comfy) / "custom_nodes" / pack).resolve() == ROOT.resolve()
    ]
    assert ours, f"the pack's workflows are not offered as templates: {templates}"
    assert sorted(ours[0]) == sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
