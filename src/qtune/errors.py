"""Errors that qtune reports to users as one line, without a traceback.

The CLI catches `QTuneError` and prints `error: <message>`; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class QTuneError(Exception):
    """A user-facing error: bad input, a missing file, an unusable model or tokenizer."""


class DataError(QTuneError):
    """A malformed record. The message names the file, the line or row, and the reason."""

    def __init__(self, path: str, location: str, reason: str):
        self.path = str(path)
        self.location = location
        self.reason = reason
        super().__init__(f"{self.path}, {location}: {reason}")
