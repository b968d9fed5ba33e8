// ComfyUI frontend extension for the Qwen-Image nodes:
// - QwenImageEmptyLatent: choosing an aspect-ratio preset writes the official size into width /
//   height and locks them (labelled "(preset)", an edit snaps back); "custom" unlocks them. They are
//   not `disabled`: the frontend draws a disabled widget without its value, and the size in use
//   must stay readable.
// - QwenImageEditEncode: the image sockets read "Picture 1..3", the names prompts use for them.
// - Loader nodes: a badge above the title shows what was loaded (variant, weight format), as
//   reported by the backend (nodes/loaders.py -> runtime.notify_ui). It is kept in the node's
//   properties, so it survives a reload of the page and is saved with the workflow. It is drawn in
//   a row of its own under the widgets (computeSize adds the row), not over the title bar, where
//   the frontend draws its node-source badge and where it read as the badge of the node above.
// - The template browser: our workflows in a sensible order with real titles and descriptions
//   (the frontend itself reads only file names for custom-node templates; see lib/templates.js).
// The logic lives in ./lib (plain ES modules, unit-tested with `node --test tests/js`).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { widgetState } from "./lib/aspect_ratio.js";
import { EDIT_NODE, editImageLabel } from "./lib/edit_inputs.js";
import { BADGE_PROPERTY, BADGE_ROW, LOADER_TYPES, MODEL_INFO_EVENT, badgeText, fitText, nodeIdPath } from "./lib/model_badge.js";
import { installTemplateInfo } from "./lib/templates.js";

const EXTENSION_NAME = "qwenimage.ui";
const BADGE_MAX_CHARS = 40;

function chain(object, method, after) {
  const original = object[method];
  object[method] = function (...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function syncAspectRatio(node) {
  const ratio = widget(node, "aspect_ratio");
  const width = widget(node, "width");
  const height = widget(node, "height");
  if (!ratio || !width || !height) return;
  const state = widgetState(ratio.value, width.value, height.value);
  for (const [w, value] of [[width, state.width], [height, state.height]]) {
    w.value = value;
    w.qwenimageLocked = state.locked;
    w.label = state.locked ? `${w.name} (preset)` : undefined;
  }
  node.setDirtyCanvas?.(true, true);
}

function setupEmptyLatent(node) {
  const ratio = widget(node, "aspect_ratio");
  if (!ratio) return;
  chain(ratio, "callback", () => syncAspectRatio(node));
  for (const name of ["width", "height"]) {
    const w = widget(node, name);
    // A locked size snaps back to the preset: the backend would use the preset's size anyway.
    if (w) chain(w, "callback", () => w.qwenimageLocked && syncAspectRatio(node));
  }
  syncAspectRatio(node);
}

function labelEditInputs(node) {
  for (const input of node.inputs ?? []) {
    const label = editImageLabel(input.name);
    if (label) input.label = label;
  }
}

function drawBadge(node, ctx) {
  const text = fitText(node.properties?.[BADGE_PROPERTY] ?? "", BADGE_MAX_CHARS);
  if (!text || node.flags?.collapsed) return;
  ctx.save();
  ctx.font = "11px sans-serif";
  const h = 16;
  const w = Math.min(ctx.measureText(text).width + 12, node.size[0] - 12);
  const x = Math.max(6, node.size[0] - w - 6);
  const y = node.size[1] - h - (BADGE_ROW - h) / 2;
  node.qwenimageBadgeBox = [x, y, w, h]; // where it went, for the browser tests
  ctx.fillStyle = "#24573f";
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x, y, w, h, 4);
  else ctx.rect(x, y, w, h);
  ctx.fill();
  ctx.fillStyle = "#e2f7ec";
  ctx.textBaseline = "middle";
  ctx.fillText(text, x + 6, y + h / 2 + 1);
  ctx.restore();
}

function findNode(path) {
  let graph = app.graph;
  let node = null;
  for (const id of path ?? []) {
    node = graph?.getNodeById?.(id);
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

function showModelInfo({ detail }) {
  const node = findNode(nodeIdPath(detail?.node));
  if (!node || !LOADER_TYPES.includes(node.type ?? node.comfyClass)) return;
  const text = badgeText(detail);
  if (!text) return;
  node.properties ??= {};
  node.properties[BADGE_PROPERTY] = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: EXTENSION_NAME,
  setup() {
    api.addEventListener(MODEL_INFO_EVENT, showModelInfo);
  },
  init() {
    installTemplateInfo(api, globalThis.document);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "QwenImageEmptyLatent") {
      chain(nodeType.prototype, "onNodeCreated", function () {
        setupEmptyLatent(this);
      });
      // A saved workflow's values arrive after creation.
      chain(nodeType.prototype, "onConfigure", function () {
        syncAspectRatio(this);
      });
    }
    if (nodeData.name === EDIT_NODE) {
      chain(nodeType.prototype, "onNodeCreated", function () {
        labelEditInputs(this);
      });
      chain(nodeType.prototype, "onConfigure", function () {
        labelEditInputs(this);
      });
    }
    if (LOADER_TYPES.includes(nodeData.name)) {
      chain(nodeType.prototype, "onDrawForeground", function (ctx) {
        drawBadge(this, ctx);
      });
      const computeSize = nodeType.prototype.computeSize;
      nodeType.prototype.computeSize = function (...args) {
        // The frontend may pass the array to fill (`out`): grow the result in place.
        const size = computeSize ? computeSize.apply(this, args) : [...(this.size ?? [0, 0])];
        size[1] += BADGE_ROW;
        return size;
      };
    }
  },
});
