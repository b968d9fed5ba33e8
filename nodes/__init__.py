"""ComfyUI node adapters; each family module contributes its classes here."""
import importlib

# One module per node family; each exports NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS.
FAMILIES = (
    "loaders",
    "conditioning",
    "latents",
    "sampling",
    "lora",
    "edit",
    "controlnet",
    "compile",
    "options",
    "comfy_model",
)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _name in FAMILIES:
    _family = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_family.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_family.NODE_DISPLAY_NAME_MAPPINGS)
