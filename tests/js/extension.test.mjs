// js/qwenimage.js itself, with ComfyUI's app / api replaced by small fakes: the extension is copied
// into a temporary tree shaped like ComfyUI's web root (/scripts/*.js, /extensions/<pack>/).
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import test from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

const JS_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../js");

async function loadExtension() {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "qwenimage-js-"));
  fs.mkdirSync(path.join(root, "scripts"));
  fs.writeFileSync(path.join(root, "scripts", "app.js"), `
    export const registered = [];
    export const app = { graph: null, registerExtension(ext) { registered.push(ext); } };`);
  fs.writeFileSync(path.join(root, "scripts", "api.js"), `
    export const api = new EventTarget();`);
  fs.cpSync(JS_DIR, path.join(root, "extensions", "qwenimage"), { recursive: true });
  const appModule = await import(pathToFileURL(path.join(root, "scripts", "app.js")));
  const { api } = await import(pathToFileURL(path.join(root, "scripts", "api.js")));
  await import(pathToFileURL(path.join(root, "extensions", "qwenimage", "qwenimage.js")));
  fs.rmSync(root, { recursive: true, force: true });
  assert.equal(appModule.registered.length, 1);
  return { ext: appModule.registered[0], app: appModule.app, api };
}

const { ext, app, api } = await loadExtension();

function makeNodeType() {
  return class {
    constructor() {
      this.widgets = [];
      this.properties = {};
      this.size = [300, 100];
      this.flags = {};
      this.dirty = 0;
    }
    setDirtyCanvas() {
      this.dirty += 1;
    }
  };
}

test("the extension registers under its name", () => {
  assert.equal(ext.name, "qwenimage.ui");
});

test("aspect-ratio presets set and lock width and height, and keep showing them", async () => {
  const NodeType = makeNodeType();
  await ext.beforeRegisterNodeDef(NodeType, { name: "QwenImageEmptyLatent" });
  const node = new NodeType();
  node.widgets = [
    { name: "width", value: 512 },
    { name: "height", value: 768 },
    { name: "batch_size", value: 1 },
    { name: "aspect_ratio", value: "custom" },
  ];
  node.onNodeCreated();
  const [width, height, , ratio] = node.widgets;
  assert.equal(width.label, undefined);
  assert.equal(width.value, 512);

  ratio.value = "16:9 (1664x928)";
  ratio.callback(ratio.value);
  assert.deepEqual([width.value, height.value, width.label, height.label], [1664, 928, "width (preset)", "height (preset)"]);
  // Never `disabled`: the frontend draws a disabled widget without its number.
  assert.ok(!width.disabled && !height.disabled);
  width.value = 700; // an edit of a locked size snaps back
  width.callback(700);
  assert.equal(width.value, 1664);

  ratio.value = "custom";
  ratio.callback(ratio.value);
  assert.deepEqual([width.value, height.value, width.label], [1664, 928, undefined]);
  width.value = 700;
  width.callback(700);
  assert.equal(width.value, 700);

  // A saved workflow restores a preset after creation.
  ratio.value = "2:3 (1056x1584)";
  node.onConfigure({});
  assert.deepEqual([width.value, height.value, height.label], [1056, 1584, "height (preset)"]);
});

test("model info from the backend lands on the right loader node and is drawn", async () => {
  const NodeType = makeNodeType();
  await ext.beforeRegisterNodeDef(NodeType, { name: "QwenImageDiTLoader" });
  const loader = Object.assign(new NodeType(), { type: "QwenImageDiTLoader" });
  const other = Object.assign(new NodeType(), { type: "SaveImage" });
  const nodes = { 1: loader, 9: other };
  app.graph = { getNodeById: (id) => nodes[id] ?? null };
  ext.setup();

  const send = (detail) => api.dispatchEvent(Object.assign(new Event("qwenimage.model_info"), { detail }));
  send({ node: "1", kind: "diffusion_model", name: "x.gguf", variant: "qwen-image", format: "gguf" });
  send({ node: "9", kind: "diffusion_model", variant: "edit", format: "gguf" }); // not a loader: ignored
  send({ node: "404", kind: "vae", format: "float32" }); // no such node: ignored
  assert.equal(loader.properties.qwenimage_loaded, "qwen-image · GGUF");
  assert.equal(other.properties.qwenimage_loaded, undefined);

  const drawn = [];
  const boxes = [];
  const ctx = {
    save() {}, restore() {}, beginPath() {}, fill() {}, rect: (...b) => boxes.push(b), roundRect: (...b) => boxes.push(b),
    measureText: (t) => ({ width: t.length * 6 }),
    fillText: (t) => drawn.push(t),
  };
  loader.onDrawForeground(ctx);
  assert.deepEqual(drawn, ["qwen-image · GGUF"]);
  // Inside the node, in the row computeSize adds under the widgets: clear of the title bar
  // (the frontend's node-source badge) and of the node above.
  const [x, y, w, h] = boxes[0];
  assert.ok(x >= 0 && x + w <= loader.size[0] && y >= loader.size[1] - 22 && y + h <= loader.size[1], String(boxes[0]));
  assert.deepEqual(new NodeType().computeSize(), [300, 122]);
  loader.flags.collapsed = true;
  loader.onDrawForeground(ctx);
  assert.equal(drawn.length, 1);
});

test("edit image sockets are labelled as the prompts name them", async () => {
  const NodeType = makeNodeType();
  await ext.beforeRegisterNodeDef(NodeType, { name: "QwenImageEditEncode" });
  const node = new NodeType();
  node.inputs = [{ name: "text_encoder" }, { name: "vae" }, { name: "image1" }, { name: "image2" }, { name: "image3" }];
  node.onNodeCreated();
  assert.deepEqual(node.inputs.map((i) => i.label), [undefined, undefined, "Picture 1", "Picture 2", "Picture 3"]);
});
