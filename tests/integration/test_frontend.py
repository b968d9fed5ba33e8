"""Every bundled UI workflow in ComfyUI's real frontend, in headless Chromium driven by Playwright.

Runs when $COMFYUI_DIR is set (see comfyui_harness.py) and Playwright's Python package and a
Chromium binary ($CHROMIUM, default /usr/bin/chromium from Debian's `chromium` package) exist.
Playwright's own browser download is not needed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from comfyui_harness import shared_server
from conftest import ROOT

UI_WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
EXTENSION_NAME = "qwenimage.ui"
APP = "window.comfyAPI.app.app"


@dataclass
class Frontend:
    page: object  # playwright.sync_api.Page
    server: object  # comfyui_harness.ComfyUIServer
    errors: list  # uncaught page errors

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)


@pytest.fixture(scope="module")
def ui():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set $CHROMIUM)")
    server = shared_server()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-extensions"],
        )
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            pg.on("pageerror", lambda err: errors.append(str(err)))
            pg.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
            pg.wait_for_function(f"() => window.comfyAPI?.app?.app?.graph && {APP}.extensions?.length > 0", timeout=120_000)
            # The pack's extension is imported with the others; wait until it has registered.
            pg.wait_for_function(f"() => {APP}.extensions.some((e) => e.name === {json.dumps(EXTENSION_NAME)})", timeout=60_000)
            # Frontend 1.48 registers the node types after the extensions: wait for a core one and ours.
            pg.wait_for_function("""() => ["SaveImage", "QwenImageSampler"].every(
                (t) => window.LiteGraph?.registered_node_types?.[t])""", timeout=120_000)
            pg.evaluate("""() => {
                window.__qwenMissing = null;
                window.comfyAPI.app.app.registerExtension({
                    name: "qwenimage.test.probe",
                    afterConfigureGraph(missing) { window.__qwenMissing = (missing || []).map((m) => m?.type ?? m); },
                });
            }""")
            yield Frontend(pg, server, errors)
        finally:
            browser.close()


def test_extension_is_served_and_registered(ui):
    files = ui.server.get_json("/extensions")
    assert any(f.endswith("/qwenimage.js") for f in files), files
    names = ui.evaluate(f"() => {APP}.extensions.map((e) => e.name)")
    assert EXTENSION_NAME in names
    ours = [e for e in ui.errors if "qwenimage" in e.lower()]
    assert not ours, ours


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_without_missing_nodes(ui, path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    result = ui.evaluate(
        """async ([wf, name]) => {
            const app = window.comfyAPI.app.app;
            window.__qwenMissing = null;
            await app.loadGraphData(wf, true, true, name, { showMissingModelsDialog: false });
            const registered = window.LiteGraph.registered_node_types;
            return {
                missing: window.__qwenMissing,
                unregistered: wf.nodes.map((n) => n.type).filter((t) => !registered[t]),
                loaded: app.graph._nodes.length,
            };
        }""",
        [wf, path.name],
    )
    # Unknown node types only: current frontends (1.48) also mark loaders whose model file and
    # LoadImage nodes whose picture is absent here (``has_errors``), as they do for any user who
    # opens a workflow before downloading its files. That is ComfyUI's normal behaviour.
    assert result["missing"] == [], f"{path.name}: the frontend reports missing nodes {result['missing']}"
    assert result["unregistered"] == [], result
    assert result["loaded"] == len(wf["nodes"])


def test_the_missing_node_probe_sees_a_missing_node(ui):
    """Control for the test above: an unknown node type is reported."""
    wf = json.loads((ROOT / "workflows" / "qwen_image_t2i.json").read_text(encoding="utf-8"))
    wf["nodes"][0]["type"] = "QwenImageNoSuchNode"
    missing = ui.evaluate(
        """async (wf) => {
            await window.comfyAPI.app.app.loadGraphData(wf, true, true, "control",
                { showMissingModelsDialog: false, showMissingNodesDialog: false });
            return window.__qwenMissing;
        }""",
        wf,
    )
    assert missing == ["QwenImageNoSuchNode"]


def test_aspect_ratio_preset_locks_the_size_in_the_real_frontend(ui):
    wf = json.loads((ROOT / "workflows" / "qwen_image_t2i.json").read_text(encoding="utf-8"))
    state = ui.evaluate(
        """async (wf) => {
            const app = window.comfyAPI.app.app;
            await app.loadGraphData(wf, true, true, "aspect", { showMissingModelsDialog: false });
            const node = app.graph._nodes.find((n) => n.type === "QwenImageEmptyLatent");
            const w = (name) => node.widgets.find((x) => x.name === name);
            const read = () => [w("width").value, w("height").value, !!w("width").disabled];
            const loaded = read();
            w("aspect_ratio").value = "16:9 (1664x928)";
            w("aspect_ratio").callback(w("aspect_ratio").value);
            const preset = read();
            w("aspect_ratio").value = "custom";
            w("aspect_ratio").callback("custom");
            return { loaded, preset, custom: read() };
        }""",
        wf,
    )
    assert state["loaded"] == [1328, 1328, True]
    assert state["preset"] == [1664, 928, True]
    assert state["custom"] == [1664, 928, False]


def test_edit_image_inputs_are_labelled(ui):
    path = ROOT / "workflows" / "qwen_image_edit_2509.json"
    if not path.is_file():
        pytest.skip("no edit-2509 workflow")
    labels = ui.evaluate(
        """async (wf) => {
            const app = window.comfyAPI.app.app;
            await app.loadGraphData(wf, true, true, "edit", { showMissingModelsDialog: false });
            return app.graph._nodes.filter((n) => n.type === "QwenImageEditEncode")
                .map((n) => n.inputs.filter((i) => i.name.startsWith("image")).map((i) => i.label ?? i.name));
        }""",
        json.loads(path.read_text(encoding="utf-8")),
    )
    assert labels and all(node == ["Picture 1", "Picture 2", "Picture 3"] for node in labels), labels


def test_loader_badge_shows_what_the_backend_loaded(ui):
    """Queue t2i from the page on the tiny files; the backend's qwenimage.model_info message
    must land on the loader nodes (ComfyUI's cache is emptied first so the loaders run)."""
    files = ui.server.files
    ui.server.post_json("/free", {"unload_models": True, "free_memory": True})
    wf = json.loads((ROOT / "workflows" / "qwen_image_t2i.json").read_text(encoding="utf-8"))
    ui.evaluate(
        """async ([wf, files]) => {
            const app = window.comfyAPI.app.app;
            await app.loadGraphData(wf, true, true, "badge", { showMissingModelsDialog: false });
            const set = (type, name, value) => {
                const node = app.graph._nodes.find((n) => n.type === type);
                node.widgets.find((w) => w.name === name).value = value;
            };
            set("QwenImageDiTLoader", "model_name", files.model);
            set("QwenImageTextEncoderLoader", "text_encoder_name", files.text_encoder);
            set("QwenImageVAELoader", "vae_name", files.vae);
            set("QwenImageEmptyLatent", "aspect_ratio", "custom");
            set("QwenImageEmptyLatent", "width", 64);
            set("QwenImageEmptyLatent", "height", 48);
            set("QwenImageSampler", "steps", 2);
            await app.queuePrompt(0, 1);
        }""",
        [wf, files],
    )
    ui.page.wait_for_function(
        """() => ["QwenImageDiTLoader", "QwenImageTextEncoderLoader", "QwenImageVAELoader"].every((t) =>
            window.comfyAPI.app.app.graph._nodes.find((n) => n.type === t)?.properties?.qwenimage_loaded)""",
        timeout=180_000,
    )
    badges = ui.evaluate(
        """() => Object.fromEntries(window.comfyAPI.app.app.graph._nodes
            .filter((n) => n.properties?.qwenimage_loaded).map((n) => [n.type, n.properties.qwenimage_loaded]))"""
    )
    assert badges["QwenImageDiTLoader"] == "qwen-image · fp32"
    assert badges["QwenImageTextEncoderLoader"] == "fp32 · vision"
    assert badges["QwenImageVAELoader"] == "fp32"
