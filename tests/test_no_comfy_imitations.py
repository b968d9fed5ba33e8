"""The pack never stands in for a ComfyUI class.

An imitation of ComfyUI's ``LoadedModel`` / ``ModelPatcher`` put into ComfyUI's model list broke
every node in ComfyUI 0.30 the day its memory manager read one more member (``is_dynamic``).
So: a class of ours that defines the members ComfyUI's model management calls must derive from
ComfyUI's real class. Checked at the source level, since ComfyUI is not importable here.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Members through which ComfyUI's memory manager drives a model (LoadedModel / ModelPatcher).
MANAGEMENT_MEMBERS = {
    "model_memory", "model_loaded_memory", "model_offloaded_memory", "model_memory_required",
    "model_unload", "model_use_more_vram", "is_dead", "currently_used",
    "loaded_size", "model_size", "partially_load", "partially_unload", "is_clone", "is_dynamic",
    "current_loaded_device", "model_patches_models", "detach", "model_patches_to",
}
# How our sources refer to ComfyUI's real classes (all imports of comfy.* go through runtime).
REAL_BASES = {"runtime.ModelPatcher", "runtime.QwenImageBaseModel"}


def _sources():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] in {"tests", "bench", ".git"}:  # the benchmarks import ComfyUI as a peer to time
            continue
        yield path


def _base_names(node: ast.ClassDef) -> set[str]:
    return {ast.unparse(b) for b in node.bases}


def test_classes_speaking_comfyuis_model_management_protocol_derive_from_the_real_classes():
    offenders = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            members = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            mirrored = members & MANAGEMENT_MEMBERS
            if len(mirrored) >= 2 and not _base_names(node) & REAL_BASES:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} defines {sorted(mirrored)}")
    assert not offenders, "classes imitating ComfyUI's model management:\n" + "\n".join(offenders)


def test_nothing_of_ours_is_put_into_comfyuis_model_list_by_hand():
    """Only load_models_gpu may add to ComfyUI's list of loaded models."""
    hits = [
        f"{path.relative_to(ROOT)}"
        for path in _sources()
        if "current_loaded_models" in path.read_text(encoding="utf-8")
    ]
    assert hits == []


def test_only_runtime_imports_comfy():
    importers = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(n == "comfy" or n.startswith("comfy.") for n in names):
                importers.append(str(path.relative_to(ROOT)))
    allowed = {"nodes/runtime.py"}
    assert set(importers) <= allowed, sorted(set(importers) - allowed)
