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
