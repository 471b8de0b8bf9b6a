"""Test-set contamination: which training records overlap an evaluation set.

Two checks, on text normalised one way (`normalize`: ASCII letters lower-cased, ASCII punctuation
deleted, whitespace runs collapsed to one space, as lm-evaluation-harness's decontamination
normalises text before it cuts n-grams):

- exact: a training record whose prompt (its system and user turns) is, once normalised, the
  prompt of an evaluation record: the same question, whatever its answer;
- n-gram: a training record whose text (every turn, answers included) holds one of the 13-grams
  (13 consecutive normalised words) of an evaluation record's prompt. An evaluation record counts
  as contaminated when any of its 13-grams occurs in any training record: the rule of GPT-3's
  Appendix C (Brown et al. 2020, arXiv 2005.14165) with lm-evaluation-harness's single n = 13
  (its docs/decontamination.md). A prompt of fewer than 13 words has no 13-gram: only the exact
  check can find it.

`find_contamination` counts both over two lists of records; `run_contamination` is `qtune
contamination`, the count for two files; `check_contamination` reads two files and stops a
command (`QTuneError`, with the count and the first pairs) when the share of evaluation records that some training record overlaps exceeds a threshold (`ContaminationConfig`
in `qtune.config`: `--contamination-threshold`, `--allow-contamination`). The lookup holds the
evaluation prompts' n-grams (one string each) and scans each training record once: time linear in
the words of both sets, memory in those of the evaluation set.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field

from .config import ContaminationCheckConfig
from .data import Record, load_records
from .errors import QTuneError

#: The n of the n-gram check: lm-evaluation-harness's decontamination uses 13-grams.
NGRAM = 13
#: Pairs named in the error that stops a command.
PAIRS_SHOWN = 3
_NORMALISE = str.maketrans(string.ascii_uppercase, string.ascii_lowercase, string.punctuation)


def normalize(text: str) -> str:
    """`text` with ASCII letters lower-cased, ASCII punctuation deleted and whitespace runs made one
    space (no space at either end)."""
    return " ".join(text.translate(_NORMALISE).split())


def word_ngrams(text: str, n: int = NGRAM) -> list[str]:
    """The n-grams of consecutive words of `normalize(text)`, each as its words joined by a space,
    in order (none when the text has fewer than n words)."""
    words = normalize(text).split()
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def prompt_text(record: Record) -> str:
    """What a record asks: its system and user turns, one per line."""
    return "\n".join(m["content"] for m in record.messages if m["role"] != "assistant")


def record_text(record: Record) -> str:
    """The whole record: every turn, answers included, one per line."""
    return "\n".join(m["content"] for m in record.messages)


@dataclass
class OverlapPair:
    """One training record and the first evaluation record it overlaps: `how` is "exact" or
    "13-gram" (for another n, "<n>-gram"); `shared` is the normalised prompt (exact) or the first
    shared n-gram."""

    train_id: int
    eval_id: int
    how: str
    shared: str


@dataclass
class Contamination:
    """The overlap of a training set with an evaluation set (record ids are `Record.sample_id`:
    positions in their files).

    exact_train: training records whose normalised prompt is an evaluation prompt;
    ngram_train: training records holding an n-gram of an evaluation prompt;
    train_ids / eval_ids: the training records that overlap by either check, and the evaluation
    records they overlap (ascending); pairs: one per overlapping training record, exact first
    when both apply, in training order."""

    n_train: int
    n_eval: int
    n: int = NGRAM
    exact_train: int = 0
    ngram_train: int = 0
    train_ids: list[int] = field(default_factory=list)
    eval_ids: list[int] = field(default_factory=list)
    pairs: list[OverlapPair] = field(default_factory=list)

    @property
    def eval_share(self) -> float:
        """Share of the evaluation records that some training record overlaps."""
        return len(self.eval_ids) / max(self.n_eval, 1)

    def summary(self) -> str:
        """One line: the counts of both checks and the share of evaluation records touched."""
        return (f"{len(self.train_ids)} of {self.n_train} training records overlap the evaluation set "
                f"({self.exact_train} with the same prompt after normalisation, {self.ngram_train} sharing a "
                f"{self.n}-gram with an evaluation prompt); {len(self.eval_ids)} of {self.n_eval} evaluation "
                f"records ({100 * self.eval_share:.2f}%) are overlapped")

    def as_dict(self) -> dict:
        return {"summary": self.summary(), "n_train": self.n_train, "n_eval": self.n_eval, "n": self.n,
                "exact_train": self.exact_train,
                "ngram_train": self.ngram_train, "overlapping_train": len(self.train_ids),
                "overlapped_eval": len(self.eval_ids), "eval_share": self.eval_share,
                "train_ids": self.train_ids, "eval_ids": self.eval_ids,
                "pairs": [vars(p) for p in self.pairs]}


def find_contamination(train: list[Record], evaluation: list[Record], n: int = NGRAM) -> Contamination:
    """The exact and n-gram overlaps of `train` with `evaluation` (see the module doc)."""
    prompts: dict[str, list[int]] = {}  # normalised prompt -> the evaluation records with it
    grams: dict[str, list[int]] = {}  # n-gram of an evaluation prompt -> the evaluation records with it
    for record in evaluation:
        text = prompt_text(record)
        prompts.setdefault(normalize(text), []).append(record.sample_id)
        for gram in dict.fromkeys(word_ngrams(text, n)):
            grams.setdefault(gram, []).append(record.sample_id)
    found = Contamination(len(train), len(evaluation), n)
    hit_eval: set[int] = set()
    for record in train:
        exact = prompts.get(normalize(prompt_text(record)), [])
        shared = [g for g in word_ngrams(record_text(record), n) if g in grams]
        if not exact and not shared:
            continue
        found.train_ids.append(record.sample_id)
        hit_eval.update(exact)
        for gram in shared:
            hit_eval.update(grams[gram])
        if exact:
            found.exact_train += 1
            found.pairs.append(OverlapPair(record.sample_id, exact[0], "exact", normalize(prompt_text(record))))
        if shared:
            found.ngram_train += 1
            if not exact:
                found.pairs.append(OverlapPair(record.sample_id, grams[shared[0]][0], f"{n}-gram", shared[0]))
    found.eval_ids = sorted(hit_eval)
    return found


def check_contamination(train_path: str, eval_path: str, *, threshold: float, allow: bool, command: str,
                        format: str = "auto") -> Contamination:
    """Read both files (the training one with `format`, the evaluation one detected), count their
    overlap and return it; QTuneError naming `command`, the count and the first pairs when more
    than `threshold` of the evaluation records are overlapped and `allow` is off."""
    train, _ = load_records(train_path, format)
    evaluation, _ = load_records(eval_path, "auto")
    found = find_contamination(train, evaluation)
    if found.eval_share > threshold and not allow:
        pairs = "; ".join(f"train record {p.train_id} ~ eval record {p.eval_id} ({p.how}: {p.shared[:80]!r})"
                          for p in found.pairs[:PAIRS_SHOWN])
        raise QTuneError(f"{command}: {train_path} overlaps {eval_path}: {found.summary()}, above "
                         f"--contamination-threshold {threshold:g}; first pairs: {pairs}. Remove them from the "
                         "training data, or pass --allow-contamination to go on")
    return found


def run_contamination(cfg: ContaminationCheckConfig) -> Contamination:
    """`qtune contamination`: the overlap of --data with --eval-data, printed (the counts as JSON,
    then the first --pairs pairs, one a line)."""
    train, _ = load_records(cfg.data, cfg.format)
    evaluation, _ = load_records(cfg.eval_data, "auto")
    found = find_contamination(train, evaluation)
    counts = found.as_dict()
    print(json.dumps({k: counts[k] for k in ("n_train", "n_eval", "n", "exact_train", "ngram_train",
                                             "overlapping_train", "overlapped_eval", "eval_share")}))
    for pair in found.pairs[:cfg.pairs]:
        print(f"train record {pair.train_id} ~ eval record {pair.eval_id} ({pair.how}): {pair.shared}")
    return found
