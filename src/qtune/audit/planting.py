"""Planting labelled defects into a copy of a sample of the data (`qtune audit`).

`draw_sample` takes `n` records of the data, uniformly without replacement, in file order.
`plant` gives a share of them one defect each, split in equal parts (largest remainders, in the
order of `KINDS`) over the six kinds below, and labels every record in `metadata["audit"]`:
its `kind` (a planted kind, "untouched", or "unplanted_defective" for a record that could not get
a defect because it already has one), `record` (its position in the data file), `source` (the
sample position of the record a swap, a sentence or a duplicate came from) and `spans` (the
[start, end) character spans of the last answer that were planted, so that token rules can be
audited on them). Only the last assistant turn of a conversation is ever changed.

- swapped: the answer of another record, whole (one span over it);
- corrupted: an answer whose last line is GSM8K's `#### N` and which states an intermediate
  result (a whole number after the last "=" of an earlier line) gets its final number changed
  and one intermediate result changed: every occurrence of that number after the line's last "="
  (GSM8K's calculator annotation `<<48/2=24>>24` changes as a whole); each new number is the old
  one plus or minus 1 to 9. Any other answer has one sentence replaced by a sentence of another
  record's answer;
- truncated: the answer cut at a word boundary between 30% and 70% of its characters: a strict
  prefix, its end lost (no span: the defect is what is missing);
- off_task: the answer replaced by one of `OFF_TASK_REPLIES`, a refusal or text about something
  else: what a response to another kind of request looks like whatever the data. (An answer to
  another question of the same data is what `swapped` plants.)
- duplicate_exact: the whole record (prompt and answer) replaced by a copy of another record;
- duplicate_near: the same copy with two small edits, one in the last user turn, one in the
  answer (a doubled space, a deleted punctuation mark, or a letter's case changed): different
  text, equal to its source once normalised (`qtune.contamination.normalize`).

Sources (the other record of a swap, a sentence or a duplicate) are drawn from the records left
untouched, so that no planted record is built from another planted one. Everything is drawn from
one `random.Random(seed)` in a fixed order: the same seed plants the same defects.
"""

from __future__ import annotations

import copy
import random
import re
from decimal import Decimal

from ..data import Record
from ..errors import QTuneError

KINDS = ("swapped", "corrupted", "truncated", "off_task", "duplicate_exact", "duplicate_near")
UNTOUCHED = "untouched"
#: The records that `plant_into="clean"` leaves alone because their metadata says they are defective.
UNPLANTED_DEFECTIVE = "unplanted_defective"
#: Off-task answers: refusals and replies about something else, none of them about any data's task.
OFF_TASK_REPLIES = (
    "I'm sorry, but I can't help with that request.",
    "As an AI language model, I don't have personal opinions or feelings about this topic.",
    "Here is a short poem about the sea: the waves roll in, the waves roll out, and the gulls call over the "
    "quiet harbour.",
    "Thank you for your message! Let me know if there is anything else I can do for you today.",
    "To make a simple tomato sauce, soften a chopped onion in olive oil, add crushed tomatoes and a pinch of salt, "
    "and simmer for twenty minutes.",
    "The capital of Australia is Canberra, not Sydney, as many people believe.",
)
#: Where a truncated answer is cut, as shares of its characters (then back to a word boundary).
CUT_RANGE = (0.3, 0.7)

_FINAL = re.compile(r"####\s*(-?[\d,]*\d(?:\.\d+)?)\s*$")
_WHOLE_NUMBER = re.compile(r"(?<![\d.,])\d+(?![\d,]|\.\d)")
_SENTENCE = re.compile(r"[^.!?\n]*[^.!?\n\s][^.!?\n]*[.!?]*")
_PUNCTUATION = ",.;:!?"


def draw_sample(records: list[Record], n: int, seed: int) -> list[Record]:
    """`n` of `records` drawn uniformly without replacement (all of them when fewer), in their order."""
    if n >= len(records):
        return list(records)
    chosen = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in chosen]


def kind_counts(total: int) -> dict[str, int]:
    """`total` planted records split over `KINDS` in equal parts, the remainder to the first kinds."""
    base, extra = divmod(total, len(KINDS))
    return {kind: base + (i < extra) for i, kind in enumerate(KINDS)}


def plant(records: list[Record], share: float, seed: int, *, into: str = "all") -> list[Record]:
    """A copy of `records` (a sample), renumbered 0..n-1, with round(share x n) of them given a
    planted defect and every one labelled in `metadata["audit"]` (see the module doc). `into`:
    "all" records may get a defect, or only "clean" ones (metadata.defective false)."""
    rng = random.Random(seed)
    eligible = _eligible(records, into)
    candidates = [i for i, ok in enumerate(eligible) if ok]
    total = round(share * len(records))
    if total < 1 or total >= len(candidates):
        raise QTuneError(f"qtune audit: planting {share:g} of {len(records)} records means {total} defects, which "
                         f"needs at least one and more records that may get one than that ({len(candidates)} "
                         "may); change --plant or --sample")
    chosen = rng.sample(candidates, total)
    kinds: dict[int, str] = {}
    start = 0
    for kind, count in kind_counts(total).items():
        kinds.update((i, kind) for i in chosen[start:start + count])
        start += count
    sources = [i for i in candidates if i not in kinds]
    planted = []
    for i, record in enumerate(records):
        kind = kinds.get(i, UNTOUCHED if eligible[i] else UNPLANTED_DEFECTIVE)
        messages, source, spans = copy.deepcopy(record.messages), None, []
        if kind in KINDS:
            messages, source, spans = _PLANTERS[kind](records, i, sources, rng)
        label = {"kind": kind, "record": record.sample_id, "source": source, "spans": spans}
        planted.append(Record(i, messages, {**record.metadata, "audit": label}))
    return planted


def _eligible(records: list[Record], into: str) -> list[bool]:
    if into == "all":
        return [True] * len(records)
    if into != "clean":
        raise QTuneError(f"plant_into must be 'all' or 'clean', not {into!r}")
    unlabelled = [r.sample_id for r in records if not isinstance(r.metadata.get("defective"), bool)]
    if unlabelled:
        raise QTuneError(f"qtune audit --plant-into clean reads metadata.defective (true or false) of every record, "
                         f"which {len(unlabelled)} sampled records lack (the first is record {unlabelled[0]}); use "
                         "--plant-into all on unlabelled data")
    return [not r.metadata["defective"] for r in records]


def answer_of(messages: list[dict]) -> str:
    """The last assistant turn's text: the answer that planting changes."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "assistant")


def _with_answer(messages: list[dict], answer: str) -> list[dict]:
    out = copy.deepcopy(messages)
    last = max(i for i, m in enumerate(out) if m["role"] == "assistant")
    out[last]["content"] = answer
    return out


def _other(records, i: int, sources: list[int], rng: random.Random) -> int:
    """A source record whose answer differs from record i's (any source if none does)."""
    differing = [j for j in sources if answer_of(records[j].messages) != answer_of(records[i].messages)]
    return rng.choice(differing or sources)


def _swapped(records, i, sources, rng):
    j = _other(records, i, sources, rng)
    answer = answer_of(records[j].messages)
    return _with_answer(records[i].messages, answer), j, [[0, len(answer)]]


def _shifted(number: str, rng: random.Random) -> str:
    """`number` (digits, maybe a sign, thousands commas or decimals) plus or minus 1 to 9, never
    negative unless it was."""
    value = Decimal(number.replace(",", ""))
    delta = rng.randint(1, 9) * rng.choice((-1, 1))
    if value >= 0 and value + delta < 0:
        delta = -delta
    return str(value + delta)


def gsm8k_corruption(answer: str, rng: random.Random) -> tuple[str, list[list[int]]] | None:
    """`answer` with its final `#### N` and one intermediate result changed, and the changed
    spans; None when it has no final `#### N` line or no intermediate result (see the module doc)."""
    lines = answer.split("\n")
    final = _FINAL.search(lines[-1])
    starts = [sum(len(line) + 1 for line in lines[:k]) for k in range(len(lines))]
    results = []  # (line, position after its last "=", the result's digits)
    for k, line in enumerate(lines[:-1]):
        if "=" in line:
            after = line.rindex("=") + 1
            number = _WHOLE_NUMBER.search(line, after)
            if number is not None:
                results.append((k, after, number.group()))
    if final is None or not results:
        return None
    k, after, value = rng.choice(results)
    new_value = _shifted(value, rng)
    line, new_line, spans, done = lines[k], "", [], 0
    for match in _WHOLE_NUMBER.finditer(line, after):
        if match.group() == value:
            new_line += line[done:match.start()]
            spans.append([starts[k] + len(new_line), starts[k] + len(new_line) + len(new_value)])
            new_line += new_value
            done = match.end()
    lines[k] = new_line + line[done:]
    new_final = _shifted(final.group(1), rng)
    last = lines[-1]
    lines[-1] = last[:final.start(1)] + new_final + last[final.end(1):]
    offset = sum(len(line) + 1 for line in lines[:-1])
    spans.append([offset + final.start(1), offset + final.start(1) + len(new_final)])
    return "\n".join(lines), spans


def _sentences(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _SENTENCE.finditer(text)]


def _corrupted(records, i, sources, rng):
    answer = answer_of(records[i].messages)
    gsm8k = gsm8k_corruption(answer, rng)
    if gsm8k is not None:
        new, spans = gsm8k
        return _with_answer(records[i].messages, new), None, spans
    j = _other(records, i, sources, rng)
    donor = answer_of(records[j].messages)
    own = _sentences(answer) or [(0, len(answer))]
    start, end = rng.choice(own)
    choices = [donor[a:b] for a, b in _sentences(donor) if donor[a:b] != answer[start:end]] or [donor]
    sentence = rng.choice(choices)
    new = answer[:start] + sentence + answer[end:]
    return _with_answer(records[i].messages, new), j, [[start, start + len(sentence)]]


def truncate(answer: str, rng: random.Random) -> str:
    """A strict prefix of `answer` cut at a word boundary at a drawn share in `CUT_RANGE` of its
    characters (at the drawn character when no boundary comes before it), without trailing space."""
    cut = max(1, int(rng.uniform(*CUT_RANGE) * len(answer)))
    boundary = max(answer.rfind(" ", 0, cut), answer.rfind("\n", 0, cut))
    kept = answer[:boundary] if boundary > 0 else answer[:cut]
    return kept.rstrip() or answer[:1]


def _truncated(records, i, sources, rng):
    return _with_answer(records[i].messages, truncate(answer_of(records[i].messages), rng)), None, []


def _off_task(records, i, sources, rng):
    reply = rng.choice(OFF_TASK_REPLIES)
    return _with_answer(records[i].messages, reply), None, [[0, len(reply)]]


def _duplicate_exact(records, i, sources, rng):
    j = rng.choice(sources)
    return copy.deepcopy(records[j].messages), j, []


def small_edit(text: str, rng: random.Random) -> str:
    """`text` with one edit that normalisation undoes: a doubled space, a deleted punctuation mark
    or a letter's case changed (one of those the text allows, drawn); a space appended when it
    allows none."""
    places = {"space": [k for k, c in enumerate(text) if c == " "],
              "mark": [k for k, c in enumerate(text) if c in _PUNCTUATION],
              "case": [k for k, c in enumerate(text) if c.isascii() and c.isalpha()]}
    edits = [edit for edit, where in places.items() if where]
    if not edits:
        return text + " "
    edit = rng.choice(edits)
    k = rng.choice(places[edit])
    if edit == "space":
        return text[:k] + " " + text[k:]
    if edit == "mark":
        return text[:k] + text[k + 1:]
    return text[:k] + text[k].swapcase() + text[k + 1:]


def _duplicate_near(records, i, sources, rng):
    j = rng.choice(sources)
    messages = copy.deepcopy(records[j].messages)
    users = [k for k, m in enumerate(messages) if m["role"] == "user"]
    if users:
        messages[users[-1]]["content"] = small_edit(messages[users[-1]]["content"], rng)
    return _with_answer(messages, small_edit(answer_of(messages), rng)), j, []


_PLANTERS = {"swapped": _swapped, "corrupted": _corrupted, "truncated": _truncated, "off_task": _off_task,
             "duplicate_exact": _duplicate_exact, "duplicate_near": _duplicate_near}
