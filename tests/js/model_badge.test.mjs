import assert from "node:assert/strict";
import test from "node:test";

import { LOADER_TYPES, badgeText, fitText, formatName, nodeIdPath } from "../../js/lib/model_badge.js";

test("torch dtype names read as users know them", () => {
  assert.equal(formatName("bfloat16"), "bf16");
  assert.equal(formatName("float8_e4m3fn"), "fp8 e4m3fn");
  assert.equal(formatName("gguf"), "GGUF");
  assert.equal(formatName("int4"), "int4");
  assert.equal(formatName(undefined), "");
});

test("diffusion model badge: variant and format", () => {
  assert.equal(badgeText({ node: "1", kind: "diffusion_model", name: "q.gguf", variant: "edit-2509", format: "gguf" }), "edit-2509 · GGUF");
});

test("text encoder badge says whether the vision tower is there", () => {
  assert.equal(badgeText({ kind: "text_encoder", format: "float8_e4m3fn", vision: true }), "fp8 e4m3fn · vision");
  assert.equal(badgeText({ kind: "text_encoder", format: "gguf", vision: false }), "GGUF · no vision");
});

test("vae badge and empty messages", () => {
  assert.equal(badgeText({ kind: "vae", format: "float32" }), "fp32");
  assert.equal(badgeText({ kind: "vae" }), "");
  assert.equal(badgeText(null), "");
  assert.equal(badgeText("text"), "");
});

test("node ids: top level and inside subgraphs", () => {
  assert.deepEqual(nodeIdPath("12"), [12]);
  assert.deepEqual(nodeIdPath(12), [12]);
  assert.deepEqual(nodeIdPath("7:12"), [7, 12]);
  for (const bad of ["", "a", "1:", ":1", "1.5", null, undefined]) assert.equal(nodeIdPath(bad), null, String(bad));
});

test("long badges are shortened with an ellipsis", () => {
  assert.equal(fitText("abcdef", 10), "abcdef");
  assert.equal(fitText("abcdef", 4), "abc…");
  assert.equal(fitText("abcdef", 1), "a");
  assert.equal(fitText(undefined, 4), "");
});

test("the loaders named are the pack's loader classes", () => {
  assert.deepEqual([...LOADER_TYPES].sort(), ["QwenImageDiTLoader", "QwenImageTextEncoderLoader", "QwenImageVAELoader"]);
});
