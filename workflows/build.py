"""Generates the bundled workflows (UI format) and their API-format twins from one description.

Run `python workflows/build.py` after changing a node's inputs or a workflow below; the test
suite fails when the committed JSON differs from what this script writes.
"""
from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (HERE, HERE / "specs"):  # specs import `build` and each other by module name
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
HF = "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files"

MODELS = {
    "qwen_image_fp8_e4m3fn.safetensors": (f"{HF}/diffusion_models/qwen_image_fp8_e4m3fn.safetensors", "diffusion_models"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": (f"{HF}/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors", "text_encoders"),
    "qwen_image_vae.safetensors": (f"{HF}/vae/qwen_image_vae.safetensors", "vae"),
}

# Output types of every node used below: (name, type) per slot.
OUTPUTS = {
    "QwenImageDiTLoader": [("model", "QWENIMAGE_MODEL")],
    "QwenImageTextEncoderLoader": [("text_encoder", "QWENIMAGE_TEXT_ENCODER")],
    "QwenImageVAELoader": [("vae", "QWENIMAGE_VAE")],
    "QwenImageTextEncode": [("CONDITIONING", "CONDITIONING")],
    "QwenImageEmptyLatent": [("LATENT", "LATENT")],
    "QwenImageSampler": [("LATENT", "LATENT")],
    "QwenImageVAEDecode": [("IMAGE", "IMAGE")],
    "QwenImageVAEEncode": [("LATENT", "LATENT")],
    "QwenImageSpeedOptions": [("model", "QWENIMAGE_MODEL")],
    "QwenImageTorchCompile": [("model", "QWENIMAGE_MODEL")],
    "SaveImage": [],
    "MarkdownNote": [],
}


@dataclass
class Node:
    id: int
    type: str
    widgets: dict  # widget name -> value, in the node's widget order
    inputs: dict = field(default_factory=dict)  # socket name -> (node id, slot, type)
    pos: tuple = (0, 0)
    size: tuple = (320, 120)
    title: str | None = None
    models: list = field(default_factory=list)
    bypassed: bool = False  # shipped switched off (UI mode 4): the user turns it on with Ctrl+B


def _models_property(names):
    return [{"name": n, "url": MODELS[n][0], "directory": MODELS[n][1]} for n in names]


def ui_workflow(nodes: list[Node]) -> dict:
    links, next_link = [], 1
    out_links: dict[tuple[int, int], list[int]] = {}
    ui_nodes = []
    for order, n in enumerate(nodes):
        inputs = []
        for slot, (name, (src, src_slot, typ)) in enumerate(n.inputs.items()):
            links.append([next_link, src, src_slot, n.id, slot, typ])
            out_links.setdefault((src, src_slot), []).append(next_link)
            inputs.append({"name": name, "type": typ, "link": next_link})
            next_link += 1
        ui_nodes.append((order, n, inputs))
    result_nodes = []
    for order, n, inputs in ui_nodes:
        outputs = [
            {"name": name, "type": typ, "slot_index": i, "links": out_links.get((n.id, i), [])}
            for i, (name, typ) in enumerate(OUTPUTS[n.type])
        ]
        props = {"Node name for S&R": n.type}
        if n.models:
            props["models"] = _models_property(n.models)
        node = {
            "id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
            "order": order, "mode": 4 if n.bypassed else 0, "inputs": inputs, "outputs": outputs, "properties": props,
            "widgets_values": list(n.widgets.values()),
        }
        if n.title:
            node["title"] = n.title
        result_nodes.append(node)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "qwenimage/" + "/".join(n.type for n in nodes))),
        "revision": 0,
        "last_node_id": max(n.id for n in nodes),
        "last_link_id": next_link - 1,
        "nodes": result_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def _through_bypassed(by_id: dict, src: int, slot: int, typ: str) -> tuple[int, int]:
    """Where a link really comes from: a bypassed node passes on its first input of the link's
    type, as ComfyUI's frontend does when it turns the graph into a prompt."""
    while by_id[src].bypassed:
        src, slot = next((s, sl) for s, sl, t in by_id[src].inputs.values() if t == typ)
    return src, slot


def api_workflow(nodes: list[Node]) -> dict:
    prompt = {}
    by_id = {n.id: n for n in nodes}
    for n in nodes:
        if n.type in ("MarkdownNote", "Note") or n.bypassed:
            continue
        inputs = {k: v for k, v in n.widgets.items() if not k.startswith("$")}
        for name, (src, slot, typ) in n.inputs.items():
            src, slot = _through_bypassed(by_id, src, slot, typ)
            inputs[name] = [str(src), slot]
        prompt[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return prompt


def discover() -> dict:
    """Every workflow described in workflows/specs/*.py (each module exports WORKFLOWS and may add MODELS)."""
    import importlib.util

    found = {}
    for path in sorted((HERE / "specs").glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"qwenimage_workflow_specs.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        MODELS.update(getattr(module, "MODELS", {}))
        OUTPUTS.update(getattr(module, "OUTPUTS", {}))
        found.update(module.WORKFLOWS)
    return found


def render() -> dict[Path, str]:
    files = {}
    for name, build in discover().items():
        nodes = build()
        files[HERE / f"{name}.json"] = json.dumps(ui_workflow(nodes), indent=2, ensure_ascii=False) + "\n"
        files[HERE / "api" / f"{name}.json"] = json.dumps(api_workflow(nodes), indent=2, ensure_ascii=False) + "\n"
    return files


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, text in render().items():
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        print("out of date:", *map(str, stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
