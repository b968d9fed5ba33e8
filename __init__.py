"""Qwen-Image nodes for ComfyUI: text-to-image, edit, ControlNet, GGUF and LoRA support.

ComfyUI imports this folder as a package; outside ComfyUI (tests, scripts) the same import
works and the nodes fall back to a models folder named by $QWENIMAGE_MODELS_DIR.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
