"""Progress and notices of the commands, on stderr, so that stdout carries only their results."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
