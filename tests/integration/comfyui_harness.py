"""A real ComfyUI for the integration tests: tiny checkpoints, the pack linked in, one server per run.

$COMFYUI_DIR names a ComfyUI checkout; its Python is $COMFYUI_PYTHON or $COMFYUI_DIR/venv/bin/python.
The tiny checkpoints are built here, in the test's own Python (diffusers / transformers), and
written into a temporary models folder that an --extra-model-paths-config yaml hands to ComfyUI.
If custom_nodes/ has no link to this checkout, one is made and removed again at exit. The
server listens on 127.0.0.1 only; every wait is bounded.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT

LINK_NAME = "ComfyUI-QwenImage"
START_TIMEOUT = 300  # first start imports CUDA torch and builds the frontend's node list
MODEL_SUFFIXES = (".safetensors", ".sft", ".gguf")

# Tiny files written for ComfyUI's model folders (folder, file name).
TINY = {
    "model": ("diffusion_models", "qwen_image_tiny.safetensors"),
    "model_gguf": ("diffusion_models", "qwen-image-tiny-Q8_0.gguf"),
    "text_encoder": ("text_encoders", "qwen_2.5_vl_tiny.safetensors"),
    "vae": ("vae", "qwen_image_vae_tiny.safetensors"),
    "lora": ("loras", "qwen_image_tiny_lora.safetensors"),
    "controlnet_union": ("controlnet", "qwen_image_controlnet_union_tiny.safetensors"),
    "controlnet_inpaint": ("controlnet", "qwen_image_controlnet_inpainting_tiny.safetensors"),
    "controlnet_fun": ("controlnet", "qwen_image_2512_fun_controlnet_tiny.safetensors"),
    "model_layered": ("diffusion_models", "qwen_image_layered_tiny.safetensors"),
    "vae_layered": ("vae", "qwen_image_layered_vae_tiny.safetensors"),
    "patch_diffsynth": ("model_patches", "qwen_image_canny_diffsynth_tiny.safetensors"),
    "patch_diffsynth_inpaint": ("model_patches", "qwen_image_inpaint_diffsynth_tiny.safetensors"),
}


def controlnet_file_for(name: str) -> str:
    """Which tiny control file stands in for a ControlNet file named in a workflow."""
    n = name.lower()
    if "diffsynth" in n:
        return "patch_diffsynth_inpaint" if "inpaint" in n else "patch_diffsynth"
    if "fun" in n:
        return "controlnet_fun"
    return "controlnet_inpaint" if "inpaint" in n else "controlnet_union"


def load_cli():
    spec = importlib.util.spec_from_file_location("qwenimage_queue", ROOT / "tools" / "qwenimage_queue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def comfyui_paths() -> tuple[Path, Path]:
    """(checkout, python) or a pytest skip saying what is missing."""
    root = os.environ.get("COMFYUI_DIR")
    if not root:
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout to run the integration tests")
    comfy = Path(root).resolve()
    if not (comfy / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={root} has no main.py: not a ComfyUI checkout")
    python = Path(os.environ.get("COMFYUI_PYTHON") or comfy / "venv" / "bin" / "python")
    if not python.exists():
        pytest.fail(f"no Python for ComfyUI at {python}: set COMFYUI_PYTHON, or create {comfy / 'venv'}")
    return comfy, python


def run_probe(name: str, *args: str, timeout: float = 600) -> dict:
    """Run the probe script ``name`` (next to this file, started by probe_boot.py) in ComfyUI's own
    Python against this checkout, ``args`` after the two paths; returns the JSON observations it
    prints last."""
    comfy, python = comfyui_paths()
    pack = Path(__file__).resolve().parents[2]
    run = subprocess.run([str(python), str(Path(__file__).with_name(name)), str(comfy), str(pack), *args],
                         capture_output=True, text=True, timeout=timeout, cwd=str(comfy))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- tiny checkpoints

def write_tiny_models(models: Path) -> dict[str, str]:
    """The tiny MMDiT (safetensors with ComfyUI's prefix, and GGUF Q8_0), text encoder (original
    key layout, no tokenizer beside it: ComfyUI's bundled one must be found), VAE and a LoRA."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    import references as refs

    for folder, _ in TINY.values():
        (models / folder).mkdir(parents=True, exist_ok=True)
    path = {key: models / folder / name for key, (folder, name) in TINY.items()}

    transformer = refs.tiny_transformer()
    dit = {k: v.detach().contiguous() for k, v in transformer.state_dict().items()}
    save_file({"model.diffusion_model." + k: v for k, v in dit.items()}, path["model"])
    _write_gguf(path["model_gguf"], dit, np)
    save_file(refs.original_text_layout(refs.tiny_text_encoder().state_dict()), path["text_encoder"])
    save_file({k: v.contiguous() for k, v in refs.tiny_vae().state_dict().items()}, path["vae"])

    g = torch.Generator().manual_seed(5)
    lora = {}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2"):
        out_f, in_f = dit[name + ".weight"].shape
        lora[f"transformer.{name}.lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.05
        lora[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.05
    save_file(lora, path["lora"])

    # InstantX Union / Inpainting as diffusers builds them (inpainting: 4 extra packed mask channels).
    from diffusers import QwenImageControlNetModel

    for key, extra, seed in (("controlnet_union", 0, 6), ("controlnet_inpaint", 4, 7)):
        # the tiny MMDiT's shape (references.tiny_transformer), which the control models must share
        cn = QwenImageControlNetModel(extra_condition_channels=extra, **dict(refs.TINY_MMDIT, joint_attention_dim=refs.TEXT_HIDDEN))
        refs._randomize(cn.eval(), seed)  # the zero-initialised heads must matter
        save_file({k: v.detach().contiguous() for k, v in cn.state_dict().items()}, path[key])
    for key, extra in (("patch_diffsynth", 0), ("patch_diffsynth_inpaint", 4)):
        save_file(refs.diffsynth_patch_state(g, refs.TINY_MMDIT["num_layers"], extra), path[key])
    # Qwen-Image-Layered: the extra timestep embedding and layer RoPE; its VAE takes RGBA (4 channels).
    layered = refs.tiny_transformer(seed=3, use_additional_t_cond=True, use_layer3d_rope=True)
    save_file({"model.diffusion_model." + k: v.detach().contiguous() for k, v in layered.state_dict().items()},
              path["model_layered"])
    from diffusers import AutoencoderKLQwenImage

    rgba = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                                  temperal_downsample=[False, True, True], input_channels=4).eval()
    refs._randomize(rgba, 8, std=0.08)
    save_file({k: v.detach().contiguous() for k, v in rgba.state_dict().items()}, path["vae_layered"])
    # alibaba-pai's Fun ControlNet in its file layout: one control block per tiny main block.
    save_file(refs.fun_controlnet_state(g, blocks=refs.TINY_MMDIT["num_layers"]), path["controlnet_fun"])
    return {key: name for key, (_, name) in TINY.items()}


def _write_gguf(path: Path, state: dict, np) -> None:
    from gguf import GGMLQuantizationType as T

    from gguf_writer_util import encode, write_gguf

    rng = np.random.default_rng(0)
    tensors = {}
    for name, t in state.items():
        values = t.float().numpy()
        qtype = T.Q8_0 if values.ndim == 2 and values.shape[-1] % 32 == 0 else T.F32
        data, raw, _ = encode(values, qtype, rng)
        tensors[name] = (data, raw)
    write_gguf(path, "qwen_image", tensors)


# ----------------------------------------------------------------------------- the server

class ComfyUIServer:
    """One ComfyUI process. ``device_flags`` default to the CPU (the integration tests);
    bench/gpu_comfyui.py clears them to run on the GPU and adds its own ``extra_flags``."""

    def __init__(self, comfy: Path, python: Path, work: Path):
        self.comfy, self.python, self.work = comfy, python, work
        self.device_flags: list[str] = ["--cpu"]
        self.extra_flags: list[str] = []
        self.start_timeout = START_TIMEOUT
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "comfyui.log"
        self.models = work / "models"
        self.input_dir = work / "input"
        self.output_dir = work / "output"
        self.proc: subprocess.Popen | None = None
        self.created_link: Path | None = None
        self.files: dict[str, str] = {}

    # -- set-up
    def install_pack(self) -> None:
        custom = self.comfy / "custom_nodes"
        custom.mkdir(exist_ok=True)
        for entry in custom.iterdir():
            if entry.resolve() == ROOT:
                return  # already installed (a link or the checkout itself)
        link = custom / LINK_NAME
        if link.exists() or link.is_symlink():
            pytest.fail(f"{link} exists and is another copy of the pack; remove it or point it at {ROOT}")
        link.symlink_to(ROOT, target_is_directory=True)
        self.created_link = link

    def write_config(self) -> Path:
        lines = ["qwenimage_integration_test:", f"    base_path: {self.models}"]
        lines += [f"    {folder}: {folder}" for folder in sorted({f for f, _ in TINY.values()})]
        cfg = self.work / "extra_model_paths.yaml"
        cfg.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return cfg

    def start(self) -> None:
        for d in (self.input_dir, self.output_dir, self.work / "temp", self.work / "user"):
            d.mkdir(parents=True, exist_ok=True)
        self.files = write_tiny_models(self.models)
        cfg = self.write_config()
        self.install_pack()
        cmd = [
            str(self.python), "main.py", *self.device_flags, "--listen", "127.0.0.1", "--port", str(self.port),
            "--extra-model-paths-config", str(cfg), "--disable-auto-launch",
            "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
            "--temp-directory", str(self.work / "temp"), "--user-directory", str(self.work / "user"),
            "--database-url", "sqlite:///:memory:", *self.extra_flags,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("QWENIMAGE_")}
        env["PYTHONUNBUFFERED"] = "1"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with status {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                info = self.get_json("/object_info/QwenImageSampler")
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(1.0)
                continue
            if "QwenImageSampler" not in info:
                raise RuntimeError(f"ComfyUI started without the pack's nodes:\n{self.log_tail()}")
            return
        raise RuntimeError(f"ComfyUI did not answer within {self.start_timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: only what we started
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        if self.created_link is not None and self.created_link.is_symlink():
            self.created_link.unlink()
            self.created_link = None

    # -- HTTP
    def get_json(self, path: str, timeout: float = 10):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8"))

    def post_json(self, path: str, body, timeout: float = 10):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw.strip().startswith(b"{") else None

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SERVER: ComfyUIServer | None = None
_FAILED: str | None = None


def shared_server() -> ComfyUIServer:
    """One ComfyUI for the whole pytest run (both integration test files), stopped at exit."""
    global _SERVER, _FAILED
    comfy, python = comfyui_paths()
    if _FAILED:
        pytest.fail(_FAILED)
    if _SERVER is None:
        work = Path(tempfile.mkdtemp(prefix="qwenimage-comfyui-"))
        server = ComfyUIServer(comfy, python, work)

        def cleanup():
            server.stop()
            shutil.rmtree(work, ignore_errors=True)

        atexit.register(cleanup)
        try:
            server.start()
        except Exception as err:
            server.stop()
            _FAILED = str(err)
            pytest.fail(_FAILED)
        _SERVER = server
    return _SERVER
