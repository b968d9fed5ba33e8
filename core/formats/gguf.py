"""GGUF files: header parsing, memory-mapped tensors, and what kind of model a file holds.

The header is parsed here rather than with ``gguf.GGUFReader``: that reader turns every
element of every metadata array into numpy objects while opening, which costs ~9 s on a
file with a full tokenizer (152k tokens + 151k merges). Here large string arrays are only
skipped (their lengths are read, their bytes are not) and come back as ``LazyStringArray``
to be read on demand; everything else in the header is tiny. No ``gguf`` package is needed
at run time.

Tensor data stays in the file mapping: plain tensors (F32/F16/BF16...) are torch views of it,
quantized ones are ``QuantizedTensor`` whose uint8 blocks are views of it. The mapping is
read-only: the views must not be written in place (moving them to a device or dtype copies).
"""
from __future__ import annotations

import mmap
import os
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from ..quant.gguf_dequant import GGML_TYPES, PLAIN_TYPES, SUPPORTED_TYPES, dequantize, supported_type_names, type_name
from ..errors import WeightFileError
from ..layers.linear import QuantizedTensor

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Metadata value types: id -> (struct format, size); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
# Arrays longer than this stay lazy (strings) or become numpy arrays (numbers).
_EAGER_LIMIT = 1024

# On-disk element type of each plain tensor type (BF16 is read as int16, then bit-cast).
_PLAIN_NUMPY = {0: "<f4", 1: "<f2", 30: "<i2", 28: "<f8", 24: "i1", 25: "<i2", 26: "<i4", 27: "<i8"}

EXPECT_KINDS = ("mmdit", "text", "mmproj")
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."


class LazyStringArray:
    """A metadata string array left in the file until asked for (tokenizer vocabularies)."""

    def __init__(self, buffer, offset: int, count: int, source: str):
        self._buffer = buffer
        self._offset = offset
        self._count = count
        self.source = source

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"LazyStringArray({self._count} strings)"

    def read(self) -> list[str]:
        buf, pos, out = self._buffer, self._offset, []
        unpack = _U64.unpack_from
        for _ in range(self._count):
            (n,) = unpack(buf, pos)
            out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"))
            pos += 8 + n
        return out


class TensorInfo(NamedTuple):
    name: str
    qtype: int
    shape: tuple[int, ...]  # torch order: reversed GGUF ne
    offset: int  # absolute, in bytes
    nbytes: int


@dataclass
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    buffer: Any = field(repr=False)  # the read-only mapping the tensors are views of


@dataclass
class GGUFContents:
    arch: str
    tensors: dict[str, torch.Tensor | QuantizedTensor]
    metadata: dict[str, Any]
    path: str = ""


class _Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Truncated
        self.pos = start + n
        return start

    def scalar(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.buf, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar("Q")
        start = self.take(n)
        return self.buf[start : start + n].decode("utf-8", errors="replace")

    def value(self, vtype: int, source: str):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        itype, count = self.scalar("I"), self.scalar("Q")
        if itype in _SCALARS:
            fmt = "<" + _SCALARS[itype]
            start = self.take(count * struct.calcsize(fmt))
            if count <= _EAGER_LIMIT:
                return list(struct.unpack_from(f"<{count}{fmt[1:]}", self.buf, start))
            return np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=start).copy()
        if itype == _STRING and count > _EAGER_LIMIT:
            start = pos = self.pos
            unpack, buf = _U64.unpack_from, self.buf
            try:
                for _ in range(count):
                    pos += 8 + unpack(buf, pos)[0]
            except struct.error:
                raise _Truncated from None
            self.take(pos - start)
            return LazyStringArray(buf, start, count, source)
        return [self.value(itype, source) for _ in range(count)]


def _not_gguf_message(head: bytes) -> str:
    if head[:2] == b"PK":
        return "is a zip archive (a PyTorch .pt/.ckpt checkpoint?), not a GGUF file."
    if len(head) >= 9 and head[8:9] == b"{":
        return "looks like a safetensors file, not a GGUF file (load it with the safetensors loader)."
    return f"is not a GGUF file (it starts with {head[:4]!r}, a GGUF file starts with b'GGUF')."


def read_header(path) -> GGUFHeader:
    """Parse a GGUF header (metadata + tensor table) and map the file; no tensor is touched."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise WeightFileError(path, "is empty.", "a GGUF model file")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise WeightFileError(path, "does not exist.") from None
    except IsADirectoryError:
        raise WeightFileError(path, "is a folder, not a file.", "a .gguf file") from None
    except OSError as e:
        raise WeightFileError(path, f"cannot be read ({e.strerror or e}).") from None

    if buf[:4] != GGUF_MAGIC:
        raise WeightFileError(path, _not_gguf_message(bytes(buf[:16])))
    cur = _Cursor(buf, size)
    try:
        cur.take(4)
        version = cur.scalar("I")
        if version & 0xFFFF == 0 and (version >> 24) in (2, 3):
            raise WeightFileError(path, "is a big-endian GGUF file.", "a little-endian GGUF (the usual kind)")
        if version not in (2, 3):
            raise WeightFileError(path, f"has GGUF version {version}.", "GGUF version 2 or 3")
        n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("I"), path)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("I")
            if not 1 <= n_dims <= 8:
                raise WeightFileError(path, f"tensor {name!r} has {n_dims} dimensions; the file is damaged.")
            ne = [cur.scalar("Q") for _ in range(n_dims)]
            infos.append((name, ne, cur.scalar("I"), cur.scalar("Q")))
        header_end = cur.pos
    except _Truncated:
        raise WeightFileError(path, f"is truncated: the header runs past the end of the file ({size} bytes).",
                              "a complete GGUF file (re-download it)") from None
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        if isinstance(e, WeightFileError):
            raise
        raise WeightFileError(path, f"has a damaged header ({e}).") from None

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise WeightFileError(path, f"has an invalid general.alignment {alignment!r}.", "a power of two")
    data_start = -(-header_end // alignment) * alignment
    return GGUFHeader(path, version, metadata, _tensor_table(path, infos, data_start, size), buf)


def _tensor_table(path: str, infos, data_start: int, size: int) -> list[TensorInfo]:
    out, seen = [], set()
    for name, ne, qtype, rel in infos:
        if name in seen:
            raise WeightFileError(path, f"holds tensor {name!r} twice; the file is damaged.")
        seen.add(name)
        spec = GGML_TYPES.get(qtype)
        if spec is None or qtype not in SUPPORTED_TYPES:
            raise WeightFileError(
                path, f"tensor {name!r} is stored as {type_name(qtype)}, which this loader cannot decode.",
                f"one of the supported types: {supported_type_names()}",
            )
        if ne[0] % spec.block_size:
            raise WeightFileError(
                path, f"tensor {name!r} has rows of {ne[0]} values, not a multiple of the "
                f"{spec.name} block size {spec.block_size}; the file is damaged.",
            )
        numel = 1
        for n in ne:
            numel *= n
        nbytes = numel // spec.block_size * spec.type_size
        start = data_start + rel
        if start + nbytes > size:
            raise WeightFileError(
                path, f"is truncated: tensor {name!r} needs bytes {start}..{start + nbytes}, "
                f"but the file has only {size} bytes.", "a complete GGUF file (re-download it)",
            )
        out.append(TensorInfo(name, qtype, tuple(int(n) for n in reversed(ne)), start, nbytes))
    return out


def _as_torch(array: np.ndarray) -> torch.Tensor:
    # The mapping is read-only; torch warns that writing would be undefined. We never write.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(array)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def load_tensor(header: GGUFHeader, info: TensorInfo) -> torch.Tensor | QuantizedTensor:
    """One tensor as a view of the mapping (copied only when the file misaligns it)."""
    plain = PLAIN_TYPES.get(info.qtype)
    if plain is not None:
        np_dtype = np.dtype(_PLAIN_NUMPY[info.qtype])
        arr = np.frombuffer(header.buffer, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if info.offset % np_dtype.itemsize:
            arr = arr.copy()
        t = _as_torch(arr.view(np_dtype)).reshape(info.shape)
        return t.view(torch.bfloat16) if plain is torch.bfloat16 else t
    blocks = _as_torch(np.frombuffer(header.buffer, dtype=np.uint8, count=info.nbytes, offset=info.offset))
    if len(info.shape) >= 2:
        return QuantizedTensor(blocks.reshape(info.shape[0], -1), info.qtype, info.shape)
    # A quantized vector has no row structure to keep; decode it once.
    return dequantize(blocks.reshape(1, -1), info.qtype, info.shape[0], torch.float32).reshape(info.shape)


def _reshape(path: str, name: str, t, shape: tuple[int, ...]):
    """Apply a ``comfy.gguf.orig_shape`` override (the converter flattened the tensor)."""
    have = t.shape if isinstance(t, QuantizedTensor) else tuple(t.shape)
    if _numel(have) != _numel(shape):
        raise WeightFileError(path, f"tensor {name!r} has shape {tuple(have)}, which cannot become its "
                              f"recorded original shape {shape}.")
    if not isinstance(t, QuantizedTensor):
        return t.reshape(shape)
    block = GGML_TYPES[t.qtype].block_size
    if len(shape) >= 2 and _numel(shape[1:]) % block == 0:
        return QuantizedTensor(t.blocks.reshape(shape[0], -1), t.qtype, shape)
    flat = t.blocks.reshape(1, -1)
    return dequantize(flat, t.qtype, _numel(have), torch.float32).reshape(shape)


def read_tensors(header: GGUFHeader) -> dict[str, torch.Tensor | QuantizedTensor]:
    """All tensors under their file names, ``comfy.gguf.orig_shape`` overrides applied."""
    out = {}
    for info in header.tensors:
        t = load_tensor(header, info)
        override = header.metadata.get(ORIG_SHAPE_PREFIX + info.name)
        if override is not None:
            t = _reshape(header.path, info.name, t, tuple(int(s) for s in override))
        out[info.name] = t
    return out


# ---------------------------------------------------------------------------------------
# What a file is, and what each loader expects

_ARCH_DESCRIPTIONS = {
    "qwen_image": "a Qwen-Image MMDiT (diffusion model)",
    "qwen2vl": "a Qwen2-VL / Qwen2.5-VL language model (text encoder)",
    "clip": "a vision tower / projector (mmproj)",
    "flux": "a Flux diffusion model",
    "sd1": "a Stable Diffusion 1.x UNet",
    "sdxl": "an SDXL UNet",
    "sd3": "an SD3 MMDiT",
    "aura": "an AuraFlow model",
    "hidream": "a HiDream model",
    "wan": "a Wan video model",
    "ltxv": "an LTX-Video model",
    "hyvid": "a HunyuanVideo model",
    "cosmos": "a Cosmos model",
    "lumina2": "a Lumina 2 model",
    "chroma": "a Chroma model",
    "llama": "a Llama language model",
    "qwen2": "a Qwen2 / Qwen2.5 language model without vision (not Qwen2.5-VL)",
    "qwen3": "a Qwen3 language model",
    "t5": "a T5 text encoder",
    "t5encoder": "a T5 text encoder",
}
_EXPECTED = {
    "mmdit": "a Qwen-Image MMDiT GGUF (general.architecture 'qwen_image'), e.g. qwen-image-Q4_K_M.gguf",
    "text": "a Qwen2.5-VL-7B language model GGUF (general.architecture 'qwen2vl'), "
            "e.g. Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf",
    "mmproj": "a Qwen2.5-VL vision projector GGUF (general.architecture 'clip', projector "
              "'qwen2.5vl_merger'), e.g. mmproj-Qwen2.5-VL-7B-Instruct-f16.gguf",
}
_ARCH_FOR = {"mmdit": ("qwen_image",), "text": ("qwen2vl",), "mmproj": ("clip",)}
MMPROJ_PROJECTORS = ("qwen2.5vl_merger", "qwen2vl_merger")
# Where city96 / ComfyUI put the MMDiT inside a file (keymaps/mmdit.py renames them).
_MMDIT_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "transformer.")


def _describe(arch: str) -> str:
    desc = _ARCH_DESCRIPTIONS.get(arch)
    return f"{desc} (general.architecture '{arch}')" if desc else f"a model of architecture '{arch}'"


def _check_arch(header: GGUFHeader, expect: str) -> str:
    md, path = header.metadata, header.path
    arch = md.get("general.architecture")
    if arch is None:
        # Early city96 conversions carry no architecture; recognise the MMDiT by its tensors.
        names = [t.name for t in header.tensors]
        if (expect == "mmdit" and any(n.rpartition("txt_norm.")[0] in _MMDIT_PREFIXES and n.endswith("txt_norm.weight")
                                      for n in names)
                and any("transformer_blocks." in n for n in names)):
            return "qwen_image"
        raise WeightFileError(path, "has no general.architecture entry and is not recognisable.", _EXPECTED[expect])
    arch = str(arch)
    if arch not in _ARCH_FOR[expect]:
        raise WeightFileError(path, f"holds {_describe(arch)}.", _EXPECTED[expect])
    if expect == "mmproj":
        projector = md.get("clip.projector_type", md.get("clip.vision.projector_type"))
        if projector not in MMPROJ_PROJECTORS:
            raise WeightFileError(path, f"is a vision projector of type {projector!r}, not Qwen2.5-VL's.",
                                  _EXPECTED[expect])
        if md.get("clip.has_vision_encoder", True) is False:
            raise WeightFileError(path, "has no vision encoder (clip.has_vision_encoder is false).",
                                  _EXPECTED[expect])
    return arch


def read_gguf_tensors(path, expect: str) -> GGUFContents:
    """Open a GGUF file for one of our loaders: its tensors under the file's own names.

    ``expect``: "mmdit", "text" or "mmproj". A file of another kind raises ``WeightFileError``
    saying what it is and what was expected. The names are the file's (llama.cpp's, city96's);
    ``loading/gguf.py`` renames them to ours through ``keymaps``.
    """
    if expect not in EXPECT_KINDS:
        raise ValueError(f"expect must be one of {', '.join(EXPECT_KINDS)}, got {expect!r}")
    header = read_header(path)
    arch = _check_arch(header, expect)
    return GGUFContents(arch=arch, tensors=read_tensors(header), metadata=header.metadata, path=header.path)


# ---------------------------------------------------------------------------------------
# Model configs from metadata

def _meta(md: dict, key: str, path, required: bool = True, default=None):
    if key in md:
        return md[key]
    if required:
        raise WeightFileError(path, f"lacks the metadata entry {key!r}.", "a llama.cpp-converted GGUF")
    return default


def text_config_from_metadata(metadata: dict, tensors: dict | None = None, path=None) -> dict:
    """``TextEncoderConfig`` keyword arguments from a llama.cpp text model's metadata.

    The vocabulary size comes from ``<arch>.vocab_size``, else the token list's length, else
    the rows of ``embed_tokens.weight`` in ``tensors`` (if given).
    """
    arch = str(metadata.get("general.architecture", "qwen2vl"))
    p = arch + "."
    hidden = int(_meta(metadata, p + "embedding_length", path))
    heads = int(_meta(metadata, p + "attention.head_count", path))
    cfg = dict(
        hidden_size=hidden,
        num_layers=int(_meta(metadata, p + "block_count", path)),
        num_heads=heads,
        num_kv_heads=int(_meta(metadata, p + "attention.head_count_kv", path, False, heads)),
        head_dim=hidden // heads,
        intermediate_size=int(_meta(metadata, p + "feed_forward_length", path)),
        rope_theta=float(_meta(metadata, p + "rope.freq_base", path, False, 1e6)),
        rms_eps=float(_meta(metadata, p + "attention.layer_norm_rms_epsilon", path, False, 1e-6)),
    )
    sections = metadata.get(p + "rope.dimension_sections")
    if sections is not None:
        cfg["mrope_section"] = tuple(int(s) for s in list(sections)[:3])
    vocab = metadata.get(p + "vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in metadata:
        vocab = len(metadata["tokenizer.ggml.tokens"])
    if vocab is None and tensors is not None and "embed_tokens.weight" in tensors:
        vocab = tensors["embed_tokens.weight"].shape[0]
    if vocab is None:
        raise WeightFileError(path, "gives no vocabulary size (no vocab_size, token list or embedding).")
    cfg["vocab_size"] = int(vocab)
    return cfg


def vision_config_from_metadata(metadata: dict, path=None) -> dict:
    """Qwen2.5-VL vision tower settings from an mmproj's ``clip.vision.*`` metadata
    (HF ``vision_config`` names; best-effort, llama.cpp's keys as of gguf 0.19)."""
    p = "clip.vision."
    depth = int(_meta(metadata, p + "block_count", path))
    cfg = dict(
        depth=depth,
        hidden_size=int(_meta(metadata, p + "embedding_length", path)),
        num_heads=int(_meta(metadata, p + "attention.head_count", path)),
        intermediate_size=int(_meta(metadata, p + "feed_forward_length", path)),
        out_hidden_size=int(_meta(metadata, p + "projection_dim", path)),
        patch_size=int(_meta(metadata, p + "patch_size", path, False, 14)),
        spatial_merge_size=int(_meta(metadata, p + "spatial_merge_size", path, False, 2)),
        eps=float(_meta(metadata, p + "attention.layer_norm_epsilon", path, False, 1e-6)),
    )
    # llama.cpp stores the full-attention blocks as a period: block i is full when (i+1) % n == 0.
    n_wa = metadata.get(p + "n_wa_pattern")
    if n_wa:
        cfg["fullatt_block_indexes"] = [i for i in range(depth) if (i + 1) % int(n_wa) == 0]
    if p + "window_size" in metadata:
        cfg["window_size"] = int(metadata[p + "window_size"])
    return cfg
