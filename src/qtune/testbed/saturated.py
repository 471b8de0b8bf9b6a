"""The saturated testbed preset's generator: problems a base model can already solve, and SFT data
whose defects are labelled.

The base model of this preset is pretrained (see `make_textbook_corpus`) on arithmetic drills and on
word problems solved in a textbook layout that fine-tuning never uses:

    Problem: Mia has 12 apples. Then she buys 7 more apples. How many apples does Mia have now?
    Solution:
    Mia has 12 apples.
    Then she buys 7 more apples. After buying more, she has 12 + 7 = 19 apples.
    Answer: 19

Fine-tuning asks for the GSM8K layout instead: the chat template, the solution lines alone and a
last line `#### N` (GSM8K's `<<12+7=19>>` calculator annotations too with
`SaturatedConfig(annotations=True)`):

    Mia has 12 apples.
    Then she buys 7 more apples. After buying more, she has 12 + 7 = 19 apples.
    #### 19

so supervised fine-tuning mostly teaches a format the model can already fill in, the regime of the
Q-Tuning paper. Each solution line restates the sentence it uses before computing: copying a span
is what a small model learns first, and it puts both numbers of every step on the line itself.
Every value is an integer in [0, 99] (one token of the preset's tokenizer) and every quantity a
problem states or a correct solution reaches lies in [2, max_value].

`make_splits(config)` returns the train, dev and test records. Training records carry their
ground truth in `metadata` (`category`, `kind`, `source`, `defective`, `difficulty`, `final`); see
`SaturatedConfig` for the categories. One phrase, "gives away all but n", is misread by the
pretraining corpus on purpose (it subtracts n instead of keeping n); the `misconception` training
records and part of dev and test solve it correctly, so fine-tuning has a real prior to overturn.

`GENERATOR_SHA256` is the sha256 of this file: a built testbed records it, so numbers measured on
the preset can be tied to the exact generator that made its data.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

# The hash of this file names the generator in every build and bench result, so the module is
# self-contained: it repeats small helpers of `tasks` (`_counts`, the renderer's shape) rather than
# importing them, which would let the generator change without its hash.
GENERATOR_SHA256 = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

CATEGORY_KINDS = {
    "clean": ("clean",),
    "misconception": ("all_but",),
    "redundant": ("repeat", "renamed", "renumbered"),
    "teacher_error": ("wrong_operation", "intermediate_answer", "dropped_step"),
    "format": ("truncated", "answer_format", "off_task"),
    "swapped": ("swapped_answer",),
}
DEFECTIVE = frozenset({"teacher_error", "format", "swapped"})  # categories whose response is wrong

_MIN_VALUE = 2  # stated and reached quantities stay >= 2: never "1 apples" or "0 apples"
_MAX_FACTOR = 5  # multipliers and divisors: small times tables only
_MAX_TOKEN = 99  # largest number that is one token; even a teacher's wrong value stays below


@dataclass(frozen=True)
class SaturatedConfig:
    """What `make_splits` generates.

    Fields:
        train_size: training records (3000).
        dev_size: dev records for any tuning (300), clean, `misconception_share` of them with the
            misread phrase.
        test_size: held-out test records (500), drawn like dev.
        max_value: largest quantity a problem states or reaches (30).
        levels: reasoning steps per difficulty level; difficulty d in the metadata is levels[d - 1].
        level_weights: share of each level among clean, misconception, dev and test problems.
        teacher_level_weights: share of each level among teacher errors, which are concentrated
            at the harder levels as a weaker teacher's would be.
        teacher_kind_weights: relative share of each teacher-error kind (`wrong_operation`,
            `intermediate_answer`, `dropped_step`); exact counts, largest remainders. Default 4:1:1,
            so the weaker teacher's one systematic rule dominates its errors.
        teacher_relations: the relation phrases the teacher's `wrong_operation` misreads ("more":
            "n more than" subtracted; "fewer": "n fewer than" added), one drawn per record. Default
            "more" only: 500 of the 3000 records subtract "n more than", against about 280 correct
            records that add it, so full data learns the wrong rule, which about 13% of dev and
            test problems need (docs/testbed.md, A2). Until generator 422b2a92... both phrases,
            kinds in equal shares and `shares` (0.50, 0.10, 0.15, 0.15, 0.06, 0.04): defects then
            cost full data only 1.4-2.5 points.
        shares: share of each training category, in the order of `CATEGORY_KINDS`: `clean`
            (correct), `misconception` (correct, with the phrase the pretraining corpus misreads),
            `redundant` (a near-duplicate of an easy clean record: identical, renamed, or numbers
            nudged and recomputed), `teacher_error` (a systematic reasoning error carried through
            to `#### N`: relation phrase read with the wrong operation, an intermediate quantity
            answered, one step dropped), `format` (cut before the final line, the answer in another
            format, an unrelated reply) and `swapped` (the answer of another training question).
            Kinds within a category come in equal shares (teacher errors: `teacher_kind_weights`);
            counts are exact (largest remainders). Default 30/20/15/25/6/4%: 35% defective, and
            600 records that overturn the misreading, so that a random quarter of the defect-free
            version (`defect_free`) still holds about 150 of them (docs/testbed.md, A1; with 10%,
            the share until generator 7455841f..., a random quarter's ~75 left it misread).
        misconception_share: share of dev and test problems that use the misread phrase, and of
            the pretraining corpus's problems (where it is always misread).
        drill_op_weights: how often the pretraining drills draw each operator (+, -, *, /); sums
            and differences have by far the most facts, so they get most of the drills.
        annotations: write GSM8K's calculator annotations in the responses ("12 + 7 = <<12+7=19>>19").
            Off by default: the annotation's numbers are the unspaced tokens ("12", not " 12"),
            so fine-tuning with them must teach the base model to copy each operand into another
            token, which 25% of the data does not manage (docs/testbed.md, A1). Switching it
            changes only the responses' text, never which problems are drawn.
        seed: one seed for everything; each split and the corpus use streams of their own.
    """

    train_size: int = 3000
    dev_size: int = 300
    test_size: int = 500
    max_value: int = 30
    levels: tuple[int, ...] = (2, 3, 4)
    level_weights: tuple[float, ...] = (0.3, 0.4, 0.3)
    teacher_level_weights: tuple[float, ...] = (0.1, 0.3, 0.6)
    teacher_kind_weights: tuple[float, ...] = (4.0, 1.0, 1.0)
    teacher_relations: tuple[str, ...] = ("more",)
    shares: tuple[float, ...] = (0.30, 0.20, 0.15, 0.25, 0.06, 0.04)
    misconception_share: float = 0.1
    drill_op_weights: tuple[float, ...] = (0.4, 0.4, 0.1, 0.1)
    annotations: bool = False
    seed: int = 0

    def __post_init__(self):
        if len(self.shares) != len(CATEGORY_KINDS) or min(self.shares) < 0 or abs(sum(self.shares) - 1) > 1e-9:
            raise ValueError(f"shares must be {len(CATEGORY_KINDS)} non-negative numbers summing to 1")
        if not (len(self.levels) == len(self.level_weights) == len(self.teacher_level_weights)) or min(self.levels) < 2:
            raise ValueError("levels, level_weights and teacher_level_weights need the same length; levels >= 2 steps")
        if not 10 <= self.max_value <= _MAX_TOKEN // 2:
            raise ValueError(f"max_value must lie in [10, {_MAX_TOKEN // 2}] so that wrong values stay single tokens")
        if len(self.teacher_kind_weights) != len(CATEGORY_KINDS["teacher_error"]) or min(self.teacher_kind_weights) < 0 \
                or sum(self.teacher_kind_weights) <= 0:
            raise ValueError(f"teacher_kind_weights must be {len(CATEGORY_KINDS['teacher_error'])} non-negative weights")
        if not self.teacher_relations or not set(self.teacher_relations) <= {"more", "fewer"}:
            raise ValueError('teacher_relations must name "more" and/or "fewer"')


# ----------------------------------------------------------------------------------------------
# Vocabulary

_PEOPLE = [
    ("Mia", "she"), ("Liam", "he"), ("Emma", "she"), ("Noah", "he"), ("Olivia", "she"),
    ("Lucas", "he"), ("Ava", "she"), ("Ethan", "he"), ("Sofia", "she"), ("Mason", "he"),
    ("Chloe", "she"), ("Leo", "he"), ("Grace", "she"), ("Owen", "he"), ("Zoe", "she"),
    ("Jack", "he"), ("Lily", "she"), ("Ben", "he"), ("Nora", "she"), ("Sam", "he"),
]
_OBJECTS = ["apples", "marbles", "stickers", "cookies", "books", "pencils", "shells", "cards",
            "stamps", "toys", "balloons", "beads", "rocks", "oranges", "buttons"]
_PRONOUNS = {"she": ("she", "her", "her"), "he": ("he", "him", "his")}

# Question sentences use {n} (or {k} and {n}); solution lines use {calc}, rendered "a + b = c" in the
# textbook layout and "a + b = <<a+b=c>>c" in the GSM8K layout.
_START = ["{Name} has {n} {obj}.", "{Name} collected {n} {obj}.", "There are {n} {obj} in {Name}'s bag."]
_GROUP = [("{Name} buys {k} boxes of {obj} with {n} {obj} in each box.", "{Name} buys {calc} {obj}."),
          ("{Name} fills {k} jars with {n} {obj} each.", "The jars hold {calc} {obj}.")]
_EVENTS = {  # kind: (operator, [(question sentence, solution line)])
    "add": ("+", [("Then {he} buys {n} more {obj}.", "After buying more, {he} has {calc} {obj}."),
                  ("{Friend} gives {him} {n} {obj}.", "{Name} now has {calc} {obj}."),
                  ("{He} finds {n} more {obj}.", "{He} then has {calc} {obj}.")]),
    "sub": ("-", [("{He} gives {n} {obj} to {Friend}.", "After giving some away, {he} has {calc} {obj}."),
                  ("{He} loses {n} of the {obj}.", "{Name} has {calc} {obj} left."),
                  ("{He} sells {n} {obj}.", "After the sale {he} has {calc} {obj}.")]),
    "mul": ("*", [("Then {his} number of {obj} becomes {n} times as large.", "{He} now has {calc} {obj}."),
                  ("By the end of the month {he} has {n} times as many {obj}.", "{He} then has {calc} {obj}.")]),
    "div": ("/", [("{He} splits the {obj} into {n} equal groups and keeps one group.", "One group has {calc} {obj}."),
                  ("{He} shares the {obj} equally among {n} children, one of them {himself}.", "Each child gets {calc} {obj}.")]),
}
# The misconception: "all but n" means n are kept. The correct line computes how many go away and
# continues with n; the corpus's misreading subtracts n and continues with the difference.
_ALL_BUT = "{He} gives away all but {n} of {his} {obj}."
_ALL_BUT_RIGHT = "{He} gives away {calc} {obj} and keeps {n}."
_ALL_BUT_MISREAD = "After giving them away, {he} has {calc} {obj}."
_RELATIONS = {  # kind: (operator, question sentence, solution line)
    "more": ("+", "{Friend} has {n} more {obj} than {Name}.", "{Friend} has {calc} {obj}."),
    "fewer": ("-", "{Friend} has {n} fewer {obj} than {Name}.", "{Friend} has {calc} {obj}."),
    "times": ("*", "{Friend} has {n} times as many {obj} as {Name}.", "{Friend} has {calc} {obj}."),
}
_ASK_OWN = ["How many {obj} does {Name} have now?", "How many {obj} does {Name} have in the end?"]
_ASK_FRIEND = "How many {obj} does {Friend} have?"
_ASK_TOGETHER = ["How many {obj} do they have together?", "How many {obj} do {Name} and {Friend} have in total?"]
_TOGETHER_LINE = "Together they have {calc} {obj}."
_OFF_TASK = [
    "I like stories about {obj}. {Name} seems to like them too.",
    "This is a question about {Name} and {Friend}. Maybe they should count the {obj} again.",
    "Counting {obj} is fun. {Name} could put them in a box.",
]
_OTHER_FORMATS = ["Answer: {n}", "The answer is {n}.", "So the answer is {n} {obj}."]


def _cast(rng: random.Random) -> dict[str, str]:
    (name, gender), (friend, _) = rng.sample(_PEOPLE, 2)
    subj, obj, poss = _PRONOUNS[gender]
    return {"Name": name, "Friend": friend, "he": subj, "He": subj.capitalize(), "him": obj, "his": poss,
            "His": poss.capitalize(), "himself": obj + "self" if subj == "she" else "himself",
            "obj": rng.choice(_OBJECTS)}


# ----------------------------------------------------------------------------------------------
# Problems: a plan (clauses with numbers) rendered with a cast, optionally with one deliberate error.

@dataclass(frozen=True)
class _Clause:
    kind: str  # "start", "group", an _EVENTS kind, "all_but", "relation", "ask"
    template: int
    numbers: tuple[int, ...]  # start: (n,); group: (k, n); event, all_but: (n,); relation: (n,); ask: ()
    relation: str = ""  # relation clauses: "more", "fewer" or "times"
    together: bool = False  # relation clauses: ask for the sum of both (one more step)


@dataclass(frozen=True)
class Problem:
    """A rendered problem.

    Fields:
        question: the question text.
        opening: the first solution line, the restated start sentence ("" when a product starts).
        steps: per reasoning step, (solution line with a {calc} slot, a, operator, b, result).
        final: the answer the solution states (wrong for a teacher error): the last step's result,
            or n when the last step is "gives away all but n" (its line computes what goes away).
    """

    question: str
    opening: str
    steps: tuple[tuple[str, int, str, int, int], ...]
    final: int

    def lines(self, layout: str) -> list[str]:
        """The solution lines in the "textbook" or "gsm8k" layout."""
        out = [self.opening] if self.opening else []
        for line, a, op, b, r in self.steps:
            calc = f"{a} {op} {b} = " + (f"<<{a}{op}{b}={r}>>{r}" if layout == "gsm8k" else str(r))
            out.append(line.replace("{calc}", calc))
        return out

    @property
    def answer(self) -> str:
        """The GSM8K response: annotated lines, then `#### N`."""
        return "\n".join(self.lines("gsm8k") + [f"#### {self.final}"])

    @property
    def textbook(self) -> str:
        """The problem and its solution in the pretraining layout."""
        return "\n".join([f"Problem: {self.question}", "Solution:", *self.lines("textbook"), f"Answer: {self.final}"])


_ANNOTATION = re.compile(r"<<[^<>]*>>")


class _Invalid(Exception):
    """The numbers break a rule (a value out of range, an inexact division)."""


def _calc(a: int, op: str, b: int, low: int = _MIN_VALUE, high: int = _MAX_TOKEN) -> int:
    if op == "/" and a % b:
        raise _Invalid
    r = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else -1}[op]
    if not low <= r <= high:
        raise _Invalid
    return r


def _render(clauses: tuple[_Clause, ...], cast: dict[str, str], max_value: int, *, error: str = "",
            at: int = -1) -> Problem:
    """Render a plan. `error` is "" (correct), "misread" (the corpus's reading of "all but"),
    "wrong_operation" (more and fewer swapped), "dropped_step" (the step of clause `at` left out of
    the solution) or "intermediate_answer" (the answer is the value after step `at`)."""
    say = lambda template, **numbers: template.format(**cast, **numbers)  # noqa: E731
    # A correct solution keeps every quantity in [2, max_value]; a wrong one only has to stay a number.
    low, high = (_MIN_VALUE, max_value) if error in ("", "intermediate_answer") else (0, _MAX_TOKEN)
    question, steps = [], []
    opening = ""
    value = 0

    def step(line: str, a: int, op: str, b: int) -> int:
        """One solution line: the question's last sentence restated, then the calculation."""
        r = _calc(a, op, b, low, high)
        steps.append((question[-1] + " " + say(line, calc="{calc}"), a, op, b, r))
        return r

    for i, c in enumerate(clauses):
        skip = error == "dropped_step" and i == at
        if c.kind == "start":
            question.append(say(_START[c.template], n=c.numbers[0]))
            opening, value = question[-1], c.numbers[0]
        elif c.kind == "group":
            k, n = c.numbers
            sentence, line = _GROUP[c.template]
            question.append(say(sentence, k=k, n=n))
            value = step(line, k, "*", n)
        elif c.kind in _EVENTS:
            op, templates = _EVENTS[c.kind]
            sentence, line = templates[c.template]
            question.append(say(sentence, n=c.numbers[0]))
            if not skip:
                value = step(line, value, op, c.numbers[0])
        elif c.kind == "all_but":
            (n,) = c.numbers
            question.append(say(_ALL_BUT, n=n))
            if error == "misread":
                value = step(_ALL_BUT_MISREAD, value, "-", n)
            elif not skip:
                step(say(_ALL_BUT_RIGHT, n=n, calc="{calc}"), value, "-", n)
                value = n
        elif c.kind == "relation":
            op, sentence, line = _RELATIONS[c.relation]
            if error == "wrong_operation":
                op = {"+": "-", "-": "+"}[op]
            question.append(say(sentence, n=c.numbers[0]))
            friend = step(line, value, op, c.numbers[0])
            if c.together:
                question.append(say(_ASK_TOGETHER[c.template]))
                r = _calc(value, "+", friend, low, high)  # the asking sentence is not restated
                steps.append((say(_TOGETHER_LINE, calc="{calc}"), value, "+", friend, r))
                value = r
            else:
                question.append(say(_ASK_FRIEND))
                value = friend
        else:
            question.append(say(_ASK_OWN[c.template]))
    if error == "intermediate_answer":
        steps, value = steps[: at + 1], steps[at][4]
    return Problem(" ".join(question), opening, tuple(steps), value)


def _steps(clauses: tuple[_Clause, ...]) -> int:
    return sum(c.kind != "start" and c.kind != "ask" for c in clauses) + sum(c.together for c in clauses)


def _plan(rng: random.Random, steps: int, max_value: int, *, all_but: bool = False, relation: str = "") -> tuple[_Clause, ...]:
    """A random plan with exactly `steps` reasoning steps and every quantity in [2, max_value].

    `all_but` puts the misread phrase among the events; `relation` ("more" or "fewer") forces a
    friend relation of that kind at the end.
    """
    while True:
        clauses: list[_Clause] = []
        left = steps
        if rng.random() < 0.25:
            k = rng.randint(2, _MAX_FACTOR)
            n = rng.randint(2, max_value // k)
            clauses.append(_Clause("group", rng.randrange(len(_GROUP)), (k, n)))
            value, left = k * n, left - 1
        else:
            value = rng.randint(5, max_value)
            clauses.append(_Clause("start", rng.randrange(len(_START)), (value,)))
        use_relation = bool(relation) or (left >= 1 and rng.random() < 0.45)
        together = use_relation and left >= 2 and rng.random() < 0.5
        events = left - use_relation - together
        if events < all_but:
            continue
        at = rng.randrange(events) if all_but else -1
        for i in range(events):
            choices: dict[str, int] = {}
            if i == at:
                if value - 2 >= 2:
                    n = rng.randint(2, value - 2)
                    if 2 * n != value:  # otherwise the misreading gives the right answer
                        choices["all_but"] = n
            else:
                if max_value - value >= 2:
                    choices["add"] = rng.randint(2, max_value - value)
                if value - 2 >= 2:
                    choices["sub"] = rng.randint(2, value - 2)
                if 2 * value <= max_value:
                    choices["mul"] = rng.randint(2, min(_MAX_FACTOR, max_value // value))
                divisors = [d for d in range(2, _MAX_FACTOR + 1) if value % d == 0 and value // d >= 2]
                if divisors:
                    choices["div"] = rng.choice(divisors)
            if not choices:
                break
            kind = rng.choice(sorted(choices))
            n = choices[kind]
            templates = len(_EVENTS[kind][1]) if kind in _EVENTS else 1
            clauses.append(_Clause(kind, rng.randrange(templates), (n,)))
            value = n if kind == "all_but" else _calc(value, _EVENTS[kind][0], n, 2, max_value)
        else:
            if use_relation:
                kind = relation or rng.choice(["more", "fewer", "times"])
                friend_max = max_value - value if together else max_value
                n = {"more": (2, friend_max - value), "fewer": (2, value - 2),
                     "times": (2, min(_MAX_FACTOR, friend_max // value))}[kind]
                if together and kind == "fewer":  # value + (value - n) <= max_value
                    n = (max(2, 2 * value - max_value), n[1])
                if n[0] > n[1]:
                    continue
                clauses.append(_Clause("relation", rng.randrange(len(_ASK_TOGETHER)), (rng.randint(*n),), kind, together))
            else:
                clauses.append(_Clause("ask", rng.randrange(len(_ASK_OWN)), ()))
            plan = tuple(clauses)
            assert _steps(plan) == steps
            return plan


def _problem(rng: random.Random, steps: int, config: SaturatedConfig, **kwargs) -> tuple[tuple[_Clause, ...], dict[str, str], Problem]:
    plan, cast = _plan(rng, steps, config.max_value, **kwargs), _cast(rng)
    return plan, cast, _render(plan, cast, config.max_value)


# ----------------------------------------------------------------------------------------------
# Records and splits

def _counts(total: int, shares) -> list[int]:
    """Split `total` into integer parts proportional to `shares` (largest remainders)."""
    raw = [total * s / sum(shares) for s in shares]
    parts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: parts[i] - raw[i])[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _difficulties(rng: random.Random, weights, n: int) -> list[int]:
    """Difficulties (1-based) for n problems in exact shares, shuffled."""
    out = [d for d, c in enumerate(_counts(n, weights), 1) for _ in range(c)]
    rng.shuffle(out)
    return out


def _record(question: str, answer: str, rid: str, category: str, kind: str, difficulty: int, final: int,
            source: str | None = None) -> dict:
    return {"question": question, "answer": answer,
            "metadata": {"id": rid, "category": category, "kind": kind, "source": source,
                         "defective": category in DEFECTIVE, "difficulty": difficulty, "final": final}}


def _teacher_error(rng: random.Random, kind: str, steps: int, config: SaturatedConfig) -> tuple[Problem, str]:
    """A problem with its true answer and the teacher's wrong GSM8K response of `kind`."""
    while True:
        relation = rng.choice(list(config.teacher_relations)) if kind == "wrong_operation" else ""
        plan, cast, problem = _problem(rng, steps, config, relation=relation)
        if kind == "wrong_operation":
            at = -1
        elif kind == "dropped_step":  # one event after the start, never the relation
            events = [i for i, c in enumerate(plan) if c.kind in _EVENTS]
            if not events:
                continue
            at = rng.choice(events)
        else:  # stop after some step before the last
            at = rng.randrange(len(problem.steps) - 1)
        try:
            wrong = _render(plan, cast, config.max_value, error=kind, at=at)
        except _Invalid:
            continue
        if wrong.final != problem.final:
            return problem, wrong.answer


def _format_defect(rng: random.Random, kind: str, problem: Problem, cast: dict[str, str]) -> str:
    if kind == "truncated":  # cut inside the lines before `#### N`, at a word boundary
        body = "\n".join(problem.lines("gsm8k"))
        cuts = [i for i, ch in enumerate(body) if ch in " \n" and i > 10]
        return body[: rng.choice(cuts)].rstrip()
    if kind == "answer_format":
        last = rng.choice(_OTHER_FORMATS).format(n=problem.final, obj=cast["obj"])
        return "\n".join(problem.lines("gsm8k") + [last])
    return rng.choice(_OFF_TASK).format(**cast)


def _near_duplicate(rng: random.Random, kind: str, plan: tuple[_Clause, ...], cast: dict[str, str],
                    config: SaturatedConfig) -> tuple[Problem, str]:
    """A copy of a clean problem: identical, with another cast, or with its numbers nudged (falls back
    to another cast, recorded as "renamed", when no nudge is valid)."""
    if kind == "repeat":
        return _render(plan, cast, config.max_value), kind
    if kind == "renumbered":
        for _ in range(100):
            nudged = tuple(replace(c, numbers=tuple(max(2, x + rng.choice([-2, -1, 1, 2])) for x in c.numbers)) for c in plan)
            try:
                problem = _render(nudged, cast, config.max_value)
            except _Invalid:
                continue
            if nudged != plan and _plan_ok(nudged, config.max_value):
                return problem, kind
    other = _cast(rng)
    while other["Name"] == cast["Name"]:
        other = _cast(rng)
    return _render(plan, other, config.max_value), "renamed"


def _plan_ok(plan: tuple[_Clause, ...], max_value: int) -> bool:
    """Whether every stated number of a plan is a valid quantity (start values and relation sizes)."""
    return all(_MIN_VALUE <= x <= max_value for c in plan for x in c.numbers) and all(
        c.numbers[0] <= _MAX_FACTOR for c in plan if c.kind in ("group", "mul", "div") or c.relation == "times")


def make_splits(config: SaturatedConfig = SaturatedConfig()) -> tuple[list[dict], list[dict], list[dict]]:
    """The (train, dev, test) records; no question occurs in two splits, nor twice in dev or test.

    Training records: exact category counts from `config.shares`, shuffled; `metadata.final` is the
    TRUE answer (defective records print something else), `source` is the id of the training record
    a near-duplicate copies or a swapped answer comes from (else None), `defective` is true for
    `teacher_error`, `format` and `swapped`. Dev and test records are correct, `category` "clean"
    or "misconception".
    """
    rng = random.Random(f"qtune-saturated-train-{config.seed}")
    counts = dict(zip(CATEGORY_KINDS, _counts(config.train_size, config.shares)))
    seen: set[str] = set()
    records: list[dict] = []
    plans: dict[str, tuple[tuple[_Clause, ...], dict[str, str]]] = {}

    def fresh(steps: int, **kwargs) -> tuple[tuple[_Clause, ...], dict[str, str], Problem]:
        while True:
            plan, cast, problem = _problem(rng, steps, config, **kwargs)
            if problem.question not in seen:
                seen.add(problem.question)
                return plan, cast, problem

    def rid() -> str:
        return f"train-{len(records):05d}"

    for category in ("clean", "misconception"):
        for d in _difficulties(rng, config.level_weights, counts[category]):
            plan, cast, problem = fresh(config.levels[d - 1], all_but=category == "misconception")
            plans[rid()] = plan, cast
            kind = CATEGORY_KINDS[category][0]
            records.append(_record(problem.question, problem.answer, rid(), category, kind, d, problem.final))
    clean = [r for r in records if r["metadata"]["category"] == "clean"]
    easy = [r for r in clean if r["metadata"]["difficulty"] == 1]

    def kinds(category: str) -> list[str]:
        options = CATEGORY_KINDS[category]
        weights = config.teacher_kind_weights if category == "teacher_error" else [1] * len(options)
        return [k for k, c in zip(options, _counts(counts[category], weights)) for _ in range(c)]

    for kind in kinds("redundant"):
        source = rng.choice(easy)["metadata"]
        problem, kind = _near_duplicate(rng, kind, *plans[source["id"]], config)
        seen.add(problem.question)  # a renamed or renumbered question must not reappear in dev or test
        records.append(_record(problem.question, problem.answer, rid(), "redundant", kind, 1, problem.final, source["id"]))
    for kind, d in zip(kinds("teacher_error"), _difficulties(rng, config.teacher_level_weights, counts["teacher_error"])):
        while True:
            problem, answer = _teacher_error(rng, kind, config.levels[d - 1], config)
            if problem.question not in seen:
                break
        seen.add(problem.question)
        records.append(_record(problem.question, answer, rid(), "teacher_error", kind, d, problem.final))
    for kind, d in zip(kinds("format"), _difficulties(rng, config.level_weights, counts["format"])):
        _, cast, problem = fresh(config.levels[d - 1])
        records.append(_record(problem.question, _format_defect(rng, kind, problem, cast), rid(), "format", kind, d, problem.final))
    for d in _difficulties(rng, config.level_weights, counts["swapped"]):
        _, _, problem = fresh(config.levels[d - 1])
        same_level = [r for r in clean if r["metadata"]["difficulty"] == d and r["metadata"]["final"] != problem.final]
        donor = rng.choice(same_level)
        records.append(_record(problem.question, donor["answer"], rid(), "swapped", "swapped_answer", d, problem.final,
                               donor["metadata"]["id"]))
    rng.shuffle(records)
    splits = records, _held_out(config, "dev", config.dev_size, seen), _held_out(config, "test", config.test_size, seen)
    if not config.annotations:  # after every draw, so that both settings draw the same problems
        for split in splits:
            for r in split:
                r["answer"] = _ANNOTATION.sub("", r["answer"])
    return splits


def _held_out(config: SaturatedConfig, split: str, size: int, seen: set[str]) -> list[dict]:
    """`size` correct problems whose questions are not in `seen` (which then holds them too)."""
    rng = random.Random(f"qtune-saturated-{split}-{config.seed}")
    n_misconception = _counts(size, [config.misconception_share, 1 - config.misconception_share])[0]
    out = []
    for i, d in enumerate(_difficulties(rng, config.level_weights, size)):
        all_but = i < n_misconception
        while True:
            _, _, problem = _problem(rng, config.levels[d - 1], config, all_but=all_but)
            if problem.question not in seen:
                break
        seen.add(problem.question)
        category = "misconception" if all_but else "clean"
        out.append(_record(problem.question, problem.answer, f"{split}-{i:05d}", category, CATEGORY_KINDS[category][0], d, problem.final))
    rng.shuffle(out)
    return out


# The SFT-defect fields as the shipped base model's pretraining saw them. The tokenizer's text and
# the questions the corpus excludes are drawn with `make_splits(pretraining_config(config))`, so
# that changing how the training data's defects are made (the fields below) never changes the base
# model's tokenizer or corpus: the shipped model stays reproducible (tests/test_testbed_saturated.py).
_PRETRAINING_FIELDS = {"shares": (0.50, 0.10, 0.15, 0.15, 0.06, 0.04), "teacher_kind_weights": (1.0, 1.0, 1.0),
                       "teacher_relations": ("more", "fewer")}


def defect_free(config: SaturatedConfig) -> SaturatedConfig:
    """The defect-free version of `config`'s training set, what calibration criterion A1 trains
    on: the same size and the same misconception and redundant shares, every defective category's
    share given to `clean`. Its records are drawn afresh (not the training set minus its defects,
    which is what the `oracle` control keeps); dev and test are unchanged."""
    shares = dict(zip(CATEGORY_KINDS, config.shares))
    shares["clean"] += sum(shares[c] for c in DEFECTIVE)
    return replace(config, shares=tuple(0.0 if c in DEFECTIVE else shares[c] for c in CATEGORY_KINDS))


def pretraining_config(config: SaturatedConfig) -> SaturatedConfig:
    """`config` with the SFT-defect fields (shares, teacher kinds and relations) at the values the
    shipped base model was pretrained with; the fields that shape the problems are kept."""
    return replace(config, **_PRETRAINING_FIELDS)


# ----------------------------------------------------------------------------------------------
# Pretraining corpus

def arithmetic_facts(max_value: int) -> dict[str, list[tuple[int, int, int]]]:
    """Every (a, b, result) a problem can need, per operator: sums and differences of quantities
    up to `max_value`, products and exact quotients with a factor up to 5 (both factor orders)."""
    top = range(0, max_value + 1)
    return {
        "+": [(a, b, a + b) for a in top for b in top if a + b <= max_value],
        "-": [(a, b, a - b) for a in top for b in top if a >= b],
        "*": sorted({(a, b, a * b) for k in range(2, _MAX_FACTOR + 1) for n in top if k * n <= max_value
                     for a, b in ((k, n), (n, k))}),
        "/": [(k * n, k, n) for k in range(2, _MAX_FACTOR + 1) for n in top if k * n <= max_value],
    }


def make_textbook_corpus(n_documents: int, seed: int, config: SaturatedConfig = SaturatedConfig(), *,
                         drill_share: float = 0.5, exclude: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Pretraining documents: arithmetic drills and problems solved in the textbook layout.

    A share `drill_share` of the documents are 24 equations drawn uniformly from
    `arithmetic_facts(config.max_value)`, operators weighted by `config.drill_op_weights`, written
    spaced ("12 + 7 = 19") or compact ("12+7=19"), one per line. The others hold one problem
    in the textbook layout (`Problem.textbook`) at uniformly drawn levels, `config.misconception_share`
    of them using "all but n", always misread. Never `#### N`, `<<...>>` or the chat template.
    Problems whose question is in `exclude` (every split's questions) are never used.
    """
    rng = random.Random(f"qtune-saturated-corpus-{seed}")
    facts = arithmetic_facts(config.max_value)
    ops = list(facts)
    documents = []
    for _ in range(n_documents):
        if rng.random() < drill_share:
            spaced = rng.random() < 0.5
            lines = []
            for op in rng.choices(ops, config.drill_op_weights, k=24):
                a, b, r = rng.choice(facts[op])
                lines.append(f"{a} {op} {b} = {r}" if spaced else f"{a}{op}{b}={r}")
            documents.append("\n".join(lines))
            continue
        while True:
            all_but = rng.random() < config.misconception_share
            plan, cast, problem = _problem(rng, rng.choice(config.levels), config, all_but=all_but)
            if problem.question in exclude:
                continue
            try:
                documents.append((_render(plan, cast, config.max_value, error="misread") if all_but else problem).textbook)
            except _Invalid:  # the misread value broke a later step (an inexact division, say)
                continue
            break
    return documents
