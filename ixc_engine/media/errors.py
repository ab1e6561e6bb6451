"""The one error type of media preprocessing."""

from __future__ import annotations

import os


class MediaError(ValueError):
    """A media item (image or video) cannot be used: missing, unreadable, unsupported or degenerate.

    The message starts with the file (when there is one) and says what is wrong. ``path`` keeps the file
    name for callers that report per-sample failures.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        # args stays a single string so the exception pickles across worker processes.
        super().__init__(message if self.path is None else f"{self.path}: {message}")
