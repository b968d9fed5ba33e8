"""The pack's public face: what ComfyUI imports, and the layering rules."""
from __future__ import annotations

import importlib
import re

import pytest

from conftest import ROOT

PACK_PREFIX = "QwenImage"


@pytest.fixture(scope="module")
def pack():
    module = importlib.import_module("qwenimage_pack")
    if not hasattr(module, "NODE_CLASS_MAPPINGS"):
        module.__spec__.loader.exec_module(module)  # conftest registers without running __init__
    return module


def test_exports(pack):
    assert pack.NODE_CLASS_MAPPINGS and set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert (ROOT / pack.WEB_DIRECTORY).resolve().is_dir()
    for required in ("QwenImageDiTLoader", "QwenImageTextEncoderLoader", "QwenImageVAELoader", "QwenImageTextEncode",
                     "QwenImageEmptyLatent", "QwenImageSampler", "QwenImageVAEDecode", "QwenImageVAEEncode"):
        assert required in pack.NODE_CLASS_MAPPINGS


def test_node_classes_follow_comfyui_conventions(pack):
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith(PACK_PREFIX), node_id
        assert callable(getattr(cls(), cls.FUNCTION)), node_id
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.CATEGORY.startswith("Qwen-Image"), node_id
        spec = cls.INPUT_TYPES()
        assert "required" in spec, node_id
        for section in spec.values():
            for name, value in section.items():
                typ = value[0]
                # ComfyUI's validator only treats a *list* as a combo; a tuple would be read as a type name.
                assert isinstance(typ, (list, str)), f"{node_id}.{name}: combo choices must be a list"
                if isinstance(typ, list):
                    default = value[1].get("default") if len(value) > 1 else None
                    assert default is None or default in typ, f"{node_id}.{name}: default {default!r} not in choices"


def _imports(path):
    text = path.read_text(encoding="utf-8")
    return re.findall(r"^\s*(?:from|import)\s+([\w.]+)", text, flags=re.M)


# ComfyUI's own top-level packages and modules. comfy-kitchen (``comfy_kitchen``) is a kernel
# library ComfyUI depends on, not ComfyUI: core may use it where present.
COMFYUI_MODULES = ("comfy", "comfy_extras", "comfy_api", "comfy_api_nodes", "comfy_config", "comfy_execution",
                   "folder_paths", "server", "nodes", "execution", "node_helpers", "latent_preview")


def _is_comfyui(mod: str) -> bool:
    return mod.split(".")[0] in COMFYUI_MODULES


def test_core_never_imports_comfyui():
    for path in (ROOT / "core").rglob("*.py"):
        for mod in _imports(path):
            assert not _is_comfyui(mod), f"{path}: imports {mod}"
    assert _is_comfyui("comfy.model_management") and not _is_comfyui("comfy_kitchen")


def test_only_runtime_imports_comfyui():
    for path in (ROOT / "nodes").glob("*.py"):
        if path.name == "runtime.py":
            continue
        for mod in _imports(path):
            assert not _is_comfyui(mod), f"{path}: imports {mod}; use nodes/runtime.py"


def test_requirements_leave_torch_alone():
    reqs = (ROOT / "requirements.txt").read_text().lower()
    names = {re.split(r"[<>=~! ;\[]", line.strip())[0] for line in reqs.splitlines() if line.strip() and not line.startswith("#")}
    assert not names & {"torch", "torchvision", "torchaudio"}
