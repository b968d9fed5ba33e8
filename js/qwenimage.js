// ComfyUI frontend extension for the Qwen-Image nodes:
// - QwenImageEmptyLatent: choosing an aspect-ratio preset writes the official size into width /
//   height and locks them; "custom" unlocks them.
// - QwenImageEditEncode: the image sockets read "Picture 1..3", the names prompts use for them.
// - Loader nodes: a badge above the title shows what was loaded (variant, weight format), as
//   reported by the backend (nodes/loaders.py -> runtime.notify_ui). It is kept in the node's
//   properties, so it survives a reload of the page and is saved with the workflow.
// The logic lives in ./lib (plain ES modules, unit-tested with `node --test tests/js`).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { widgetState } from "./lib/aspect_ratio.js";
import { EDIT_NODE, editImageLabel } from "./lib/edit_inputs.js";
import { BADGE_PROPERTY, LOADER_TYPES, MODEL_INFO_EVENT, badgeText, fitText, nodeIdPath } from "./lib/model_badge.js";

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
  width.value = state.width;
  height.value = state.height;
  width.disabled = state.locked;
  height.disabled = state.locked;
  node.setDirtyCanvas?.(true, true);
}

function setupEmptyLatent(node) {
  const ratio = widget(node, "aspect_ratio");
  if (!ratio) return;
  chain(ratio, "callback", () => syncAspectRatio(node));
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
  const titleHeight = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  ctx.save();
  ctx.font = "11px sans-serif";
  const w = ctx.measureText(text).width + 12;
  const h = 16;
  const x = Math.max(0, node.size[0] - w);
  const y = -titleHeight - h - 3;
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
    }
  },
});
