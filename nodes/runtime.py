"""Everything the nodes need from their host, inside ComfyUI or in plain Python.

This is the only module that imports ``comfy`` / ``folder_paths``. Outside ComfyUI (tests,
scripts) model files come from ``$QWENIMAGE_MODELS_DIR/<folder>``, progress goes nowhere and
there is nothing to interrupt.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

import torch

from ..core.errors import PackError

log = logging.getLogger("qwenimage")

try:  # pragma: no cover - exercised only inside ComfyUI
    import folder_paths  # type: ignore
    import comfy.controlnet as _cn  # type: ignore
    import comfy.model_base as _mb  # type: ignore
    import comfy.model_management as _mm  # type: ignore
    import comfy.model_patcher as _mp  # type: ignore
    import comfy.patcher_extension as _pe  # type: ignore
    import comfy.supported_models as _sm  # type: ignore
    import comfy.utils as _cu  # type: ignore

    IN_COMFYUI = True
except Exception:  # ImportError, or a half-initialised ComfyUI in odd test set-ups
    folder_paths = _cn = _mb = _mm = _mp = _pe = _sm = _cu = None
    IN_COMFYUI = False

# ComfyUI's own classes that ours derive from (None outside ComfyUI). Our ModelPatcher and our
# MODEL are genuine subclasses of these, never look-alikes: ComfyUI reads new members of them
# every month, and a subclass inherits each one.
ModelPatcher = _mp.ModelPatcher if IN_COMFYUI else None
QwenImageBaseModel = _mb.QwenImage if IN_COMFYUI else None
# ComfyUI's Qwen-Image Fun ControlNet (ComfyUI 0.30 and later; None before, and outside ComfyUI).
QwenFunControlNet = getattr(_cn, "QwenFunControlNet", None) if IN_COMFYUI else None
ON_LOAD = _pe.CallbacksMP.ON_LOAD if IN_COMFYUI else "on_load_after"
OUTER_SAMPLE = _pe.WrappersMP.OUTER_SAMPLE if IN_COMFYUI else "outer_sample"

MODELS_DIR_ENV = "QWENIMAGE_MODELS_DIR"

# What our loaders read. Pickle formats are deliberately absent: listing them would only
# invite files we refuse to unpickle.
WEIGHT_EXTENSIONS = (".safetensors", ".sft")
GGUF_EXTENSIONS = (".gguf",)

# Our folder kind -> the folder names used on disk (ComfyUI's key first, then its aliases).
FOLDERS = {
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "loras": ("loras",),
    "controlnet": ("controlnet",),
    "model_patches": ("model_patches",),
}

# Index / single-file names that make a directory a diffusers component folder.
_DIFFUSERS_MARKERS = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
)


class ModelFileNotFound(PackError, FileNotFoundError):
    """A chosen file is in none of the model folders (ComfyUI shows it as qwenimage.ModelFileNotFound)."""


def _base_dirs(kind: str) -> list[Path]:
    if kind not in FOLDERS:
        raise KeyError(f"unknown model folder kind {kind!r}")
    dirs: list[Path] = []
    if IN_COMFYUI:
        for name in FOLDERS[kind]:
            try:
                dirs += [Path(p) for p in folder_paths.get_folder_paths(name)]
            except KeyError:
                continue
    root = os.environ.get(MODELS_DIR_ENV)
    if root:
        dirs += [Path(root) / name for name in FOLDERS[kind]]
    seen, unique = set(), []
    for d in dirs:
        key = os.path.normcase(os.path.abspath(d))
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


def _is_diffusers_folder(d: Path) -> bool:
    return any((d / m).is_file() for m in _DIFFUSERS_MARKERS) or any(d.glob("*.safetensors.index.json"))


def list_model_files(kind: str, gguf: bool = True) -> list[str]:
    """Loadable files (and diffusers component folders) under every folder of ``kind``,
    as '/'-separated paths relative to their base folder."""
    exts = WEIGHT_EXTENSIONS + (GGUF_EXTENSIONS if gguf else ())
    found: set[str] = set()
    for base in _base_dirs(kind):
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            here = Path(dirpath)
            rel_dir = here.relative_to(base)
            if here != base and _is_diffusers_folder(here):
                found.add(rel_dir.as_posix())
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in filenames:
                if f.lower().endswith(exts) and not _is_shard(f):
                    found.add((rel_dir / f).as_posix())
    return sorted(found, key=str.lower)


def _is_shard(filename: str) -> bool:
    # "model-00001-of-00004.safetensors": a piece of a folder, not a model on its own.
    stem = filename.rsplit(".", 1)[0]
    parts = stem.split("-")
    return len(parts) >= 3 and parts[-2] == "of" and parts[-1].isdigit() and parts[-3].isdigit()


def resolve_model_file(kind: str, name: str) -> Path:
    """The full path of ``name`` as listed by :func:`list_model_files`."""
    if os.path.isabs(name) and os.path.exists(name):
        return Path(name)
    tried = []
    for base in _base_dirs(kind):
        p = base / name
        tried.append(str(base))
        if p.exists():
            return p
    where = ", ".join(tried) if tried else f"no folder (inside ComfyUI use models/{FOLDERS[kind][0]}; outside it set ${MODELS_DIR_ENV})"
    raise ModelFileNotFound(f"{name!r} was not found in the {FOLDERS[kind][0]} folder. Looked in: {where}.")


_EMPTY_CHOICE = "(no files in {})"


def _folder_names(kinds) -> str:
    return " or ".join(f"models/{FOLDERS[k][0]}" for k in kinds)


def file_choices(*kinds: str, gguf: bool = True) -> list[str]:
    """A loader's combo: the files of ``kinds`` (first folder first), or one placeholder that
    tells the user where files go, since an empty combo gives them nothing to read."""
    files = iter_unique(f for kind in kinds for f in list_model_files(kind, gguf=gguf))
    return files or [_EMPTY_CHOICE.format(_folder_names(kinds))]


def resolve_choice(name: str, *kinds: str, what: str = "model file") -> Path:
    """The path of a combo choice from :func:`file_choices`; the placeholder becomes a clear error."""
    if name.startswith(_EMPTY_CHOICE.format("")[:-1]):
        raise FileNotFoundError(
            f"No {what} selected: put one in ComfyUI/{_folder_names(kinds)} "
            "(see the pack's README for which file goes where), then refresh the page."
        )
    errors = []
    for kind in kinds:
        try:
            return resolve_model_file(kind, name)
        except ModelFileNotFound as err:
            errors.append(str(err))
    raise ModelFileNotFound(" ".join(errors))


def tokenizer_search_dirs() -> list[Path]:
    """Where a tokenizer may live before we look next to the text-encoder file."""
    dirs: list[Path] = []
    if IN_COMFYUI:
        try:
            import comfy  # type: ignore

            # ``comfy`` is a namespace package (no __init__.py): __file__ is None, __path__ is set.
            for base in getattr(comfy, "__path__", []):
                dirs.append(Path(base) / "text_encoders" / "qwen25_tokenizer")
        except Exception:
            pass
    return dirs


# ----------------------------------------------------------------------------- devices

def compute_device() -> torch.device:
    if IN_COMFYUI:
        return _mm.get_torch_device()
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def offload_device() -> torch.device:
    if IN_COMFYUI:
        return _mm.unet_offload_device()
    return torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it, fp16 on older GPUs (the models guard fp16 overflow), fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def free_device_memory(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 62
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def load_models(patchers: list, memory_required: int) -> None:
    """Have ComfyUI load ``patchers`` (genuine ModelPatchers) onto their devices, evicting or
    partially unloading whatever it must, exactly as for its own models."""
    _mm.load_models_gpu(list(patchers), memory_required=int(memory_required))


def qwen_model_config(dtype: torch.dtype):
    """ComfyUI's Qwen-Image model configuration (sampling settings, latent format), for a model
    whose diffusion model we supply ourselves rather than ComfyUI building its own."""
    config = _sm.QwenImage({"image_model": "qwen_image", "disable_unet_model_creation": True})
    config.set_inference_dtype(dtype, None)
    return config


def diffusion_model_wrappers(transformer_options: dict, run):
    """``run`` behind the DIFFUSION_MODEL wrappers other nodes registered (EasyCache, ...), the
    way ComfyUI's own diffusion models call their forward."""
    wrappers = _pe.get_all_wrappers(_pe.WrappersMP.DIFFUSION_MODEL, transformer_options)
    return _pe.WrapperExecutor.new_executor(run, wrappers)


def is_comfy_model(value) -> bool:
    """A core MODEL (a ModelPatcher), as opposed to one of our handles."""
    return IN_COMFYUI and isinstance(value, _mp.ModelPatcher)


def soft_empty_cache() -> None:
    if IN_COMFYUI:
        _mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- progress

def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    if IN_COMFYUI:
        _mm.throw_exception_if_processing_interrupted()


class Progress:
    """Step progress with optional latent previews; a no-op outside ComfyUI."""

    def __init__(self, total: int):
        self.total = total
        self._bar = _cu.ProgressBar(total) if IN_COMFYUI else None

    def update(self, step: int, preview_image=None) -> None:
        if self._bar is None:
            return
        preview = None
        if preview_image is not None:
            preview = ("JPEG", preview_image, _preview_size())
        self._bar.update_absolute(step, self.total, preview)


def _preview_size() -> int:
    try:
        from comfy.cli_args import args  # type: ignore

        return int(args.preview_size)
    except Exception:
        return 512


def previews_enabled() -> bool:
    if not IN_COMFYUI:
        return False
    try:
        from comfy.cli_args import LatentPreviewMethod, args  # type: ignore

        return args.preview_method != LatentPreviewMethod.NoPreviews
    except Exception:
        return True


def notify_ui(event: str, data: dict) -> None:
    """Send ``data`` to the browser tab that queued the running prompt (js/qwenimage.js shows it
    on the node). Without a client id nobody could match the node ids, so nothing is sent; a
    no-op outside ComfyUI."""
    if not IN_COMFYUI:
        return
    try:
        import server  # type: ignore  # ComfyUI's server module

        instance = server.PromptServer.instance
        if instance.client_id is not None:
            instance.send_sync(event, data, instance.client_id)
    except Exception as err:  # a display nicety must never fail a prompt
        log.debug("notify_ui(%s) failed: %s", event, err)


def warn(message: str) -> None:
    """A notice the user should see: ComfyUI prints logging warnings to its console."""
    log.warning(message)


def iter_unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
