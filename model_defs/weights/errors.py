"""The one error type for files a loader cannot use."""
from __future__ import annotations

import os


class WeightFileError(ValueError):
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
