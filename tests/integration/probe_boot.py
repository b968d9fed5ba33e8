"""The start of every probe script (run in ComfyUI's own Python by the integration tests):
ComfyUI on its path with its command-line settings parsed (``--cpu``), and this pack importable
as ``qwenimage_pack``, the way ComfyUI loads a custom node folder.

A probe is called as ``python PROBE <ComfyUI checkout> <this pack's checkout> [args]`` (``args``
here) and starts with
``import probe_boot`` (its own folder is first on sys.path), before importing ``comfy.*``.
"""
from __future__ import annotations

import importlib.util
import sys

comfy_dir, pack_dir = sys.argv[1], sys.argv[2]
args = sys.argv[3:]  # the probe's own arguments (run_probe's extra args)
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, comfy_dir)

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

_spec = importlib.util.spec_from_file_location("qwenimage_pack", f"{pack_dir}/__init__.py",
                                               submodule_search_locations=[pack_dir])
sys.modules["qwenimage_pack"] = importlib.util.module_from_spec(_spec)
