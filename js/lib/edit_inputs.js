// QwenImageEditEncode's image sockets, named the way Edit-2509 / 2511 prompts refer to them
// ("Picture 1: <image> Picture 2: <image> ... put the hat from Picture 2 on the man in Picture 1").
// Pure logic, unit-tested with `node --test tests/js`.

export const EDIT_NODE = "QwenImageEditEncode";

const IMAGE_INPUT = /^image(\d+)$/;

/** The socket label for an edit node input name, or null to leave it alone. */
export function editImageLabel(name) {
  const m = IMAGE_INPUT.exec(name ?? "");
  return m ? `Picture ${Number(m[1])}` : null;
}
