"""The micro testbed: a GSM8K-style task with known ground truth and a tiny local base model.

`build_testbed()` builds (once, then from its cache) a small Llama pretrained on CPU with a locally
trained tokenizer, and writes the default training set (clean, noise and redundant records, each
labelled in its metadata) and a held-out test set beside it. See docs/testbed.md.
"""

from qtune.testbed.model import ModelRecipe, TestbedPaths, build_testbed, default_cache_root, load_testbed_model
from qtune.testbed.tasks import TestbedConfig, final_answer, make_corpus, make_test_set, make_train_set, write_jsonl

__all__ = [
    "ModelRecipe", "TestbedConfig", "TestbedPaths", "build_testbed", "default_cache_root", "final_answer",
    "load_testbed_model", "make_corpus", "make_test_set", "make_train_set", "write_jsonl",
]
