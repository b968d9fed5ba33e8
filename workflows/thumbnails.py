"""Thumbnails for ComfyUI's template browser: workflows/<name>.jpg, drawn without network.

Each card is the workflow's own graph in miniature (groups, nodes, the green / red prompts)
under its title, so the cards tell the workflows apart at a glance. Small (JPEG, 512 x 512,
well under 50 KB) and committed; `python workflows/build.py` redraws them.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from layout import TITLE
from templates import TEMPLATES

SIZE = 512
BACKGROUND = (24, 26, 32)
GROUP = (63, 120, 158)
NODE = (53, 53, 53)
NODE_TITLE = (34, 34, 34)
ACCENT = (98, 72, 190)  # Qwen-ish violet band behind the title
FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def _font(size: int, bold: bool):
    path = FONTS[0] if bold else FONTS[1]
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return ImageFont.load_default(size)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def _node_fill(node: dict) -> tuple:
    if node.get("bgcolor"):
        h = node["bgcolor"].lstrip("#")
        return tuple(int(c * 2, 16) for c in h) if len(h) == 3 else tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))
    return (90, 60, 130) if node.get("mode") == 4 else NODE


def thumbnail(workflow: dict, title: str, description: str) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    nodes = workflow["nodes"]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] - TITLE for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    box = (24, 24, SIZE - 24, 330)  # the graph's area on the card
    scale = min((box[2] - box[0]) / (x1 - x0), (box[3] - box[1]) / (y1 - y0))
    ox = box[0] + ((box[2] - box[0]) - (x1 - x0) * scale) / 2
    oy = box[1] + ((box[3] - box[1]) - (y1 - y0) * scale) / 2

    def at(x, y):
        return ox + (x - x0) * scale, oy + (y - y0) * scale

    for g in workflow["groups"]:
        x, y, w, h = g["bounding"]
        draw.rectangle([*at(x, y), *at(x + w, y + h)], fill=(32, 48, 62), outline=GROUP)
    for n in nodes:
        (x, y), (w, h) = n["pos"], n["size"]
        draw.rectangle([*at(x, y - TITLE), *at(x + w, y + h)], fill=_node_fill(n), outline=(20, 20, 20))
        draw.rectangle([*at(x, y - TITLE), *at(x + w, y)], fill=NODE_TITLE)
    draw.rectangle([0, 350, SIZE, SIZE], fill=ACCENT)
    y = 366
    for line in _wrap(draw, title, _font(30, True), SIZE - 40)[:2]:
        draw.text((20, y), line, font=_font(30, True), fill=(255, 255, 255))
        y += 38
    for line in _wrap(draw, description, _font(19, False), SIZE - 40)[:3]:
        draw.text((20, y + 4), line, font=_font(19, False), fill=(230, 224, 250))
        y += 25
    return img


def write_thumbnails(folder: Path) -> None:
    for name, title, description in TEMPLATES:
        workflow = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        thumbnail(workflow, title, description).save(folder / f"{name}.jpg", "JPEG", quality=82, optimize=True)
