"""The one error type for files a loader cannot use, and the short name our errors show.

ComfyUI's error dialog and /history show an exception's type as ``__module__ + "." +
__qualname__`` (execution.full_type_name). Inside ComfyUI this pack is imported under its folder
path, so a plain class would read ``/home/.../custom_nodes/ComfyUI-QwenImage.core.errors.
WeightFileError`` in front of the message. :class:`PackError` subclasses report the module
``qwenimage`` instead, so the dialog reads ``qwenimage.WeightFileError``.
"""
from __future__ import annotations

import os

PUBLIC_MODULE = "qwenimage"

# Short qualname -> class, to rebuild pickled errors: pickle finds a class by its __module__,
# and no module named "qwenimage" exists to import it from.
_PACK_ERRORS: dict[str, type] = {}
_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement


def _rebuild(qualname: str, args: tuple, state: dict):
    cls = _PACK_ERRORS[qualname]
    # The builtin __new__ that cls(...) itself would run (its layout base: OSError for a class that
    # is also a FileNotFoundError); it sets .args without calling our __init__, whose signature differs.
    base = cls
    while base.__flags__ & _HEAP_TYPE:
        base = base.__base__
    err = base.__new__(cls, *args)
    err.args = args
    err.__dict__.update(state)
    return err


class PackError:
    """Mixin for every exception the pack's nodes raise with a class of their own: a short
    ComfyUI type name (``qwenimage.<Name>``), and pickling that still works (by our own
    ``__reduce__``, since the class cannot be found under that module name)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = PUBLIC_MODULE
        _PACK_ERRORS[cls.__qualname__] = cls

    def __reduce__(self):
        return _rebuild, (type(self).__qualname__, self.args, dict(getattr(self, "__dict__", {})))


class WeightFileError(PackError, ValueError):
    """A model file is missing, damaged, of another model, or in an unsupported format.

    The message always names the file and says what was expected, so it can be shown to a
    ComfyUI user as it is.
    """

    def __init__(self, path, problem: str, expected: str | None = None):
        name = os.fspath(path) if path is not None else "<memory>"
        msg = f"{name}: {problem}"
        if expected:
            msg += f" Expected {expected}."
        super().__init__(msg)
        self.path = name
        self.problem = problem
        self.expected = expected
