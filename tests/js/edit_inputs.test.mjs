import assert from "node:assert/strict";
import test from "node:test";

import { editImageLabel } from "../../js/lib/edit_inputs.js";

test("image sockets become Picture N", () => {
  assert.equal(editImageLabel("image1"), "Picture 1");
  assert.equal(editImageLabel("image3"), "Picture 3");
});

test("other inputs keep their names", () => {
  for (const name of ["vae", "text_encoder", "images", "image", "image1x", "", undefined]) {
    assert.equal(editImageLabel(name), null, String(name));
  }
});
