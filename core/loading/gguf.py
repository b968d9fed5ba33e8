"""GGUF files under our tensor names: the reader (formats/gguf.py) plus each family's key map."""
from __future__ import annotations

from ..formats.gguf import GGUFContents, read_gguf_tensors
from ..keymaps.mmdit import strip_mmdit_prefix
from ..keymaps.text import text_names_from_gguf
from ..keymaps.vision import vision_names_from_mmproj


def read_gguf(path, expect: str) -> GGUFContents:
    """Open a GGUF file for one of our loaders and return its tensors under our names.

    ``expect``: "mmdit" (diffusers QwenImageTransformer2DModel names), "text" (QwenTextEncoder
    names: ``embed_tokens``, ``layers.N.*``, ``norm``; lm_head dropped) or "mmproj" (HF
    ``visual.*`` names). A file of another kind raises ``WeightFileError`` saying what it is and
    what was expected.
    """
    contents = read_gguf_tensors(path, expect)
    tensors = contents.tensors
    if expect == "mmdit":
        tensors = {strip_mmdit_prefix(n): t for n, t in tensors.items()}
    elif expect == "text":
        tensors = text_names_from_gguf(tensors)
    else:
        md = contents.metadata
        projector = md.get("clip.projector_type", md.get("clip.vision.projector_type"))
        tensors = vision_names_from_mmproj(contents.path, tensors, projector)
    return GGUFContents(arch=contents.arch, tensors=tensors, metadata=contents.metadata, path=contents.path)
