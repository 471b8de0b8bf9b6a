"""GSM8K-style arithmetic word problems with known ground truth, for the micro testbed.

Every problem is a short story about one person and a quantity (a count of objects, or money) that
changes step by step. The answer is written exactly like GSM8K: one reasoning step per line, each
with a `<<expression=value>>` calculator annotation, and a last line `#### N`.

    question: "Mia has 12 apples. Then she buys 7 more apples. How many apples does Mia have now?"
    answer:   "After buying more, she has 12 + 7 = <<12+7=19>>19 apples.\\n#### 19"

`make_train_set` mixes clean problems of several difficulties with two kinds of deliberately bad
data whose category is recorded in each record's metadata, so that reports can check what a
data-selection method kept: *noise* (a wrong final answer, a corrupted intermediate step, or the
answer of another question) and *redundant* near-duplicates of easy problems. `make_test_set`
draws held-out clean problems. `make_corpus` writes the pretraining text of the tiny base model: the
same language and arithmetic, but never the question/answer format.

Everything is seeded and deterministic; numbers are non-negative integers throughout.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CATEGORIES = ("clean", "noise", "redundant")
NOISE_KINDS = ("wrong_final", "corrupted_step", "swapped_answer")
REDUNDANT_KINDS = ("repeat", "renamed", "renumbered")

_MIN_VALUE = 2  # quantities stay >= 2, so "2 apples" is never "1 apples" or "0 apples"
_MAX_FACTOR = 5  # multipliers, divisors and counts of things bought: small times tables only


@dataclass(frozen=True)
class TestbedConfig:
    """What `make_train_set` and `make_test_set` generate.

    Fields:
        train_size: number of training records.
        test_size: number of held-out test records (all clean).
        noise_share: fraction of training records that are noise (answer wrong).
        redundant_share: fraction of training records that are near-duplicates of easy clean ones.
            The rest (1 - noise_share - redundant_share) is clean.
        noise_kinds: kinds of noise, drawn in equal shares: "wrong_final" (steps right, `#### N`
            wrong), "corrupted_step" (one intermediate annotation wrong, carried to the end),
            "swapped_answer" (the answer of another question).
        redundant_kinds: kinds of redundancy, in equal shares: "repeat" (identical copy),
            "renamed" (other person, friend and objects), "renumbered" (numbers nudged, answer
            recomputed).
        levels: difficulty levels as (number of reasoning steps, largest number the question
            adds or takes away, largest value any step may reach); difficulty d in the metadata is
            levels[d - 1]. Multipliers and divisors are at most 5 at every level.
        level_weights: share of each level among clean training and test problems.
        seed: one seed for everything; the test set uses a stream of its own.
    """

    __test__ = False  # a dataclass named Test*, not a pytest class

    train_size: int = 3000
    test_size: int = 500
    noise_share: float = 0.2
    redundant_share: float = 0.2
    noise_kinds: tuple[str, ...] = NOISE_KINDS
    redundant_kinds: tuple[str, ...] = REDUNDANT_KINDS
    levels: tuple[tuple[int, int, int], ...] = ((2, 10, 30), (3, 12, 45), (4, 15, 60))
    level_weights: tuple[float, ...] = (0.3, 0.4, 0.3)
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.noise_share + self.redundant_share <= 1 or min(self.noise_share, self.redundant_share) < 0:
            raise ValueError("noise_share and redundant_share must be >= 0 and sum to at most 1")
        if len(self.levels) != len(self.level_weights) or not self.levels:
            raise ValueError("levels and level_weights must have the same, non-zero length")
        if any(steps < 1 or top < 2 * _MIN_VALUE + 1 or most < 2 * top for steps, top, most in self.levels):
            raise ValueError(f"each level needs 1 step or more, numbers above {2 * _MIN_VALUE} and values up to twice that")
        if not self.noise_kinds or set(self.noise_kinds) - set(NOISE_KINDS):
            raise ValueError(f"noise_kinds must be taken from {NOISE_KINDS}")
        if not self.redundant_kinds or set(self.redundant_kinds) - set(REDUNDANT_KINDS):
            raise ValueError(f"redundant_kinds must be taken from {REDUNDANT_KINDS}")


# ----------------------------------------------------------------------------------------------
# Vocabulary of the stories

_PEOPLE = [
    ("Mia", "she"), ("Liam", "he"), ("Emma", "she"), ("Noah", "he"), ("Olivia", "she"),
    ("Lucas", "he"), ("Ava", "she"), ("Ethan", "he"), ("Sofia", "she"), ("Mason", "he"),
    ("Chloe", "she"), ("Leo", "he"), ("Grace", "she"), ("Owen", "he"), ("Zoe", "she"),
    ("Jack", "he"), ("Lily", "she"), ("Ben", "he"), ("Nora", "she"), ("Sam", "he"),
    ("Ella", "she"), ("Omar", "he"), ("Hana", "she"), ("Ravi", "he"), ("Maya", "she"),
    ("Tom", "he"), ("Aisha", "she"), ("Diego", "he"), ("Rosa", "she"), ("Ivan", "he"),
]
_OBJECTS = [
    "apples", "marbles", "stickers", "cookies", "books", "pencils", "shells", "cards", "eggs",
    "flowers", "stamps", "toys", "balloons", "candies", "crayons", "beads", "rocks", "cupcakes",
    "oranges", "buttons",
]
_ITEMS = [  # (plural, singular) of things bought with money
    ("pens", "pen"), ("notebooks", "notebook"), ("tickets", "ticket"), ("sandwiches", "sandwich"),
    ("plants", "plant"), ("mugs", "mug"), ("posters", "poster"), ("shirts", "shirt"),
    ("toy cars", "toy car"), ("puzzles", "puzzle"),
]
_PRONOUNS = {"she": ("she", "her", "her"), "he": ("he", "him", "his")}


def _entities(rng: random.Random) -> dict[str, str]:
    """A cast for one story: the person, a friend, an object and two shop items."""
    (name, gender), (friend, _) = rng.sample(_PEOPLE, 2)
    subj, obj, poss = _PRONOUNS[gender]
    (items, _), (_, item) = rng.sample(_ITEMS, 2)
    return {
        "Name": name, "Friend": friend, "he": subj, "He": subj.capitalize(), "him": obj,
        "his": poss, "His": poss.capitalize(), "obj": rng.choice(_OBJECTS), "items": items,
        "item": item,
    }


# Templates. Question sentences use {n} (the number the clause brings); answer lines use {calc},
# which renders as "a + b = <<a+b=c>>c" (money: "a + b = $<<a+b=c>>c").
_COUNT_START = [
    "{Name} has {a} {obj}.",
    "{Name} collected {a} {obj}.",
    "{Name} owns {a} {obj}.",
    "There are {a} {obj} in {Name}'s bag.",
]
_COUNT_GROUP = [  # start with a multiplication: k groups of n
    ("{Name} buys {k} boxes of {obj}. Each box has {n} {obj}.", "{Name} buys {calc} {obj}."),
    ("{Name} has {k} bags with {n} {obj} in each bag.", "{Name} has {calc} {obj}."),
    ("{Name} fills {k} jars with {n} {obj} each.", "The jars hold {calc} {obj}."),
]
_COUNT_OPS = {
    "add": [
        ("Then {he} buys {n} more {obj}.", "After buying more, {he} has {calc} {obj}."),
        ("{Friend} gives {him} {n} {obj}.", "{Name} now has {calc} {obj}."),
        ("The next day {he} finds {n} more {obj}.", "{He} then has {calc} {obj}."),
        ("{He} wins {n} {obj} in a game.", "With the prize {he} has {calc} {obj}."),
    ],
    "sub": [
        ("{He} gives {n} {obj} to {Friend}.", "After giving some away, {he} has {calc} {obj}."),
        ("{He} loses {n} of the {obj}.", "{Name} has {calc} {obj} left."),
        ("{He} sells {n} {obj} at the market.", "After the sale {he} has {calc} {obj}."),
        ("{Friend} borrows {n} {obj} from {him}.", "{Name} keeps {calc} {obj}."),
    ],
    "mul": [
        ("Then the number of {obj} {he} has becomes {n} times as large.", "{He} now has {calc} {obj}."),
        ("By the end of the month {he} has {n} times as many {obj} as before.", "At the end of the month {he} has {calc} {obj}."),
        ("{His} collection of {obj} grows to {n} times its size.", "The collection grows to {calc} {obj}."),
    ],
    "div": [
        ("{He} splits the {obj} into {n} equal groups and keeps one group.", "One group has {calc} {obj}."),
        ("{He} puts the {obj} into {n} equal piles and takes one pile home.", "Each pile has {calc} {obj}."),
        ("{He} shares the {obj} equally among {n} children, one of them {himself}.", "Each child gets {calc} {obj}."),
    ],
}
_COUNT_TOGETHER = [  # the friend's amount from the person's, then the sum
    ("sub", "{Friend} has {n} fewer {obj} than {Name}.", "{Friend} has {calc} {obj}.",
     "How many {obj} do they have together?", "Together they have {calc} {obj}."),
    ("add", "{Friend} has {n} more {obj} than {Name}.", "{Friend} has {calc} {obj}.",
     "How many {obj} do the two of them have altogether?", "Altogether they have {calc} {obj}."),
    ("mul", "{Friend} has {n} times as many {obj} as {Name}.", "{Friend} has {calc} {obj}.",
     "How many {obj} do {Name} and {Friend} have in total?", "In total they have {calc} {obj}."),
]
_COUNT_ASK = [
    "How many {obj} does {Name} have now?",
    "How many {obj} does {Name} have in the end?",
    "How many {obj} does {Name} have at the end?",
]
_MONEY_START = [
    "{Name} has ${a}.",
    "{Name} saved ${a}.",
    "{Name} goes to the store with ${a}.",
]
_MONEY_OPS = {
    "gift": [
        ("{Friend} gives {him} ${n}.", "{He} then has {calc}."),
        ("{He} finds ${n} in {his} coat.", "With the money found, {he} has {calc}."),
        ("{His} grandmother sends {him} ${n}.", "{Name} now has {calc}."),
    ],
    "spend": [
        ("{He} spends ${n} on a {item}.", "After buying the {item}, {he} has {calc}."),
        ("{He} pays ${n} for lunch.", "After lunch {he} has {calc}."),
        ("{He} lends ${n} to {Friend}.", "{Name} keeps {calc}."),
    ],
    "half": [
        ("{He} puts half of {his} money in the bank.", "{He} keeps {calc}."),
        ("{He} gives half of {his} money to {Friend}.", "{Name} has {calc} left."),
    ],
}
_MONEY_TWO_STEP = {  # a product, then added to or taken from the money
    "earn": [
        ("{He} earns ${p} per hour and works {k} hours.", "{He} earns {calc}.", "{He} now has {calc}."),
        ("{He} sells {k} drawings for ${p} each.", "The drawings bring {calc}.", "Then {he} has {calc}."),
    ],
    "buy": [
        ("{He} buys {k} {items} for ${p} each.", "The {items} cost {calc}.", "{He} has {calc} left."),
        ("{He} pays for {k} {items} that cost ${p} each.", "{He} pays {calc}.", "So {he} has {calc} left."),
    ],
}
_MONEY_ASK = [
    "How much money does {Name} have now?",
    "How many dollars does {Name} have left?",
    "How much money does {Name} have in the end?",
]


# ----------------------------------------------------------------------------------------------
# A problem is a plan (which clauses, which templates, which numbers) rendered with a cast.
# Keeping the plan separate lets noise and redundancy re-render the same problem with one thing
# changed: a corrupted step, other names, nudged numbers.

@dataclass(frozen=True)
class _Clause:
    kind: str  # "count_start", "group", "add", ..., "together", "earn", "buy", "ask"
    template: int  # index into the template list of that kind
    numbers: tuple[int, ...]


@dataclass(frozen=True)
class _Plan:
    family: str  # "count" or "money"
    clauses: tuple[_Clause, ...]
    max_value: int  # no step may reach more


class _Invalid(Exception):
    """Raised while rendering when the numbers break a rule (negative, inexact division, too big)."""


@dataclass
class Problem:
    """A rendered problem: the question, its reasoning lines (without `#### N`), the final value."""

    question: str
    lines: list[str]
    final: int
    narrative: list[str] = field(default_factory=list)  # the story as statements, for pretraining
    equations: list[tuple[int, str, int, int]] = field(default_factory=list)  # (a, op, b, result) per step

    @property
    def answer(self) -> str:
        return "\n".join(self.lines + [f"#### {self.final}"])


class _Renderer:
    """Executes a plan: fills the templates, evaluates every step, optionally corrupts one."""

    def __init__(self, cast: dict[str, str], money: bool, max_value: int, corrupt: tuple[int, int] | None):
        self.max_value = max_value
        self.cast = dict(cast, himself="herself" if cast["he"] == "she" else "himself")
        self.unit = "$" if money else ""
        self.corrupt = corrupt  # (step index, delta added to that step's printed result)
        self.question: list[str] = []
        self.lines: list[str] = []
        self.narrative: list[str] = []
        self.equations: list[tuple[int, str, int, int]] = []

    def say(self, template: str, **numbers: int) -> str:
        return template.format(**self.cast, **numbers)

    def step(self, template: str, a: int, op: str, b: int) -> int:
        """One reasoning line `... a op b = <<a op b=r>>r ...`; returns the (possibly corrupted) r."""
        if op == "+":
            r = a + b
        elif op == "-":
            r = a - b
        elif op == "*":
            r = a * b
        else:
            if b == 0 or a % b:
                raise _Invalid
            r = a // b
        if self.corrupt and self.corrupt[0] == len(self.lines):
            r += self.corrupt[1]
        if not _MIN_VALUE <= r <= self.max_value:
            raise _Invalid
        calc = f"{a} {op} {b} = {self.unit}<<{a}{op}{b}={r}>>{r}"
        line = self.say(template, calc=calc)
        self.equations.append((a, op, b, r))
        self.lines.append(line)
        self.narrative.append(line)
        return r


def _render(plan: _Plan, cast: dict[str, str], corrupt: tuple[int, int] | None = None) -> Problem:
    """Render a plan with a cast. Raises `_Invalid` if the numbers break a rule."""
    money = plan.family == "money"
    r = _Renderer(cast, money, plan.max_value, corrupt)
    value = 0
    for clause in plan.clauses:
        t, nums = clause.template, clause.numbers
        if clause.kind in ("count_start", "money_start"):
            (value,) = nums
            sentence = r.say((_MONEY_START if money else _COUNT_START)[t], a=value)
            r.question.append(sentence)
            r.narrative.append(sentence)
        elif clause.kind == "group":
            k, n = nums
            q, a = _COUNT_GROUP[t]
            sentence = r.say(q, k=k, n=n)
            r.question.append(sentence)
            r.narrative.append(sentence)
            value = r.step(a, k, "*", n)
        elif clause.kind in _COUNT_OPS or clause.kind in _MONEY_OPS:
            (n,) = nums
            q, a = (_MONEY_OPS if money else _COUNT_OPS)[clause.kind][t]
            sentence = r.say(q, n=n)
            r.question.append(sentence)
            r.narrative.append(sentence)
            value = r.step(a, value, _OPS[clause.kind], n)
        elif clause.kind in _MONEY_TWO_STEP:
            k, p = nums
            q, a1, a2 = _MONEY_TWO_STEP[clause.kind][t]
            sentence = r.say(q, k=k, p=p)
            r.question.append(sentence)
            r.narrative.append(sentence)
            total = r.step(a1, k, "*", p)
            value = r.step(a2, value, "+" if clause.kind == "earn" else "-", total)
        elif clause.kind == "together":
            (n,) = nums
            kind, q, a1, ask, a2 = _COUNT_TOGETHER[t]
            sentence = r.say(q, n=n)
            r.question += [sentence, r.say(ask)]
            r.narrative.append(sentence)
            friend = r.step(a1, value, _OPS[kind], n)
            value = r.step(a2, value, "+", friend)
        elif clause.kind == "ask":
            r.question.append(r.say((_MONEY_ASK if money else _COUNT_ASK)[t]))
        else:
            raise AssertionError(clause.kind)
    return Problem(" ".join(r.question), r.lines, value, r.narrative, r.equations)


_OPS = {"add": "+", "gift": "+", "sub": "-", "spend": "-", "mul": "*", "div": "/", "half": "/"}


def _apply(kind: str, value: int, n: int) -> int:
    op = _OPS[kind]
    return value + n if op == "+" else value - n if op == "-" else value * n if op == "*" else value // n


def _template(rng: random.Random, count: int, kind: str, clauses: list[_Clause]) -> int:
    """A template index for a new clause of `kind`, never the one the previous clause used."""
    index = rng.randrange(count)
    if clauses and clauses[-1].kind == kind and clauses[-1].template == index:
        index = (index + 1) % count
    return index


def _sample_plan(rng: random.Random, level: tuple[int, int, int]) -> _Plan:
    """A random plan with exactly `steps` reasoning lines, for a level (steps, top, max_value).

    Numbers added or taken away are at most `top`, factors at most _MAX_FACTOR, and every
    intermediate value stays in [_MIN_VALUE, max_value] with every division exact.
    """
    steps, top, most = level

    def pick(lo: int, hi: int) -> int | None:
        return rng.randint(lo, hi) if lo <= hi else None

    while True:
        family = "money" if rng.random() < 0.35 else "count"
        clauses: list[_Clause] = []
        left = steps
        ok = True
        if family == "count":
            if left >= 2 and rng.random() < 0.3:
                k, n = rng.randint(2, _MAX_FACTOR), rng.randint(2, min(top, most // _MAX_FACTOR))
                value = k * n
                clauses.append(_Clause("group", rng.randrange(len(_COUNT_GROUP)), (k, n)))
                left -= 1
            else:
                value = rng.randint(_MIN_VALUE + 3, 2 * top)
                clauses.append(_Clause("count_start", rng.randrange(len(_COUNT_START)), (value,)))
            together = left >= 2 and rng.random() < 0.35
            left -= 2 * together
            for _ in range(left):
                divisors = [d for d in range(2, _MAX_FACTOR + 1) if value % d == 0 and value // d >= _MIN_VALUE]
                choices = {
                    "add": pick(2, min(top, most - value)),
                    "sub": pick(2, min(top, value - _MIN_VALUE)),
                    "mul": pick(2, min(_MAX_FACTOR, most // value)),
                    "div": rng.choice(divisors) if divisors else None,
                }
                choices = {kind: n for kind, n in choices.items() if n is not None}
                if not choices:
                    ok = False
                    break
                kind = rng.choice(sorted(choices))
                clauses.append(_Clause(kind, _template(rng, len(_COUNT_OPS[kind]), kind, clauses), (choices[kind],)))
                value = _apply(kind, value, choices[kind])
            if not ok:
                continue
            if together:
                t = rng.randrange(len(_COUNT_TOGETHER))
                kind = _COUNT_TOGETHER[t][0]
                # the friend's amount f and the total value + f both stay within max_value
                n = {"add": pick(2, min(top, most - 2 * value)),
                     "sub": pick(max(2, 2 * value - most), min(top, value - _MIN_VALUE)),
                     "mul": pick(2, min(3, most // value - 1))}[kind]
                if n is None:
                    continue
                clauses.append(_Clause("together", t, (n,)))
            else:
                clauses.append(_Clause("ask", rng.randrange(len(_COUNT_ASK)), ()))
        else:
            value = rng.randint(top, min(3 * top, most))
            clauses.append(_Clause("money_start", rng.randrange(len(_MONEY_START)), (value,)))
            for _ in range(20):  # tries to fill the remaining steps with clauses that fit
                if left == 0:
                    break
                kind = rng.choice(["gift", "spend", "half"] + (["earn", "buy"] if left >= 2 else []))
                if kind in _MONEY_TWO_STEP:
                    k = rng.randint(2, _MAX_FACTOR)
                    hi = (most - value) // k if kind == "earn" else (value - _MIN_VALUE) // k
                    p = pick(2, min(top, hi))
                    if p is None:
                        continue
                    clauses.append(_Clause(kind, _template(rng, len(_MONEY_TWO_STEP[kind]), kind, clauses), (k, p)))
                    value = value + k * p if kind == "earn" else value - k * p
                    left -= 2
                    continue
                if kind == "half":
                    n = 2 if value % 2 == 0 and value // 2 >= _MIN_VALUE else None
                elif kind == "gift":
                    n = pick(2, min(top, most - value))
                else:
                    n = pick(2, min(top, value - _MIN_VALUE))
                if n is None:
                    continue
                clauses.append(_Clause(kind, _template(rng, len(_MONEY_OPS[kind]), kind, clauses), (n,)))
                value = _apply(kind, value, n)
                left -= 1
            if left:
                continue
            clauses.append(_Clause("ask", rng.randrange(len(_MONEY_ASK)), ()))
        return _Plan(family, tuple(clauses), most)


def _new_problem(rng: random.Random, level: tuple[int, int, int]) -> tuple[_Plan, dict[str, str], Problem]:
    """A fresh random problem at a level: its plan, its cast and the rendered problem."""
    plan, cast = _sample_plan(rng, level), _entities(rng)
    return plan, cast, _render(plan, cast)


# ----------------------------------------------------------------------------------------------
# Records

def _record(problem: Problem, category: str, kind: str, difficulty: int, final: int, rid: str,
            answer: str | None = None, **extra) -> dict:
    return {
        "question": problem.question,
        "answer": problem.answer if answer is None else answer,
        "metadata": {"id": rid, "category": category, "kind": kind, "difficulty": difficulty,
                     "final": final, **extra},
    }


def _counts(total: int, shares: list[float]) -> list[int]:
    """Split `total` into integer parts proportional to `shares` (largest remainders)."""
    raw = [total * s / sum(shares) for s in shares]
    parts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: parts[i] - raw[i])[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _levels(rng: random.Random, config: TestbedConfig, n: int) -> list[int]:
    """Difficulties (1-based) for n problems, in the configured shares, shuffled."""
    levels = [d for d, c in enumerate(_counts(n, list(config.level_weights)), 1) for _ in range(c)]
    rng.shuffle(levels)
    return levels


def _corrupt_step(rng: random.Random, plan: _Plan, cast: dict[str, str], problem: Problem) -> Problem:
    """Re-render with one intermediate result wrong; later steps carry the wrong value on."""
    intermediate = list(range(len(problem.lines) - 1)) or [0]
    for _ in range(100):
        delta = rng.choice([-1, 1]) * rng.randint(1, max(3, problem.final // 10))
        try:
            bad = _render(plan, cast, corrupt=(rng.choice(intermediate), delta))
        except _Invalid:
            continue
        if bad.final != problem.final:
            return bad
    raise _Invalid


def _wrong_final(rng: random.Random, final: int) -> int:
    while True:
        wrong = final + rng.choice([-1, 1]) * rng.randint(1, max(3, final // 5))
        if wrong >= 0 and wrong != final:
            return wrong


def _near_duplicate(rng: random.Random, kind: str, plan: _Plan, cast: dict[str, str]) -> tuple[Problem, str]:
    """A near-duplicate of a rendered plan and its kind: identical, other cast, or numbers nudged.

    When no nudge of the numbers gives a valid problem, the duplicate is renamed instead.
    """
    if kind == "repeat":
        return _render(plan, cast), kind
    if kind == "renumbered":
        for _ in range(100):
            clauses = tuple(
                _Clause(c.kind, c.template, tuple(x if c.kind == "half" else max(1, x + rng.choice([-4, -2, -1, 1, 2, 4])) for x in c.numbers))
                for c in plan.clauses
            )
            try:
                return _render(_Plan(plan.family, clauses, plan.max_value), cast), kind
            except _Invalid:
                continue
    other = _entities(rng)
    while other["Name"] == cast["Name"]:
        other = _entities(rng)
    return _render(plan, other), "renamed"


def make_train_set(config: TestbedConfig = TestbedConfig()) -> list[dict]:
    """The training records: clean, noise and redundant in the configured shares, shuffled.

    Each record is {"question", "answer", "metadata": {"id", "category", "kind", "difficulty",
    "final"}} where "final" is the TRUE answer of the question (noise records print another).
    Redundant records also carry "duplicate_of", the id of the clean record they copy.
    """
    rng = random.Random(f"qtune-testbed-train-{config.seed}")
    n_noise, n_redundant, n_clean = _counts(
        config.train_size, [config.noise_share, config.redundant_share, 1 - config.noise_share - config.redundant_share]
    )
    seen: set[str] = set()
    clean: list[tuple[dict, _Plan, dict[str, str]]] = []
    for difficulty in _levels(rng, config, n_clean):
        while True:
            plan, cast, problem = _new_problem(rng, config.levels[difficulty - 1])
            if problem.question not in seen:
                break
        seen.add(problem.question)
        rid = f"train-{len(clean):05d}"
        clean.append((_record(problem, "clean", "clean", difficulty, problem.final, rid), plan, cast))

    records = [rec for rec, _, _ in clean]
    noise_kinds = [k for k, c in zip(config.noise_kinds, _counts(n_noise, [1] * len(config.noise_kinds))) for _ in range(c)]
    for kind, difficulty in zip(noise_kinds, _levels(rng, config, n_noise)):
        rid = f"train-{len(records):05d}"
        while True:
            plan, cast, problem = _new_problem(rng, config.levels[difficulty - 1])
            if problem.question in seen:
                continue
            if kind == "wrong_final":
                answer = "\n".join(problem.lines + [f"#### {_wrong_final(rng, problem.final)}"])
            elif kind == "corrupted_step":
                try:
                    answer = _corrupt_step(rng, plan, cast, problem).answer
                except _Invalid:
                    continue
            else:
                other = _new_problem(rng, config.levels[difficulty - 1])[2]
                if other.final == problem.final:
                    continue
                answer = other.answer
            break
        seen.add(problem.question)
        records.append(_record(problem, "noise", kind, difficulty, problem.final, rid, answer=answer))

    easy = [item for item in clean if item[0]["metadata"]["difficulty"] == 1] or clean
    redundant_kinds = [k for k, c in zip(config.redundant_kinds, _counts(n_redundant, [1] * len(config.redundant_kinds))) for _ in range(c)]
    for kind in redundant_kinds:
        source, plan, cast = rng.choice(easy)
        problem, kind = _near_duplicate(rng, kind, plan, cast)
        meta = source["metadata"]
        records.append(_record(problem, "redundant", kind, meta["difficulty"], problem.final,
                               f"train-{len(records):05d}", duplicate_of=meta["id"]))
    rng.shuffle(records)
    return records


def make_test_set(config: TestbedConfig = TestbedConfig()) -> list[dict]:
    """Held-out clean problems whose questions never occur in `make_train_set(config)`."""
    train_questions = {r["question"] for r in make_train_set(config)}
    rng = random.Random(f"qtune-testbed-test-{config.seed}")
    records, seen = [], set(train_questions)
    for difficulty in _levels(rng, config, config.test_size):
        while True:
            _, _, problem = _new_problem(rng, config.levels[difficulty - 1])
            if problem.question not in seen:
                break
        seen.add(problem.question)
        records.append(_record(problem, "clean", "clean", difficulty, problem.final, f"test-{len(records):05d}"))
    assert not train_questions & {r["question"] for r in records}, "test set overlaps the training set"
    return records


# ----------------------------------------------------------------------------------------------
# Pretraining corpus

def make_corpus(
    n_documents: int,
    seed: int = 0,
    levels: tuple[tuple[int, int, int], ...] = TestbedConfig.levels,
    drill_share: float = 0.5,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> list[str]:
    """Pretraining documents: arithmetic drills and narratives, never in question/answer form.

    A share `drill_share` of the documents are lists of the equations that problems at `levels`
    need ("12 + 7 = 19", or annotated as in the answers: "12 + 7 = <<12+7=19>>19"); the others are
    stories of the problems' kind told as statements, each event followed by its annotated
    calculation. The question sentence, the `#### N` line and the chat template are left out:
    they are what fine-tuning has to teach. Problems whose question is in `exclude` (the held-out
    test questions) are never used, so no test problem's solution is seen in pretraining.
    """
    rng = random.Random(f"qtune-testbed-corpus-{seed}")

    def problem() -> Problem:
        while True:
            found = _new_problem(rng, rng.choice(levels))[2]
            if found.question not in exclude:
                return found

    documents = []
    for _ in range(n_documents):
        if rng.random() < drill_share:
            equations = [e for _ in range(4) for e in problem().equations]
            rng.shuffle(equations)
            if rng.random() < 0.5:
                lines = [f"{a} {op} {b} = {r}" for a, op, b, r in equations]
            else:
                lines = [f"{a} {op} {b} = <<{a}{op}{b}={r}>>{r}" for a, op, b, r in equations]
            documents.append("\n".join(lines))
        else:
            stories = [problem() for _ in range(rng.randint(1, 3))]
            documents.append("\n".join(" ".join(p.narrative) for p in stories))
    return documents


# ----------------------------------------------------------------------------------------------
# Files

_FINAL = re.compile(r"####\s*(-?[\d,]+)\s*$")


def final_answer(answer: str) -> int | None:
    """The integer after the last `#### ` of a GSM8K answer, or None if there is none."""
    match = _FINAL.search(answer.strip())
    return int(match.group(1).replace(",", "")) if match else None


def write_jsonl(records: list[dict], path: str | os.PathLike) -> Path:
    """Write records as JSON lines, atomically: a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
