"""The micro testbed: a GSM8K-style task with known ground truth and a tiny local base model.

`build_testbed()` builds (once, then from its cache) the default preset, "saturated"
(`qtune.testbed.saturated`): a 0.96 M Llama shipped with the package that already solves the
problems in a textbook layout, SFT data in the GSM8K layout with labelled defects (metadata
`category`, `kind`, `source`, `defective`), a dev split and a held-out test split.
`build_testbed(preset="data-starved")` builds the first preset (`qtune.testbed.tasks`: a model
pretrained here, far from knowing the task, with clean, noise and redundant records). See
docs/testbed.md for both and for the saturated preset's calibration criteria.
"""

from qtune.testbed.model import (
    DEFAULT_PRESET, PRESETS, ModelRecipe, Preset, TestbedPaths, build_testbed, default_cache_root, load_testbed_model,
)
from qtune.testbed.saturated import GENERATOR_SHA256, SaturatedConfig, make_splits, make_textbook_corpus
from qtune.testbed.tasks import TestbedConfig, final_answer, make_corpus, make_test_set, make_train_set, write_jsonl

#: Training and evaluation settings calibrated for the default preset (docs/testbed.md), chosen on
#: its dev split with the ground-truth controls only. `qtune demo` uses them; pass them to `qtune
#: train`, `qtune eval` or `qtune bench` to compare on the same footing. Each preset's own are
#: `PRESETS[name].sft_settings`.
SFT_SETTINGS = PRESETS[DEFAULT_PRESET].sft_settings

__all__ = [
    "DEFAULT_PRESET", "GENERATOR_SHA256", "PRESETS", "Preset", "SFT_SETTINGS", "SaturatedConfig", "make_splits",
    "make_textbook_corpus", "ModelRecipe", "TestbedConfig", "TestbedPaths", "build_testbed", "default_cache_root", "final_answer",
    "load_testbed_model", "make_corpus", "make_test_set", "make_train_set", "write_jsonl",
]
