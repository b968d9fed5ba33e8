import assert from "node:assert/strict";
import test from "node:test";

import { CUSTOM, parsePreset, presetFor, widgetState } from "../../js/lib/aspect_ratio.js";

const LABELS = [CUSTOM, "1:1 (1328x1328)", "16:9 (1664x928)", "9:16 (928x1664)"];

test("preset labels give their size", () => {
  assert.deepEqual(parsePreset("16:9 (1664x928)"), { width: 1664, height: 928 });
  assert.deepEqual(parsePreset("3:4 (1104 × 1472)"), { width: 1104, height: 1472 });
});

test("custom and malformed labels give null", () => {
  for (const label of [CUSTOM, "", "16:9", "(0x928)", "square (axb)", null, undefined, 42]) {
    assert.equal(parsePreset(label), null, String(label));
  }
});

test("a size finds its preset, anything else is custom", () => {
  assert.equal(presetFor(LABELS, 928, 1664), "9:16 (928x1664)");
  assert.equal(presetFor(LABELS, 1664, 1664), CUSTOM);
  assert.equal(presetFor(undefined, 1328, 1328), CUSTOM);
});

test("a preset locks width and height to its size", () => {
  assert.deepEqual(widgetState("1:1 (1328x1328)", 512, 768), { locked: true, width: 1328, height: 1328 });
});

test("custom unlocks and keeps the user's numbers", () => {
  assert.deepEqual(widgetState(CUSTOM, 512, 768), { locked: false, width: 512, height: 768 });
});
