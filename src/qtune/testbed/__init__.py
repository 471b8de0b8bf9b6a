"""The micro testbed: a GSM8K-style task with known ground truth and a tiny local base model.

`build_testbed()` builds (once, then from its cache) a small Llama pretrained on CPU with a locally
trained tokenizer, and writes the default training set (clean, noise and redundant records, each
labelled in its metadata) and a held-out test set beside it. See docs/testbed.md.

`build_testbed(preset="saturated")` builds the second preset (`qtune.testbed.saturated`: a base model
that already solves the problems in a textbook layout, SFT data with labelled defects and a dev
split). It is not the default until its calibration criteria A1-A4 are met (A0 is).
"""

from qtune.testbed.model import (
    DEFAULT_PRESET, PRESETS, ModelRecipe, Preset, TestbedPaths, build_testbed, default_cache_root, load_testbed_model,
)
from qtune.testbed.saturated import GENERATOR_SHA256, SaturatedConfig, make_splits, make_textbook_corpus
from qtune.testbed.tasks import TestbedConfig, final_answer, make_corpus, make_test_set, make_train_set, write_jsonl

#: Training and evaluation settings calibrated for the default preset (docs/testbed.md): full-data
#: SFT with these reaches the calibrated accuracy within the 5-minute CPU budget. `qtune demo` uses
#: them; pass them to `qtune train`, `qtune eval` or `qtune bench` to compare on the same footing.
#: Each preset's own are `PRESETS[name].sft_settings`.
SFT_SETTINGS = PRESETS[DEFAULT_PRESET].sft_settings

__all__ = [
    "DEFAULT_PRESET", "GENERATOR_SHA256", "PRESETS", "Preset", "SFT_SETTINGS", "SaturatedConfig", "make_splits",
    "make_textbook_corpus", "ModelRecipe", "TestbedConfig", "TestbedPaths", "build_testbed", "default_cache_root", "final_answer",
    "load_testbed_model", "make_corpus", "make_test_set", "make_train_set", "write_jsonl",
]
