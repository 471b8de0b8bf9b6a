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


class OptionError(QTuneError):
    """An option value that is not allowed: "<option> must be <allowed>; got <value>".

    `name` is the config field; `label` is how the message names it, as the user wrote it
    (`--batch-size`, `batch_size in run.yaml`), the field name when not given."""

    def __init__(self, name: str, value, allowed: str, label: str | None = None):
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"{label or name} must be {allowed}; got {value!r}")

    def named(self, label: str) -> OptionError:
        """The same error, naming the option as `label`."""
        return OptionError(self.name, self.value, self.allowed, label)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
