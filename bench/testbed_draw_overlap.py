"""Does another draw of the saturated testbed's data hold problems the shipped base model was
pretrained on? (docs/testbed.md, "Other draws of the data")

The shipped model's pretraining corpus left out every question of the preset's own draw (data seed
0); another draw's questions were never excluded. This script regenerates the corpus exactly as
pretraining consumed it (the same chunks, tokenized and packed with the shipped tokenizer until the
recipe's blocks were full) and counts the questions of each draw's splits found among its problems.

    python bench/testbed_draw_overlap.py [--data-seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from transformers import AutoTokenizer

from qtune.testbed import build_testbed, saturated
from qtune.testbed.model import PRESETS, _corpus_blocks

PROBLEM = "Problem: "


def pretraining_questions() -> tuple[set[str], int]:
    """The questions of the problems in the shipped model's pretraining corpus, and the chunks drawn."""
    config, recipe = PRESETS["saturated"].config, PRESETS["saturated"].recipe
    pretraining = saturated.pretraining_config(config)
    excluded = frozenset(r["question"] for split in saturated.make_splits(pretraining) for r in split)
    tokenizer = AutoTokenizer.from_pretrained(build_testbed(progress=False).model_dir)
    questions, chunks = set(), []

    def corpus(seed: int) -> list[str]:
        chunks.append(seed)
        documents = saturated.make_textbook_corpus(500, seed, config, drill_share=recipe.drill_share,
                                                   exclude=excluded)
        questions.update(d.split("\n")[0].removeprefix(PROBLEM) for d in documents if d.startswith(PROBLEM))
        return documents

    _corpus_blocks(recipe, tokenizer, corpus, whole_documents=True)
    return questions, len(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-seeds", default="0,1,2", help="comma-separated draws to check")
    args = parser.parse_args()
    started = time.perf_counter()
    seen, chunks = pretraining_questions()
    print(f"pretraining corpus: {chunks} chunks of 500 documents, {len(seen):,} distinct problems "
          f"({time.perf_counter() - started:.0f} s)")
    for data_seed in (int(s) for s in args.data_seeds.split(",")):
        splits = saturated.make_splits(dataclasses.replace(PRESETS["saturated"].config, seed=data_seed))
        counts = ", ".join(f"{name} {sum(r['question'] in seen for r in split)}/{len(split)}"
                           for name, split in zip(("train", "dev", "test"), splits))
        print(f"data seed {data_seed}: questions found in the pretraining corpus: {counts}")


if __name__ == "__main__":
    main()
