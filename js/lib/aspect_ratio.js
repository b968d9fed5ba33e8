// Aspect-ratio presets of QwenImageEmptyLatent. Pure logic (no DOM, no ComfyUI), unit-tested
// with `node --test tests/js`. The preset labels come from the backend's combo options
// ("16:9 (1664x928)"), so the sizes live in one place: nodes/latents.py.

export const CUSTOM = "custom";

const SIZE_IN_LABEL = /\((\d+)\s*[x×]\s*(\d+)\)\s*$/;

/** {width, height} of a preset label, or null for "custom" and anything unparseable. */
export function parsePreset(label) {
  if (typeof label !== "string" || label === CUSTOM) return null;
  const m = SIZE_IN_LABEL.exec(label);
  if (!m) return null;
  const width = Number(m[1]);
  const height = Number(m[2]);
  return width > 0 && height > 0 ? { width, height } : null;
}

/** The preset label among `labels` with exactly this size, else "custom". */
export function presetFor(labels, width, height) {
  for (const label of labels ?? []) {
    const size = parsePreset(label);
    if (size && size.width === width && size.height === height) return label;
  }
  return CUSTOM;
}

/**
 * What the width / height widgets should show for a preset choice: a preset fixes both and locks
 * them (the backend would ignore other values); "custom" unlocks them and keeps the user's numbers.
 */
export function widgetState(label, width, height) {
  const size = parsePreset(label);
  if (!size) return { locked: false, width, height };
  return { locked: true, width: size.width, height: size.height };
}
