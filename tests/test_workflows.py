"""Every bundled workflow loads without missing nodes, bad widget values or mistyped links.

Pack nodes are checked against their INPUT_TYPES; core nodes against ComfyUI's /object_info
dump in ../shared/reference (those checks skip where it is absent).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED_REFERENCE

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
API_WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".gguf")


@pytest.fixture(scope="module")
def pack_nodes():
    import importlib

    pack = importlib.import_module("qwenimage_pack.nodes")
    return pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def core_nodes():
    path = SHARED_REFERENCE / "comfyui_object_info.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def node_spec(type_name, pack_nodes, core_nodes):
    """(ordered inputs [(name, type, options, required)], outputs [type]) for a node type."""
    if type_name in pack_nodes:
        cls = pack_nodes[type_name]
        spec = cls.INPUT_TYPES()
        inputs = []
        for section in ("required", "optional"):
            for name, value in spec.get(section, {}).items():
                typ, opts = value[0], (value[1] if len(value) > 1 else {})
                inputs.append((name, typ, opts, section == "required"))
        return inputs, list(cls.RETURN_TYPES)
    if core_nodes is None:
        pytest.skip("core node definitions (../shared/reference/comfyui_object_info.json) are absent")
    if type_name not in core_nodes:
        return None
    info = core_nodes[type_name]
    inputs = []
    for section in ("required", "optional"):
        order = info.get("input_order", {}).get(section) or list(info["input"].get(section, {}))
        for name in order:
            value = info["input"][section][name]
            typ, opts = value[0], (value[1] if len(value) > 1 else {})
            inputs.append((name, typ, opts, section == "required"))
    return inputs, list(info["output"])


def is_widget(typ) -> bool:
    return isinstance(typ, list) or typ in WIDGET_TYPES


def check_value(node, name, typ, opts, value):
    where = f"node {node} input {name!r}"
    if isinstance(typ, list) or typ == "COMBO":
        choices = typ if isinstance(typ, list) else opts.get("options", [])
        if isinstance(value, str) and value.endswith(MODEL_FILE_SUFFIXES):
            return  # a model file the user downloads; the Missing Models dialog offers it
        assert value in choices, f"{where}: {value!r} is not one of {choices}"
    elif typ == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an INT"
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{where}: {value} out of range"
    elif typ == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a FLOAT"
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{where}: {value} out of range"
    elif typ == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a STRING"
    elif typ == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a BOOLEAN"


def types_match(out_type, in_type) -> bool:
    """ComfyUI's rule: equal, a wildcard, or sharing one of comma-separated alternatives."""
    if "*" in (out_type, in_type):
        return True
    return bool({t.strip() for t in out_type.split(",")} & {t.strip() for t in in_type.split(",")})


def test_there_are_workflows():
    assert WORKFLOWS, "no bundled workflows"
    assert {p.name for p in WORKFLOWS} == {p.name for p in API_WORKFLOWS}, "every UI workflow needs an API twin"


def test_bypassed_nodes_are_left_out_of_the_api_twins():
    """Optional nodes ship bypassed (UI mode 4); the API twin runs the graph as the frontend
    would queue it: without them, their consumers fed by what fed them."""
    seen = 0
    for path in WORKFLOWS:
        ui = json.loads(path.read_text(encoding="utf-8"))
        api = json.loads((ROOT / "workflows" / "api" / path.name).read_text(encoding="utf-8"))
        nodes = {n["id"]: n for n in ui["nodes"]}
        bypassed = {i for i, n in nodes.items() if n["mode"] == 4}
        assert not bypassed & {int(k) for k in api}, path.name
        links = {link[0]: link for link in ui["links"]}
        for node in ui["nodes"]:
            if node["id"] in bypassed:
                continue
            for inp in node["inputs"]:
                src, slot = links[inp["link"]][1:3]
                while src in bypassed:  # follow the chain back to a working node
                    src, slot = next(links[i["link"]][1:3] for i in nodes[src]["inputs"] if i["type"] == inp["type"])
                    seen += 1
                assert api[str(node["id"])]["inputs"][inp["name"]] == [str(src), slot], (path.name, node["id"], inp["name"])
    assert seen, "no bundled workflow has an optional (bypassed) node"


def test_generated_files_are_current():
    result = subprocess.run([sys.executable, str(ROOT / "workflows" / "build.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, f"run `python workflows/build.py`: {result.stdout}{result.stderr}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_ui_workflow(path, pack_nodes, core_nodes):
    wf = json.loads(path.read_text(encoding="utf-8"))
    nodes = {n["id"]: n for n in wf["nodes"]}
    specs = {}
    for node in wf["nodes"]:
        t = node["type"]
        if t in FRONTEND_ONLY:
            continue
        spec = node_spec(t, pack_nodes, core_nodes)
        assert spec is not None, f"{path.name}: node {node['id']} has unknown type {t!r} (missing node)"
        specs[node["id"]] = spec
        inputs, _ = spec
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        expected = []
        for name, typ, opts, _required in inputs:
            if is_widget(typ) and name not in linked:
                expected.append((name, typ, opts))
                if opts.get("control_after_generate"):
                    expected.append(("control_after_generate", ["fixed", "increment", "decrement", "randomize"], {}))
        values = node.get("widgets_values", [])
        assert len(values) == len(expected), f"{path.name}: node {node['id']} ({t}) has {len(values)} widget values, expected {[e[0] for e in expected]}"
        for (name, typ, opts), value in zip(expected, values):
            check_value(f"{node['id']} ({t})", name, typ, opts, value)
        for name, typ, _opts, required in inputs:
            if required and not is_widget(typ):
                assert name in linked, f"{path.name}: node {node['id']} ({t}) required input {name!r} is not connected"
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert src in specs and dst in specs, f"{path.name}: link {link_id} joins unknown nodes"
        out_type = specs[src][1][src_slot]
        dst_input = nodes[dst]["inputs"][dst_slot]
        in_type = dict((n, t) for n, t, _o, _r in specs[dst][0])[dst_input["name"]]
        assert dst_input["link"] == link_id
        assert types_match(out_type, typ) and types_match(typ, in_type), (
            f"{path.name}: link {link_id} carries {out_type} from node {src} into {dst_input['name']} ({in_type}) of node {dst}"
        )


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=lambda p: p.name)
def test_api_workflow(path, pack_nodes, core_nodes):
    prompt = json.loads(path.read_text(encoding="utf-8"))
    specs = {}
    for node_id, node in prompt.items():
        spec = node_spec(node["class_type"], pack_nodes, core_nodes)
        assert spec is not None, f"{path.name}: node {node_id} has unknown class_type {node['class_type']!r}"
        specs[node_id] = spec
    for node_id, node in prompt.items():
        inputs, _ = specs[node_id]
        given = node["inputs"]
        known = {n for n, *_ in inputs}
        assert set(given) <= known, f"{path.name}: node {node_id} has unknown inputs {set(given) - known}"
        for name, typ, opts, required in inputs:
            if name not in given:
                assert not required, f"{path.name}: node {node_id} misses required input {name!r}"
                continue
            value = given[name]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                src, slot = value
                assert src in prompt, f"{path.name}: node {node_id}.{name} links to missing node {src}"
                out_type = specs[src][1][slot]
                assert types_match(out_type, typ if not isinstance(typ, list) else "COMBO"), (
                    f"{path.name}: node {node_id}.{name} ({typ}) is fed {out_type}"
                )
            else:
                assert is_widget(typ), f"{path.name}: node {node_id}.{name} needs a link, got a value"
                check_value(node_id, name, typ, opts, value)


# Which ComfyUI folder each loader input reads: the Missing Models dialog downloads there.
MODEL_DIRECTORIES = {
    ("QwenImageDiTLoader", "model_name"): {"diffusion_models"},
    ("QwenImageTextEncoderLoader", "text_encoder_name"): {"text_encoders"},
    ("QwenImageTextEncoderLoader", "mmproj_name"): {"text_encoders"},
    ("QwenImageVAELoader", "vae_name"): {"vae"},
    ("QwenImageLoraLoader", "lora_name"): {"loras"},
    ("QwenImageControlNetLoader", "controlnet_name"): {"controlnet", "model_patches"},
}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_model_file_has_a_download_link(path, pack_nodes, core_nodes):
    wf = json.loads(path.read_text(encoding="utf-8"))
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        inputs, _ = node_spec(node["type"], pack_nodes, core_nodes)
        names = [n for n, typ, _o, _r in inputs if is_widget(typ)]
        widgets = dict(zip(names, node.get("widgets_values", [])))
        models = {m["name"]: m for m in node.get("properties", {}).get("models", [])}
        for name, value in widgets.items():
            if not (isinstance(value, str) and value.endswith(MODEL_FILE_SUFFIXES)):
                continue
            entry = models.get(value)
            where = f"{path.name}: node {node['id']} ({node['type']}).{name} = {value}"
            assert entry is not None, f"{where} has no properties.models entry (Missing Models dialog)"
            assert entry["url"].startswith("https://huggingface.co/") and "/resolve/" in entry["url"], where
            assert entry["url"].rsplit("/", 1)[-1] == value, f"{where}: the URL downloads another file name"
            allowed = MODEL_DIRECTORIES.get((node["type"], name))
            if allowed:
                assert entry["directory"] in allowed, f"{where}: directory {entry['directory']} not in {allowed}"


def _layout():
    import importlib.util

    spec = importlib.util.spec_from_file_location("qwenimage_workflow_layout", ROOT / "workflows" / "layout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_nodes_do_not_overlap(path):
    """Node rectangles as the frontend draws them: title bar above pos, and each body at least as
    tall as the frontend makes it (it grows a node saved smaller than its widgets need, which is
    how the Edit-2509 positive prompt came to cover the negative one)."""
    layout = _layout()
    wf = json.loads(path.read_text(encoding="utf-8"))
    for n in wf["nodes"]:
        need = layout.MIN_HEIGHT.get(n["type"])
        assert need is not None, f"{path.name}: no frontend height known for {n['type']} (add it to layout.MIN_HEIGHT)"
        assert n["size"][1] >= need, f"{path.name}: node {n['id']} ({n['type']}) is {n['size'][1]} px tall, the frontend draws {need}"
    assert layout.overlaps(layout.rectangles(wf["nodes"]), margin=10) == [], path.name


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_shape_of_the_official_templates(path):
    """Groups around their nodes, a "Model links" note with a link per file, green / red prompts,
    no saved view (so the frontend fits the graph to the window, note included)."""
    layout = _layout()
    wf = json.loads(path.read_text(encoding="utf-8"))
    assert "ds" not in wf["extra"], "a saved view opens part of the graph off-screen"
    titles = [g["title"] for g in wf["groups"]]
    assert titles[0] == "Step 1 - Load models" and any(t.startswith("Step 3 - Prompt") for t in titles), titles
    rects = layout.rectangles(wf["nodes"])
    boxes = {g["title"]: (g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
                          g["bounding"][1] + g["bounding"][3]) for g in wf["groups"]}
    assert layout.overlaps(boxes) == [], "groups overlap"
    inside = 0
    for r in rects.values():
        hits = [t for t, b in boxes.items() if b[0] < r[2] and r[0] < b[2] and b[1] < r[3] and r[1] < b[3]]
        assert len(hits) <= 1, f"a node straddles groups {hits}"
        if hits:
            b = boxes[hits[0]]
            assert b[0] <= r[0] and r[2] <= b[2] and b[1] + 30 <= r[1] and r[3] <= b[3], f"a node sticks out of {hits[0]}"
            inside += 1
    assert inside >= 4
    notes = {n.get("title"): n for n in wf["nodes"] if n["type"] == "MarkdownNote"}
    links = notes["Model links"]["widgets_values"][0]
    for n in wf["nodes"]:
        for m in n["properties"].get("models", []):
            assert f"[{m['name']}]({m['url']})" in links and f"📂 {m['directory']}/" in links, m["name"]
    prompts = {n.get("title"): n for n in wf["nodes"] if n["type"] in ("QwenImageTextEncode", "QwenImageEditEncode")}
    for title, node in prompts.items():
        assert node.get("bgcolor") == ("#533" if "Negative" in title else "#353"), title


def test_loader_widths_show_whole_labels():
    """The loaders' combo widgets show label and file name side by side: the node is wide enough
    for both (a 320 px loader cut "model_name" to "mo...")."""
    layout = _layout()
    for path in WORKFLOWS:
        wf = json.loads(path.read_text(encoding="utf-8"))
        for n in wf["nodes"]:
            if n["type"].endswith("Loader"):
                inputs = {"QwenImageDiTLoader": ["model_name"], "QwenImageTextEncoderLoader": ["text_encoder_name"],
                          "QwenImageVAELoader": ["vae_name"], "QwenImageLoraLoader": ["lora_name"],
                          "QwenImageControlNetLoader": ["controlnet_name"]}[n["type"]]
                need = layout.widget_width(inputs[0], n["widgets_values"][0])
                assert n["size"][0] >= need, (path.name, n["type"], n["size"][0], need)


def test_template_browser_entries():
    """Every UI workflow has a thumbnail (<name>.jpg, what the frontend requests for a custom-node
    template), small enough to commit, and a title / description in workflows/templates.py."""
    sys.path.insert(0, str(ROOT / "workflows"))
    try:
        from templates import TEMPLATES
    finally:
        sys.path.remove(str(ROOT / "workflows"))
    assert sorted(n for n, _t, _d in TEMPLATES) == sorted(p.stem for p in WORKFLOWS)
    assert TEMPLATES[0][0] == "qwen_image_t2i"
    for path in WORKFLOWS:
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file() and thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"no JPEG thumbnail {thumb.name}"
        assert thumb.stat().st_size < 50_000, thumb.name
