"""Opening weight files and folders without trusting them.

Every header is read and checked by hand before safetensors touches the file, so an empty,
truncated or renamed file gives a message a user can act on instead of a Rust panic, and a
pickle is recognised by its first bytes and never unpickled.

``open_weights`` returns a :class:`WeightSource`: a lazy view of one file or of a diffusers
folder's shards. It knows every tensor's shape and dtype up front and reads one tensor at a
time, which is what lets a loader stream a 40 GB file into a model without a second copy.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import WeightFileError

# safetensors dtype tag -> (torch dtype attribute name, bytes per element)
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    # Power-of-two block scales (mxfp8): read as their bytes, which is how the layers use them.
    "F8_E8M0": ("uint8", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pt2")
# safetensors itself refuses larger headers; a bigger "length" means the file is something else.
_MAX_HEADER = 100 * 1024 * 1024
_SINGLE_FILE_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PIPELINE_COMPONENTS = ("transformer", "text_encoder", "vae", "controlnet")

_CONVERT_HINT = (
    "a .safetensors (or .gguf) file; PyTorch pickle checkpoints can run arbitrary code when "
    "opened, so they are never loaded here: download the .safetensors version or convert the "
    "file in a trusted environment"
)


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int  # start of the tensor's bytes inside the data section, for sequential reads

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _sniff(head: bytes) -> str | None:
    """Name the format of a file that is not safetensors, from its first bytes."""
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"  # torch.save's default format: a zip around a pickle
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    stripped = head.lstrip()
    if stripped.startswith(b"version https://git-lfs"):
        return "lfs"
    if stripped[:15].lower().startswith((b"<!doctype", b"<html")):
        return "html"
    return None


def is_gguf(path) -> bool:
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _refuse_foreign(path: Path, kind: str) -> None:
    if kind in ("pickle", "zip"):
        raise WeightFileError(
            path, "is a PyTorch pickle checkpoint (renamed or not), not a safetensors file; it was not opened.",
            _CONVERT_HINT,
        )
    if kind == "lfs":
        raise WeightFileError(
            path, "is a Git LFS pointer (a small text file), not the weights: the real file was never downloaded.",
            "the full file, downloaded with `git lfs pull` or from the model page's download link",
        )
    if kind == "html":
        raise WeightFileError(
            path, "is a web page (HTML), not model weights: the download saved an error or login page.",
            "the model file itself; download it again",
        )
    if kind == "gguf":
        raise WeightFileError(path, "is a GGUF file, but it was opened as safetensors.", "a .gguf file name for GGUF data")


def read_header(path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a safetensors file's header and return ``(tensors, metadata)``.

    Reads only the header; raises :class:`WeightFileError` for anything a loader could not use.
    """
    p = Path(path)
    if not p.exists():
        raise WeightFileError(p, "does not exist.", "an existing model file")
    if p.is_dir():
        raise WeightFileError(p, "is a folder, not a file.", "a .safetensors file")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightFileError(p, f"is a '{p.suffix}' pickle checkpoint; it was not opened.", _CONVERT_HINT)
    size = p.stat().st_size
    if size == 0:
        raise WeightFileError(p, "is empty (0 bytes): the download or copy did not finish.", "the complete file; download it again")
    with open(p, "rb") as f:
        head = f.read(64)
        kind = _sniff(head)
        if kind is not None:
            _refuse_foreign(p, kind)
        if size < 8:
            raise WeightFileError(p, f"is only {size} bytes long: it is truncated.", "a complete safetensors file")
        (n,) = struct.unpack("<Q", head[:8])
        if n > _MAX_HEADER or (n > size - 8 and head[8:9] != b"{"):
            raise WeightFileError(p, "is not a safetensors file (its first bytes are not a safetensors header).",
                                  "a .safetensors file")
        if n > size - 8:
            raise WeightFileError(p, f"is truncated: the header alone needs {n + 8} bytes but the file has {size}.",
                                  "the complete file; download it again")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightFileError(p, f"has a damaged header (not valid JSON: {e}).", "a valid safetensors file") from None
    if not isinstance(header, dict):
        raise WeightFileError(p, "has a damaged header (not a JSON object).", "a valid safetensors file")

    data_size = size - 8 - n
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        meta = {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(p, name, entry, data_size, size)
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _check_entry(p: Path, name: str, entry, data_size: int, size: int) -> TensorInfo:
    try:
        tag, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = tuple(int(s) for s in shape)
        start, end = int(start), int(end)
    except (TypeError, KeyError, ValueError):
        raise WeightFileError(p, f"has a damaged header entry for tensor '{name}'.", "a valid safetensors file") from None
    if tag not in _DTYPES or not hasattr(torch, _DTYPES[tag][0]):
        raise WeightFileError(p, f"stores tensor '{name}' as {tag}, which this loader cannot read.",
                              "tensors in BF16, F16, F32 or F8_E4M3/F8_E5M2")
    attr, itemsize = _DTYPES[tag]
    if end > data_size:
        raise WeightFileError(
            p, f"is truncated: tensor '{name}' ends at byte {end + size - data_size} but the file has only {size} bytes.",
            "the complete file; download it again",
        )
    numel = 1
    for s in shape:
        numel *= s
    if start < 0 or end - start != numel * itemsize:
        raise WeightFileError(p, f"is damaged: tensor '{name}' has {end - start} bytes for shape {list(shape)} {tag}.",
                              "a valid safetensors file")
    return TensorInfo(shape, getattr(torch, attr), p, start)


class WeightSource:
    """Lazy view of the tensors of one file or of several shards.

    Indexing gives a :class:`TensorInfo`; ``get(name)`` reads that one tensor (on the CPU).
    """

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], *, layout: str,
                 config: dict | None = None, metadata: dict[str, str] | None = None):
        self.path = path
        self.layout = layout
        self.config = config
        self.metadata = metadata or {}
        self._tensors = tensors
        self._handles: dict[Path, object] = {}

    # mapping protocol: name -> TensorInfo
    def __getitem__(self, name: str) -> TensorInfo:
        return self._tensors[name]

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def keys(self):
        return self._tensors.keys()

    def items(self):
        return self._tensors.items()

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self._tensors.values()})

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self._tensors.items()}

    def in_file_order(self) -> list[str]:
        """Names sorted by file and position, so a streaming load reads each file front to back."""
        return sorted(self._tensors, key=lambda k: (str(self._tensors[k].file), self._tensors[k].offset))

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self._tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            try:
                handle = safe_open(str(info.file), framework="pt", device="cpu")
            except Exception as e:  # the header was checked, so this is an I/O or format problem
                raise WeightFileError(info.file, f"could not be opened ({e}).", "a readable safetensors file") from None
            self._handles[info.file] = handle
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise WeightFileError(info.file, f"could not read tensor '{name}' ({e}).", "a readable safetensors file") from None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "WeightSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WeightSource({str(self.path)!r}, {self.layout}, {len(self)} tensors)"


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightFileError(path, f"could not be read as JSON ({e}).", "a valid JSON file") from None
    if not isinstance(data, dict):
        raise WeightFileError(path, "does not hold a JSON object.", "a valid JSON file")
    return data


def _config_next_to(folder: Path) -> dict | None:
    cfg = folder / "config.json"
    return _read_json(cfg) if cfg.is_file() else None


def _pick_index(folder: Path) -> Path | None:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if not indexes:
        return None
    for preferred in _SINGLE_FILE_NAMES:
        cand = folder / (preferred + ".index.json")
        if cand in indexes:
            return cand
    if len(indexes) > 1:
        names = ", ".join(i.name for i in indexes)
        raise WeightFileError(folder, f"holds several weight indexes ({names}) and none is the standard one.",
                              "one diffusion_pytorch_model.safetensors.index.json or model.safetensors.index.json")
    return indexes[0]


def _open_sharded(folder: Path, index_path: Path) -> WeightSource:
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightFileError(index_path, "has no 'weight_map'.", "a diffusers/transformers shard index")
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        shard_path = folder / shard
        if not shard_path.is_file():
            raise WeightFileError(shard_path, f"is listed in {index_path.name} but missing.",
                                  "every shard named in the index (the download is incomplete)")
        found, meta = read_header(shard_path)
        metadata.update(meta)
        for name, info in found.items():
            tensors[name] = info
    missing = [k for k, shard in weight_map.items() if k not in tensors or tensors[k].file.name != shard]
    if missing:
        raise WeightFileError(index_path, f"names {len(missing)} tensors its shards do not hold (e.g. {missing[:3]}).",
                              "an index that matches its shard files")
    return WeightSource(folder, tensors, layout=f"diffusers folder ({len(shards)} shards)",
                        config=_config_next_to(folder), metadata=metadata)


def _separate_block_files(folder: Path, source: WeightSource) -> list[Path]:
    """The other ``*.safetensors`` of a DFloat11 folder saved block by block: the dfloat11
    package's ``compress_model(save_single_file=False)`` writes each compressed block to its own
    ``<module_name>.safetensors`` (``transformer_blocks_0.safetensors``, ...) next to the model's
    file, and its loader reads every file there. Other folders: none (a diffusers folder may hold
    variants such as ``*.fp16.safetensors`` of the same tensors, which must not be merged)."""
    if not (isinstance(source.config, dict) and "dfloat11_config" in source.config):
        return []
    read = {info.file for info in source._tensors.values()}
    return sorted(p for p in folder.glob("*.safetensors") if p not in read)


def _with_files(source: WeightSource, files: list[Path]) -> WeightSource:
    tensors = dict(source._tensors)
    for path in files:
        found, _ = read_header(path)
        twice = sorted(set(found) & set(tensors))
        if twice:
            raise WeightFileError(path, f"holds tensors another file of the folder holds too (e.g. {twice[:3]}).",
                                  "each tensor of a DFloat11 folder in one file")
        tensors.update(found)
    return WeightSource(source.path, tensors, layout=f"{source.layout[:-1]}, {len(files)} block files)",
                        config=source.config, metadata=source.metadata)


def _open_folder(folder: Path, component: str | None) -> WeightSource:
    if component is not None and (folder / component).is_dir():
        folder = folder / component
    source = _open_main(folder)
    if source is None:
        return _refuse_folder(folder, component)
    blocks = _separate_block_files(folder, source)
    return _with_files(source, blocks) if blocks else source


def _open_main(folder: Path) -> WeightSource | None:
    """The folder's index and shards, or its one weight file; None when it has neither."""
    index = _pick_index(folder)
    if index is not None:
        return _open_sharded(folder, index)
    for name in _SINGLE_FILE_NAMES:
        single = folder / name
        if single.is_file():
            tensors, meta = read_header(single)
            return WeightSource(folder, tensors, layout="diffusers folder (1 file)",
                                config=_config_next_to(folder), metadata=meta)
    return None


def _refuse_folder(folder: Path, component: str | None):
    present = [c for c in PIPELINE_COMPONENTS if (folder / c).is_dir()]
    if present:
        raise WeightFileError(
            folder, f"is a diffusers pipeline folder (it has {', '.join(p + '/' for p in present)}).",
            f"the {component + '/' if component else 'component'} subfolder, or the pipeline folder with the component named",
        )
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    found = f" It holds pickle weights ({', '.join(pickles[:3])}), which are never loaded." if pickles else ""
    raise WeightFileError(
        folder, "is a folder without a safetensors index or weight file." + found,
        "a diffusers folder with *.safetensors.index.json and its shards, or a single "
        "diffusion_pytorch_model.safetensors / model.safetensors",
    )


def open_weights(path, component: str | None = None) -> WeightSource:
    """Open a ``.safetensors`` file, a diffusers component folder, or a pipeline folder.

    ``component`` ("transformer", "text_encoder", "vae", ...) picks the subfolder when ``path``
    is the parent folder of a diffusers pipeline. GGUF files are not handled here
    (see :func:`is_gguf`).
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise WeightFileError(p, "does not exist.", "an existing model file or folder")
    if p.is_dir():
        return _open_folder(p, component)
    if is_gguf(p):
        raise WeightFileError(p, "is a GGUF file; it is read by the GGUF reader, not as safetensors.", None)
    tensors, meta = read_header(p)
    # A shard picked out of a diffusers folder still has its config next to it.
    config = _config_next_to(p.parent) if p.name.startswith(("diffusion_pytorch_model", "model")) else None
    return WeightSource(p, tensors, layout="single file", config=config, metadata=meta)
