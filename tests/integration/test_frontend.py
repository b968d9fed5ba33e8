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
# Screenshots of every workflow as it opens (fitted to the window) land here, or in pytest's tmp dir.
SCREENSHOTS = os.environ.get("QWENIMAGE_SCREENSHOTS")
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
            # The frontend restores or opens its first workflow asynchronously after start; a
            # workflow loaded before that is replaced, so let it settle first.
            pg.wait_for_timeout(4_000)
            pg.keyboard.press("Escape")  # 1.48 greets a first start with the template dialog
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
            const read = () => [w("width").value, w("height").value, w("width").label ?? null, !!w("width").disabled];
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
    # [width, height, label]: a preset's size stays drawn (a `disabled` widget is drawn without it).
    assert state["loaded"] == [1328, 1328, "width (preset)", False]
    assert state["preset"] == [1664, 928, "width (preset)", False]
    assert state["custom"] == [1664, 928, None, False]


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


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_opens_fitted_grouped_and_without_overlaps(ui, shots, path):
    """As the frontend draws it: no node covers another (title bars included, sizes after the
    frontend grew any node to its widgets), groups present, the Model links note on screen, and
    the loader badges inside their node, clear of the title bar with the node-source badge."""
    wf = json.loads(path.read_text(encoding="utf-8"))
    ui.evaluate(
        """async ([wf, name]) => {
            const app = window.comfyAPI.app.app;
            await app.loadGraphData(wf, true, true, name, { showMissingModelsDialog: false, showMissingNodesDialog: false });
            for (const n of app.graph._nodes) if (n.type.endsWith("Loader") && n.type.startsWith("QwenImage"))
                n.properties.qwenimage_loaded = "qwen-image · fp8 e4m3fn · vision";
            await new Promise((r) => setTimeout(r, 600));  // 1.27 fits the view on the next frame
            app.canvas.setDirty(true, true);
            app.canvas.draw(true, true);
        }""",
        [wf, path.stem],
    )
    ui.page.wait_for_timeout(300)
    ui.page.screenshot(path=str(shots / f"{path.stem}.png"))
    state = ui.evaluate(
        """() => {
            const app = window.comfyAPI.app.app;
            const c = app.canvas, ds = c.ds, el = c.canvas;
            const title = window.LiteGraph.NODE_TITLE_HEIGHT;
            const screen = ([x, y]) => [(x + ds.offset[0]) * ds.scale, (y + ds.offset[1]) * ds.scale];
            return {
                view: [el.clientWidth, el.clientHeight],
                groups: (app.graph.groups ?? app.graph._groups).map((g) => g.title),
                nodes: app.graph._nodes.map((n) => ({
                    id: n.id, type: n.type, title: n.title,
                    rect: [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]],
                    min: [...n.computeSize()], size: [...n.size],
                    screen: [...screen([n.pos[0], n.pos[1] - title]), ...screen([n.pos[0] + n.size[0], n.pos[1] + n.size[1]])],
                    badge: n.qwenimageBadgeBox ?? null,
                    widgetsEnd: Math.max(0, ...(n.widgets ?? []).map((w) => (w.last_y ?? w.y ?? 0) + (w.computedHeight ?? 20))),
                })),
            };
        }"""
    )
    nodes = {n["id"]: n for n in state["nodes"]}
    for n in nodes.values():
        assert n["min"][1] <= n["size"][1] + 0.5, f"{path.name}: node {n['id']} ({n['type']}) drawn taller than saved: {n}"
    pairs = []
    ids = sorted(nodes)
    for k, a in enumerate(ids):
        for b in ids[k + 1:]:
            ra, rb = nodes[a]["rect"], nodes[b]["rect"]
            if ra[0] < rb[2] and rb[0] < ra[2] and ra[1] < rb[3] and rb[1] < ra[3]:
                pairs.append((nodes[a]["title"] or nodes[a]["type"], nodes[b]["title"] or nodes[b]["type"]))
    assert pairs == [], f"{path.name}: overlapping nodes {pairs}"
    assert "Step 1 - Load models" in state["groups"] and len(state["groups"]) >= 3, state["groups"]
    w, h = state["view"]
    for n in nodes.values():
        x0, y0, x1, y1 = n["screen"]
        assert -2 <= x0 and x1 <= w + 2 and -2 <= y0 and y1 <= h + 2, f"{path.name}: {n['title'] or n['type']} is off screen: {n['screen']} in {w}x{h}"
    loaders = [n for n in nodes.values() if n["badge"]]
    assert loaders, "no loader badge was drawn"
    for n in loaders:
        x, y, bw, bh = n["badge"]
        assert 0 <= x and x + bw <= n["size"][0] and y >= n["widgetsEnd"] - 1 and y + bh <= n["size"][1], (path.name, n)


def test_template_browser_gets_thumbnails_titles_and_order(ui, shots):
    """What the template browser asks for: our list (text to image first, through the extension's
    wrapper of api.getWorkflowTemplates) and <name>.jpg next to each workflow; the open dialog
    shows our titles instead of file names."""
    listed = ui.evaluate("() => window.comfyAPI.api.api.getWorkflowTemplates()")
    module, names = next((m, n) for m, n in listed.items() if "qwen_image_t2i" in n)
    assert names[0] == "qwen_image_t2i" and sorted(names) == sorted(p.stem for p in UI_WORKFLOWS), names
    for name in names:
        status = ui.evaluate(
            "async (url) => { const r = await fetch(url); return [r.status, r.headers.get('content-type')]; }",
            f"/api/workflow_templates/{module}/{name}.jpg",
        )
        assert status[0] == 200 and "image/jpeg" in status[1], (name, status)
    ui.evaluate("() => window.comfyAPI.app.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    ui.page.wait_for_timeout(2000)
    # The dialog opens on the core templates: choose our pack in its navigation (1.48: under
    # Extensions; 1.27: under Custom Nodes), both labelled with the pack's folder name.
    entry = ui.page.get_by_text(module, exact=True)
    if entry.count():
        entry.first.click()
        ui.page.wait_for_timeout(1500)
    ui.page.screenshot(path=str(shots / "template_browser.png"))
    # The dialog only: the workflow tabs above it carry the names of workflows opened by name.
    text = ui.evaluate("""() => [...document.querySelectorAll('[role="dialog"], .p-dialog')]
        .map((d) => d.innerText).join("\\n")""")
    ui.page.keyboard.press("Escape")
    assert "Qwen-Image: text to image" in text, text[-3000:]
    assert "qwen_image_t2i" not in text and "qwen image t2i" not in text, "a raw file name is shown"
