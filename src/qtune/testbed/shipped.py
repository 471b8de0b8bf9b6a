"""The saturated preset's base model, shipped inside the package.

Pretraining it (`PRESETS["saturated"].recipe`) takes about an hour on one CPU core, far over the
testbed's 10-minute build budget, so its result lies in `WEIGHTS_DIR` (model.safetensors,
config.json, the tokenizer files; about 4 MB) and `build_testbed(preset="saturated")` copies it
instead of pretraining. The weights and the tokenizer are pinned by sha256 (`SHA256`): a copy
that does not match is refused, never loaded. `python -m qtune.testbed.rebuild` pretrains the same
recipe from scratch and reports whether its files match these hashes (docs/testbed.md).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from qtune.errors import QTuneError

WEIGHTS_DIR = Path(__file__).parent / "weights" / "saturated"
#: sha256 of the pinned files of `WEIGHTS_DIR` (the others, config.json and the tokenizer's
#: config, are written by transformers and may differ in a field such as its version).
SHA256 = {
    "model.safetensors": "20893f5c632fd9a25ffa06843f2fe1722579001e1658ebb71d7fdc51e53d1fa3",
    "tokenizer.json": "cf0a2ed08c00bb96dada5664c12ce144f7d795500722507f156db723383c4f6c",
}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(folder: Path = WEIGHTS_DIR) -> None:
    """QTuneError unless every pinned file of `folder` exists and has its pinned sha256."""
    for name, expected in SHA256.items():
        path = folder / name
        if not path.is_file():
            raise QTuneError(f"the saturated testbed's shipped base model lacks {path}; reinstall qtune, or rebuild "
                             "it with python -m qtune.testbed.rebuild")
        if file_sha256(path) != expected:
            raise QTuneError(f"{path} does not match its pinned sha256 {expected[:12]}...: the shipped base model is "
                             "damaged or was replaced; reinstall qtune, or rebuild it with python -m qtune.testbed.rebuild")


def install(model_dir: Path) -> None:
    """Copy the verified shipped model folder to `model_dir` (verified again after the copy)."""
    verify()
    shutil.copytree(WEIGHTS_DIR, model_dir)
    verify(model_dir)
