// The badge on our loader nodes: what the backend loaded (variant, weight format), sent by
// nodes/loaders.py through runtime.notify_ui. Pure logic, unit-tested with `node --test`.

export const MODEL_INFO_EVENT = "qwenimage.model_info";
export const BADGE_PROPERTY = "qwenimage_loaded";
// Height of the row under a loader's widgets that holds the badge (workflows/layout.py uses the same).
export const BADGE_ROW = 22;
export const LOADER_TYPES = Object.freeze(["QwenImageDiTLoader", "QwenImageTextEncoderLoader", "QwenImageVAELoader"]);

const FORMAT_NAMES = {
  bfloat16: "bf16",
  float16: "fp16",
  float32: "fp32",
  float8_e4m3fn: "fp8 e4m3fn",
  float8_e5m2: "fp8 e5m2",
  gguf: "GGUF",
};

/** torch dtype names as users know them ("bfloat16" -> "bf16"). */
export function formatName(format) {
  if (typeof format !== "string" || !format) return "";
  return FORMAT_NAMES[format] ?? format;
}

/** The badge text for a qwenimage.model_info message, or "" when it carries nothing to show. */
export function badgeText(info) {
  if (!info || typeof info !== "object") return "";
  const parts = [];
  if (info.kind === "diffusion_model" && info.variant) parts.push(info.variant);
  const fmt = formatName(info.format);
  if (fmt) parts.push(fmt);
  if (info.kind === "text_encoder" && typeof info.vision === "boolean") parts.push(info.vision ? "vision" : "no vision");
  return parts.join(" · ");
}

/**
 * The graph path of a backend node id: "12" -> [12]; "7:12" (a node inside subgraph node 7)
 * -> [7, 12]; null for anything else.
 */
export function nodeIdPath(id) {
  const text = String(id ?? "");
  if (!/^\d+(:\d+)*$/.test(text)) return null;
  return text.split(":").map(Number);
}

/** Shorten to `max` characters with an ellipsis (the badge must fit over a node's title). */
export function fitText(text, max) {
  if (typeof text !== "string") return "";
  if (text.length <= max) return text;
  if (max < 2) return text.slice(0, Math.max(0, max));
  return text.slice(0, max - 1) + "…";
}
