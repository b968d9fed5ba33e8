"""A stand-in for PyAV (``av``), for machines that lack it (the lent GPU machine has no PyAV and
its wheel, ~35 MB, does not fit in what travels there).

ComfyUI imports ``av`` at start-up for its video and audio types; nothing the GPU check runs
decodes or encodes video. Every ``av.*`` module and attribute exists here as an inert
placeholder, so those imports succeed; calling anything raises, saying why. bench/gpu_comfyui.py
puts this folder on ComfyUI's PYTHONPATH only when the real package is missing.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+stand-in"
STAND_IN = True


class _Placeholder(type):
    """A class whose attributes are placeholders too (``av.video.reformatter.ColorRange.JPEG``)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(name)

    def __call__(cls, *args, **kwargs):
        raise RuntimeError("PyAV is not installed here (bench/shims/av is a stand-in): video and audio are unavailable")


def _placeholder(name: str) -> type:
    return _Placeholder(name, (), {})


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(name)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes every ``av.<sub>`` import (``from av.container import InputContainer``) succeed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Module(spec.name)

    def exec_module(self, module):
        module.__path__ = []


sys.modules[__name__].__class__ = _Module
sys.meta_path.append(_Finder())
