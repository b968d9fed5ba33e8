"""Import the pack the way ComfyUI does: as a package, whatever its folder is called.

The pack uses relative imports only (ComfyUI owns the top-level name ``nodes``), so tests
reach it as ``qwenimage_pack.core...`` / ``qwenimage_pack.nodes...``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_REFERENCE = ROOT.parent / "shared" / "reference"


def _register_pack() -> None:
    """Make ``qwenimage_pack`` a package rooted at the checkout without running its ``__init__``,
    so model tests do not import the nodes; tests/test_package.py runs the real ``__init__``."""
    if "qwenimage_pack" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "qwenimage_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["qwenimage_pack"] = module


_register_pack()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    if not SHARED_REFERENCE.is_dir():
        pytest.skip("../shared/reference is not present in this checkout")
    return SHARED_REFERENCE


@pytest.fixture(scope="session")
def tokenizer_dir(shared_reference) -> Path:
    d = shared_reference / "qwen25_tokenizer"
    if not (d / "vocab.json").is_file():
        pytest.skip("reference tokenizer files are not present")
    return d
