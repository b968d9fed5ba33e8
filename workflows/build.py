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
from layout import COLORS, NOTE_WIDTH, place  # noqa: E402  (after the path set-up above)

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
    pos: tuple = (0, 0)  # ignored: layout.py places every node
    size: tuple | None = None  # (width, height) wanted; layout.py makes it at least what the frontend draws
    title: str | None = None
    models: list = field(default_factory=list)
    bypassed: bool = False  # shipped switched off (UI mode 4): the user turns it on with Ctrl+B
    group: str | None = None  # overrides the group (and column) its type gets in ROLES
    column: int | None = None

    def __post_init__(self):
        self.size_given = self.size is not None
        self.size = tuple(self.size or (320, 120))


TEXT_ENCODER = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
VAE = "qwen_image_vae.safetensors"


def loaders(model: str, variant: str = "auto", weight_dtype: str = "default", vae: str = VAE, also: tuple = ()) -> list[Node]:
    """Step 1's three loaders, ids 1-3: diffusion model ``model`` (``also``: other files its loader is
    offered, with their links), the fp8 text encoder, and ``vae``."""
    return [
        Node(1, "QwenImageDiTLoader", {"model_name": model, "weight_dtype": weight_dtype, "variant": variant}, models=[model, *also]),
        Node(2, "QwenImageTextEncoderLoader", {"text_encoder_name": TEXT_ENCODER, "weight_dtype": "default", "mmproj_name": "none"}, models=[TEXT_ENCODER]),
        Node(3, "QwenImageVAELoader", {"vae_name": vae}, models=[vae]),
    ]


def _models_property(names):
    return [{"name": n, "url": MODELS[n][0], "directory": MODELS[n][1]} for n in names]


def ui_workflow(nodes: list[Node]) -> dict:
    groups = arrange(nodes)
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
        node.update(_colors(n))
        result_nodes.append(node)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "qwenimage/" + "/".join(n.type for n in nodes))),
        "revision": 0,
        "last_node_id": max(n.id for n in nodes),
        "last_link_id": next_link - 1,
        "nodes": result_nodes,
        "links": links,
        "groups": groups,
        "config": {},
        # No saved view (ds): both frontends then fit the whole graph to the window on open.
        "extra": {},
        "version": 0.4,
    }


def _colors(n: Node) -> dict:
    if n.type == "MarkdownNote":
        return dict(COLORS["note"])
    if n.title and "Negative" in n.title:
        return dict(COLORS["negative"])
    if n.title and ("Positive" in n.title or n.title == "Prompt"):
        return dict(COLORS["positive"])
    return {}


# Where each node type goes: (column, rank within the column, group title). See layout.py.
ROLES = {
    "MarkdownNote:Model links": (0, 0, None),
    "QwenImageDiTLoader": (1, 0, "Step 1 - Load models"),
    "QwenImageTextEncoderLoader": (1, 1, "Step 1 - Load models"),
    "QwenImageVAELoader": (1, 2, "Step 1 - Load models"),
    "QwenImageControlNetLoader": (1, 3, "Step 1 - Load models"),
    "QwenImageAsComfyModel": (1, 4, "Step 1 - Load models"),
    "ModelSamplingAuraFlow": (1, 5, "Step 1 - Load models"),
    "QwenImageEmptyLatent": (1, 10, "Step 2 - Image size"),
    "QwenImageEmptyLayeredLatent": (1, 12, "Step 2 - Load image"),
    "LoadImage": (1, 10, "Step 2 - Load image"),
    "QwenImageLoraLoader": (2, 0, "LoRA (Lightning 8 steps)"),
    "QwenImageTextEncode": (2, 10, "Step 3 - Prompt"),
    "QwenImageEditEncode": (2, 10, "Step 3 - Prompt"),
    "ReferenceLatent": (2, 12, "Step 3 - Prompt"),
    "ImageScaleToMaxDimension": (2, 20, "Step 4 - Control image"),
    "Canny": (2, 21, "Step 4 - Control image"),
    "PreviewImage": (2, 22, "Step 4 - Control image"),
    "QwenImageVAEEncode": (2, 30, "Masked latent"),
    "QwenImageInpaintMask": (2, 31, "Masked latent"),
    "QwenImageSpeedOptions": (2, 40, "Optional: faster (select, Ctrl+B)"),
    "QwenImageTorchCompile": (2, 41, "Optional: faster (select, Ctrl+B)"),
    "QwenImageControlNetApply": (3, 0, None),
    "QwenImageControlReference": (3, 0, None),
    "QwenImageSampler": (3, 1, None),
    "KSampler": (3, 1, None),
    "MarkdownNote": (3, 9, None),
    "QwenImageVAEDecode": (4, 0, None),
    "QwenImageDecodeLayers": (4, 0, None),
    "QwenImageMatchSize": (4, 1, None),
    "SaveImage": (4, 2, None),
}


def arrange(nodes: list[Node]) -> list[dict]:
    """Add the generated "Model links" note, place every node and return the groups."""
    if not any(n.title == "Model links" for n in nodes):
        names = [m for n in nodes for m in n.models]
        nodes.append(Node(max(n.id for n in nodes) + 1, "MarkdownNote", {"text": model_links(names)},
                          size=(NOTE_WIDTH, 0), title="Model links"))
    entries: dict[tuple, list] = {}
    for order, n in enumerate(nodes):
        role = ROLES.get(f"{n.type}:{n.title}") or ROLES[n.type]
        column = n.column if n.column is not None else role[0]
        title = n.group or role[2]
        key = (column, title if title else f"#{n.id}")
        # A node moved to another column (ControlNet's image) goes under that column's own groups.
        rank = role[1] if n.column is None else 20
        entries.setdefault(key, []).append((rank, order, n.id))
    columns: dict[int, list] = {}
    for (column, key), members in sorted(entries.items(), key=lambda kv: (kv[0][0], min(kv[1]))):
        members.sort()
        columns.setdefault(column, []).append((None if key.startswith("#") else key, [i for _r, _o, i in members]))
    by_id = {n.id: n for n in nodes}
    return place([columns[c] for c in sorted(columns)], by_id)


def model_links(names: list[str]) -> str:
    """The note of the official templates: a download link per file, then where each one goes."""
    by_dir: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        by_dir.setdefault(MODELS[name][1], []).append(name)
    lines = ["## Model links", "", "Download the files (the *Missing Models* dialog offers the same links):", ""]
    for name in dict.fromkeys(names):
        lines.append(f"- [{name}]({MODELS[name][0]})")
    lines += ["", "**Model storage location**", "", "```", "📂 ComfyUI/", "├── 📂 models/"]
    dirs = list(by_dir)
    for k, d in enumerate(dirs):
        last_dir = k == len(dirs) - 1
        lines.append(f"│   {'└' if last_dir else '├'}── 📂 {d}/")
        for j, name in enumerate(by_dir[d]):
            lines.append(f"│   {' ' if last_dir else '│'}   {'└' if j == len(by_dir[d]) - 1 else '├'}── {name}")
    lines.append("```")
    return "\n".join(lines) + "\n"


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


def template_info_js() -> str:
    from templates import TEMPLATES

    entries = [{"name": n, "title": t, "description": d} for n, t, d in TEMPLATES]
    return ("// Generated by workflows/build.py from workflows/templates.py: do not edit.\n"
            "export const TEMPLATE_INFO = Object.freeze(" + json.dumps(entries, indent=2, ensure_ascii=False) + ");\n")


def render() -> dict[Path, str]:
    files = {}
    for name, build in discover().items():
        nodes = build()
        files[HERE / f"{name}.json"] = json.dumps(ui_workflow(nodes), indent=2, ensure_ascii=False) + "\n"
        files[HERE / "api" / f"{name}.json"] = json.dumps(api_workflow(nodes), indent=2, ensure_ascii=False) + "\n"
    files[HERE.parent / "js" / "lib" / "template_info.js"] = template_info_js()
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
    if not check:
        from thumbnails import write_thumbnails  # Pillow: only needed to redraw them

        write_thumbnails(HERE)
    if stale:
        print("out of date:", *map(str, stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
