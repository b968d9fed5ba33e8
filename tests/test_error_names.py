"""Our exceptions as ComfyUI's error dialog names them: ``qwenimage.<Name>``, not the pack's folder path.

ComfyUI imports the pack under its folder path, and execution.full_type_name (both 0.3.6x and
0.30) joins ``__module__`` and ``__qualname__``; a plain class would show
``/…/custom_nodes/ComfyUI-QwenImage.core.errors.WeightFileError``.
"""
from __future__ import annotations

import importlib
import pickle

import pytest

from conftest import ROOT


def full_type_name(klass):  # ComfyUI's execution.full_type_name, verbatim
    module = klass.__module__
    if module == 'builtins':
        return klass.__qualname__
    return module + '.' + klass.__qualname__


def _pack_modules():
    names = []
    for folder in ("core", "nodes"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            names.append("qwenimage_pack." + ".".join(parts))
    return names


def test_every_public_exception_of_the_pack_has_a_short_name():
    found = {}
    for name in _pack_modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ in (name, "qwenimage"):
                found[attr] = obj
    plain = [n for n, cls in found.items() if cls.__module__ != "qwenimage" and not n.startswith("_")]
    assert not plain, f"exceptions that ComfyUI would name by the pack's path: {plain}; derive them from errors.PackError"
    assert {"WeightFileError", "TokenizerNotFoundError", "ModelFileNotFound"} <= set(found)
    for cls in found.values():
        if not cls.__name__.startswith("_"):
            assert full_type_name(cls) == f"qwenimage.{cls.__qualname__}"


def _errors():
    from qwenimage_pack.core.encoders.tokenizer import TokenizerNotFoundError
    from qwenimage_pack.core.errors import WeightFileError
    from qwenimage_pack.nodes.runtime import ModelFileNotFound

    return [
        WeightFileError("/models/x.safetensors", "not a safetensors file.", "a Qwen-Image MMDiT"),
        TokenizerNotFoundError("/models/te", "no tokenizer found."),
        ModelFileNotFound("'x.safetensors' was not found in the diffusion_models folder."),
    ]


@pytest.mark.parametrize("err", _errors(), ids=lambda e: type(e).__name__)
def test_short_named_errors_still_behave(err):
    """isinstance against the builtin bases (callers catch FileNotFoundError / ValueError), and a
    pickle round trip (the class cannot be looked up under "qwenimage", so __reduce__ rebuilds it)."""
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err) and copy.args == err.args and str(copy) == str(err)
    assert vars(copy) == vars(err)
    if type(err).__name__ == "ModelFileNotFound":
        assert isinstance(copy, FileNotFoundError)
    else:
        assert isinstance(copy, ValueError) and copy.path == err.path
    if type(err).__name__ == "TokenizerNotFoundError":
        assert isinstance(copy, FileNotFoundError)
