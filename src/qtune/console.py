"""Progress and notices of the commands, on stderr, so that stdout carries only their results."""

from __future__ import annotations

import os
import sys


def log(message: str) -> None:
    """Print a notice on stderr; under several processes (torchrun and accelerate set RANK) only the
    main process prints, since every process reaches the same notices."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
