import assert from "node:assert/strict";
import test from "node:test";

import { TEMPLATE_INFO, TEMPLATE_ORDER, installTemplateInfo, orderTemplateLists, replacementFor, sortTemplates } from "../../js/lib/templates.js";

test("text to image comes first, every template has a title and a one-line description", () => {
  assert.equal(TEMPLATE_ORDER[0], "qwen_image_t2i");
  for (const t of TEMPLATE_INFO) {
    assert.ok(t.title && t.title !== t.name, t.name);
    assert.ok(t.description && !t.description.includes("\n") && t.description.length < 90, t.name);
  }
});

test("our list is ordered, other packs' lists are left alone", () => {
  const ours = ["qwen_image_inpaint", "qwen_image_t2i", "qwen_image_edit", "something_new"];
  assert.deepEqual(sortTemplates(ours), ["qwen_image_t2i", "qwen_image_edit", "qwen_image_inpaint", "something_new"]);
  assert.deepEqual(sortTemplates(["b", "a"]), ["b", "a"]);
  assert.deepEqual(orderTemplateLists({ other: ["z", "y"], mine: ours }).mine[0], "qwen_image_t2i");
});

test("the names the frontend shows map to titles and descriptions", () => {
  assert.equal(replacementFor("qwen_image_t2i"), "Qwen-Image: text to image");
  assert.equal(replacementFor(" qwen image t2i "), TEMPLATE_INFO[0].description);
  assert.equal(replacementFor("qwen_image"), null);
  assert.equal(replacementFor(undefined), null);
});

test("the api wrapper orders what the server listed", async () => {
  const api = { getWorkflowTemplates: async () => ({ "ComfyUI-QwenImage": ["qwen_image_inpaint", "qwen_image_t2i"] }) };
  installTemplateInfo(api, undefined);
  installTemplateInfo(api, undefined); // installing twice wraps once
  assert.deepEqual(await api.getWorkflowTemplates(), { "ComfyUI-QwenImage": ["qwen_image_t2i", "qwen_image_inpaint"] });
});
