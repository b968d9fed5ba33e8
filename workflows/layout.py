"""Where every node of a bundled workflow goes, in the shape of ComfyUI's official Qwen templates.

Columns, left to right: the "Model links" note; "Step 1 - Load models" over "Step 2 - ..."; the
prompts (under a LoRA group where there is one) and the optional groups; the sampler with the
"Read me" note; decode and Save Image. Positions are computed, never typed in by hand, so no two
nodes can overlap and every workflow has the same shape. The workflows carry no saved view
(extra.ds), so both frontends (1.27 and 1.48) fit the whole graph to the window on open.
"""
from __future__ import annotations

import re

# LiteGraph draws a node's title bar above its pos: the rectangle a node covers starts TITLE higher.
TITLE = 30
# Smallest body heights the frontends draw (node.computeSize(), the larger of frontend 1.27 and
# 1.48, measured in headless Chromium). A node saved smaller is grown on load, which is how the
# Edit-2509 positive prompt came to cover the negative one. tests/integration/test_frontend.py
# checks these against the live frontend.
MIN_HEIGHT = {
    "Canny": 82, "ImageScaleToMaxDimension": 82, "KSampler": 262, "LoadImage": 326, "MarkdownNote": 88, "ModelSamplingAuraFlow": 58,
    "PreviewImage": 26, "QwenImageAsComfyModel": 26, "QwenImageControlNetApply": 206,
    "QwenImageControlNetLoader": 82, "QwenImageControlReference": 90, "QwenImageDiTLoader": 106, "QwenImageEditEncode": 236,
    "QwenImageEmptyLatent": 130, "QwenImageEmptyLayeredLatent": 154, "QwenImageDecodeLayers": 126, "QwenImageInpaintMask": 46, "QwenImageLoraLoader": 82, "QwenImageMatchSize": 46,
    "QwenImageSampler": 286, "QwenImageSpeedOptions": 106, "QwenImageTextEncode": 88,
    "QwenImageTextEncoderLoader": 106, "QwenImageTorchCompile": 82, "QwenImageVAEDecode": 78,
    "QwenImageVAEEncode": 78, "QwenImageVAELoader": 58, "ReferenceLatent": 46, "SaveImage": 58,
}
# Loaders get a row under their widgets for the badge that says what was loaded (js/qwenimage.js
# adds the same BADGE_ROW to computeSize, so a loader placed by hand gets it too).
BADGE_ROW = 22
LOADERS = {"QwenImageDiTLoader", "QwenImageTextEncoderLoader", "QwenImageVAELoader"}
# Extra room a prompt box gets above its minimum, so it shows several lines, not two.
PROMPT_ROOM = {"Positive prompt": 120, "Prompt": 120, "Negative prompt": 40}
CHAR_W = 7.2  # px per character of the frontend's 12 px widget font (measured: upper bound)
WIDGET_CHROME = 90  # arrows, padding and the gap between a widget's label and its value
GAP = 40  # between nodes in a column
COLUMN_GAP = 60
GROUP_PAD = 15
GROUP_HEADER = 45  # the group title (font 24) above the first node's title bar
GROUP_GAP = 40
GROUP_COLOR = "#3f789e"
# The official templates' colours: green positive, red negative prompt, brown notes.
COLORS = {
    "positive": {"color": "#232", "bgcolor": "#353"},
    "negative": {"color": "#322", "bgcolor": "#533"},
    "note": {"color": "#432", "bgcolor": "#653"},
}
NOTE_LINE = 19  # px per rendered markdown line at the note's width
NOTE_WIDTH = 520


def widget_width(label: str, value) -> int:
    """Width at which a combo / number widget shows its whole label next to its value."""
    text = len(label) + len(str(value))
    return int(round((text * CHAR_W + WIDGET_CHROME) / 10.0) * 10)


def note_height(text: str, width: int = NOTE_WIDTH) -> int:
    """Height that shows a markdown note without a scroll bar (lines wrapped at the note's width)."""
    per_line = max(20, int((width - 30) / 7.0))
    lines = 0
    for line in text.splitlines():
        plain = re.sub(r"\]\([^)]*\)", "]", line)  # a link shows only its text
        lines += max(1, -(-len(plain) // per_line))
        if line.startswith("#"):
            lines += 1  # headings are taller
    return max(MIN_HEIGHT["MarkdownNote"], lines * NOTE_LINE + 40)


def body_height(node) -> int:
    """The body height a node is saved with: at least what the frontend draws, plus room we want."""
    h = max(MIN_HEIGHT.get(node.type, 58), node.size[1] if node.size_given else 0)
    if node.type in LOADERS:
        h = max(h, MIN_HEIGHT[node.type] + BADGE_ROW)
    if node.title in PROMPT_ROOM:
        h = max(h, MIN_HEIGHT[node.type] + PROMPT_ROOM[node.title])
    if node.type == "MarkdownNote":
        h = max(h, note_height(node.widgets["text"], node.size[0]))
    return h


def body_width(node) -> int:
    w = node.size[0] if node.size_given else 320
    for name, value in node.widgets.items():
        if not name.startswith("$") and not (name == "prompt" or name == "text"):
            w = max(w, widget_width(name, value))
    return w


def place(columns: list, by_id: dict) -> list[dict]:
    """Set pos / size of every node listed in ``columns`` and return the groups.

    columns: one list per column of (group title or None, [node ids]); the nodes of one entry are
    stacked in that order, one entry under the other. Every node of a column gets the column's width.
    """
    groups, x = [], 0
    for column in columns:
        width = max(body_width(by_id[i]) for _title, ids in column for i in ids)
        y = 0
        for title, ids in column:
            top = y
            if title:
                y += GROUP_HEADER
            for i in ids:
                n = by_id[i]
                y += TITLE
                h = body_height(n)
                n.pos, n.size = (x, y), (width, h)
                y += h + GAP
            if title:
                bottom = y - GAP + GROUP_PAD
                groups.append({"title": title, "bounding": [x - GROUP_PAD, top, width + 2 * GROUP_PAD, bottom - top]})
                y = bottom + GROUP_GAP
        x += width + COLUMN_GAP + 2 * GROUP_PAD
    return [
        {"id": k + 1, "title": g["title"], "bounding": g["bounding"], "color": GROUP_COLOR, "font_size": 24, "flags": {}}
        for k, g in enumerate(groups)
    ]


def rectangles(nodes: list[dict]) -> dict:
    """What each node of a UI workflow covers on the canvas, title bar included: id -> (x0, y0, x1, y1)."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - TITLE, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in nodes}


def overlaps(rects: dict, margin: float = 0) -> list[tuple]:
    """Pairs of ids whose rectangles (grown by ``margin``) intersect."""
    items = sorted(rects.items())
    found = []
    for k, (a, ra) in enumerate(items):
        for b, rb in items[k + 1:]:
            if (ra[0] - margin < rb[2] and rb[0] - margin < ra[2] and ra[1] - margin < rb[3] and rb[1] - margin < ra[3]):
                found.append((a, b))
    return found
