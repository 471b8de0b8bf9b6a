"""A local LLM judge of instructions, for the `thtb` selector's intrinsic hardness: it asks a causal
LM (`--judge-model`) two questions about each instruction, the level of Bloom's taxonomy that
answering it demands (1 remember .. 6 create) and the academic disciplines it draws on, and
parses the answer.

The questions are those of THTB ("The Harder The Better", arXiv 2510.13892; its Bloom score and
its interdisciplinary complexity); the wording of `judge_messages` is this module's own (THTB's
released scripts ask the two questions in two separate prompts; here one prompt asks both, so a
record costs one generation).

- `judge_messages(instruction)`: the conversation the judge continues (one user turn; the
  instruction is cut to `INSTRUCTION_CHARS` characters). `PROMPT_VERSION` names this wording:
  change it whenever the wording changes, so that cached answers to the old one are not reused.
- `parse_judge_answer(text)`: a pure function, text -> `JudgeAnswer(level, disciplines)`; a
  field it cannot read, or out of range (level outside 1..6, disciplines outside
  1..MAX_DISCIPLINES), is None. The caller decides the default (`qtune.selectors.thtb`: the
  lowest value, 1).
- `judge_agreement(a, b)`: agreement of two passes over the same records (exact, within one).
- `judge_instructions(instructions, ...)`: the judge's raw answers, from the cache where it has
  them, else generated (`generate_answers`: batched, left-padded, greedy or seeded sampling, with
  a tqdm bar), the judge model loaded only when something is missing.

The cache: a JSON-lines file per judge setup under `cache_root("judge")` (`~/.cache/qtune/judge`,
or `$QTUNE_CACHE/judge`), named by the sha256 of (the judge model's identity, `PROMPT_VERSION`,
the generation settings), one row `{"key": sha256 of the instruction, "answer": text}` per
instruction, with `<name>.json` beside it saying what the setup was. The identity
(`judge_identity`) of a known model name is its pinned GGUF sha256; of a local folder, its path
and the names, sizes and modification times of its files; of a .gguf file, its sha256; of a hub
id, the id alone (a new revision on the hub is not noticed: give a local folder to be exact). The
settings are the dtype the judge computes in, `max_new_tokens`, the temperature, and the seed
when sampling. New answers are merged into the file under the cache entry's lock and written
atomically (`qtune.io.write_jsonl`) at most every `FLUSH_SECONDS` and at the end, also when the
run is interrupted: a killed run loses at most the answers of its last minute.

Sampled answers (temperature above 0) are drawn batch by batch, each batch under its own seed
(the run's seed and the batch's index, on a forked RNG), so they depend on which records share a
batch; the cache makes a rerun with the same settings return the same answers.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .console import log
from .io import cache_entry_lock, cache_root, read_jsonl, write_json, write_jsonl

#: Names the wording of `judge_messages` (and INSTRUCTION_CHARS); part of every cache key.
PROMPT_VERSION = "thtb-judge-v1"
#: Characters of an instruction the judge sees (a longer one is cut, marked with "[...]").
INSTRUCTION_CHARS = 6000
#: The most disciplines an answer may name; more is read as a runaway list (out of range).
MAX_DISCIPLINES = 10
#: Seconds between two writes of the cache while answers are being generated.
FLUSH_SECONDS = 60.0

BLOOM_LEVELS = ("remember", "understand", "apply", "analyze", "evaluate", "create")

_QUESTION = """Read the instruction below, then answer two questions about it.

Question 1. Which level of Bloom's taxonomy does answering the instruction demand?
1 = remember: recall a fact or a definition
2 = understand: explain, summarise or paraphrase an idea
3 = apply: use a known method to solve a problem
4 = analyze: break something down, compare, find relations or causes
5 = evaluate: judge, criticise or justify a choice
6 = create: design, compose or produce something new

Question 2. Which academic disciplines does answering the instruction draw on? Name each one, separated by commas.

Instruction:
\"\"\"
{instruction}
\"\"\"

Reply with exactly two lines in this form, and nothing else:
Level: <a number from 1 to 6>
Disciplines: <first discipline>, <second discipline>, ..."""


def judge_messages(instruction: str) -> list[dict]:
    """The conversation the judge continues: one user turn asking both questions of `instruction`
    (cut to INSTRUCTION_CHARS characters)."""
    text = instruction.strip()
    if len(text) > INSTRUCTION_CHARS:
        text = text[:INSTRUCTION_CHARS] + " [...]"
    return [{"role": "user", "content": _QUESTION.format(instruction=text)}]


@dataclass(frozen=True)
class JudgeAnswer:
    """What an answer says: the Bloom level (1..6) and the number of disciplines
    (1..MAX_DISCIPLINES), each None where the answer does not say it readably."""

    level: int | None
    disciplines: int | None

    @property
    def parsed(self) -> bool:
        return self.level is not None and self.disciplines is not None


_NAMES = "|".join(["analyse", *BLOOM_LEVELS])
# "Level" then at most a few separators (no "<": a format placeholder such as "<1-6>" is not an
# answer), then a whole number (not the start of a decimal) or a level's name.
_LEVEL = re.compile(r"level[\s:=*#_\-]{0,6}(?:(\d+)(?![.,]\d)|(" + _NAMES + r")\b)", re.IGNORECASE)
_DISCIPLINES = re.compile(r"disciplines?\W{0,4}?[:=\-]+[ \t]*([^\n]*)", re.IGNORECASE)
_SEPARATORS = re.compile(r"\s*(?:,|;|/|&|\band\b)\s*", re.IGNORECASE)
_EMPTY = {"", "none", "n/a", "na", "etc", "no discipline", "no disciplines"}


def _level(text: str) -> int | None:
    match = _LEVEL.search(text)
    if match is None:
        return None
    if match.group(1) is not None:
        value = int(match.group(1))
        return value if 1 <= value <= len(BLOOM_LEVELS) else None
    name = match.group(2).lower().replace("analyse", "analyze")
    return BLOOM_LEVELS.index(name) + 1


def _discipline_count(line: str) -> int | None:
    """The number of disciplines one answer line names: a leading number, or the distinct names
    of a comma-separated list (cut at the first sentence's end); None for a line of prose (a
    "name" of more than four words), an empty list or one out of range."""
    line = line.strip().strip("*").strip()
    number = re.match(r"(\d+)\b(?![.,]\d)", line)
    if number:
        value = int(number.group(1))
    else:
        line = re.split(r"(?<=[A-Za-z)\]])\.(?:\s|$)", line)[0].rstrip(".")
        names = [re.sub(r"[^\w\s'\-]", "", part).strip().lower() for part in _SEPARATORS.split(line)]
        names = [name for name in names if name not in _EMPTY]
        if any(len(name.split()) > 4 for name in names):
            return None
        value = len(dict.fromkeys(names))
    return value if 1 <= value <= MAX_DISCIPLINES else None


def parse_judge_answer(text: str) -> JudgeAnswer:
    """Read the judge's answer (see the module doc). The level: the first "Level" followed by a
    whole number or a level's name (1..6). The disciplines: the first "Discipline(s):" line that is
    not the prompt's own placeholder ("<...>"), as a count (1..MAX_DISCIPLINES). Anything else
    is None: the answer's other words are ignored."""
    text = text or ""
    count = None
    for match in _DISCIPLINES.finditer(text):
        line = match.group(1)
        if re.search(r"<[^>]*>", line):  # the format echoed back, not an answer
            continue
        count = _discipline_count(line)
        break
    return JudgeAnswer(_level(text), count)


def judge_agreement(a: list[int | None], b: list[int | None]) -> dict:
    """Agreement of two judges' (or two passes') values over the same records: `n`, the records
    where both are readable (not None); `exact`, the share of those equal; `within_one`, the share
    at most one apart (None when n is 0)."""
    if len(a) != len(b):
        raise ValueError(f"judge_agreement: {len(a)} values against {len(b)}")
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return {"n": 0, "exact": None, "within_one": None}
    return {"n": len(pairs), "exact": sum(x == y for x, y in pairs) / len(pairs),
            "within_one": sum(abs(x - y) <= 1 for x, y in pairs) / len(pairs)}


# ----------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class JudgeSettings:
    """How the judge generates: `temperature` 0 decodes greedily (`seed` unused), above 0 samples."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    seed: int = 0

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    def key(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "seed": self.seed if self.sampled else None}


def _stop_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the tokenizer's and the model's EOS, and the special token that
    ends an assistant turn in the tokenizer's rendering (`<|im_end|>`, ...)."""
    from .evaluate import _stop_token_ids, end_of_turn

    turn_end = end_of_turn(tokenizer)
    return _stop_token_ids(model, tokenizer, (turn_end,) if turn_end else ())


def generate_answers(model, tokenizer, prompts: list[str], *, settings: JudgeSettings, batch_size: int,
                     progress: bool = True,
                     on_batch: Callable[[list[int], list[str]], None] | None = None) -> list[str]:
    """The judge's continuations of the rendered `prompts`, in their order: longest first, in
    batches of `batch_size`, left-padded with an attention mask, `model.generate` with the KV
    cache, greedy or (temperature above 0) sampled under the batch's own seed; each cut at its
    first stop token and decoded without special tokens. `on_batch(indices, texts)` sees each
    batch's answers as they come (the cache stores them)."""
    from tqdm.auto import tqdm

    from .evaluate import left_pad

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the judge's tokenizer has neither a pad nor an EOS token")
    stop_ids = _stop_ids(model, tokenizer)
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    options = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=pad_id, eos_token_id=stop_ids or None,
                   use_cache=True)
    if settings.sampled:
        options.update(do_sample=True, temperature=settings.temperature, top_p=1.0, top_k=0)
    else:  # greedy; the model's own sampling defaults would only raise warnings
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    outputs = [""] * len(prompts)
    bar = tqdm(total=len(prompts), unit="record", desc="judging", disable=not progress)
    try:
        for index, start in enumerate(range(0, len(order), batch_size)):
            rows = order[start:start + batch_size]
            input_ids, attention_mask = left_pad([encoded[i] for i in rows], pad_id)
            devices = [device] if device.type == "cuda" else []
            with torch.inference_mode(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(settings.seed * 1_000_003 + index)
                generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                           **options)
            texts = []
            for tokens in generated[:, input_ids.shape[1]:].tolist():
                end = next((k for k, t in enumerate(tokens) if t in stop_ids), len(tokens))
                texts.append(tokenizer.decode(tokens[:end], skip_special_tokens=True).strip())
            for i, text in zip(rows, texts):
                outputs[i] = text
            if on_batch is not None:
                on_batch(rows, texts)
            bar.update(len(rows))
    finally:
        bar.close()
    return outputs


def load_judge(name_or_path: str, *, device: str, dtype: str, trust_remote_code: bool = False):
    """(model, tokenizer) of the judge, loaded as every qtune model is (`qtune.models`)."""
    from .models import check_vocabulary, load_model, load_tokenizer

    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    model = load_model(name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    check_vocabulary(model, tokenizer, name_or_path)
    return model, tokenizer


# ----------------------------------------------------------------------------- the cache


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def judge_identity(name_or_path: str) -> str:
    """What identifies the judge model in the cache's keys (see the module doc)."""
    from .pretrained import KNOWN_MODELS, file_sha256

    path = Path(name_or_path).expanduser()
    if path.is_file():
        return f"file:{file_sha256(path.resolve())}"
    if path.is_dir():
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.resolve().iterdir()
                       if p.is_file() and not p.name.startswith("."))
        return "folder:" + _sha256(json.dumps([str(path.resolve()), files]))
    if name_or_path in KNOWN_MODELS:
        spec = KNOWN_MODELS[name_or_path]
        return f"known:{spec.name}:{spec.gguf_sha256}"
    return f"hub:{name_or_path}"


def record_key(instruction: str) -> str:
    """The cache key of one instruction's answer within a setup: the sha256 of its text."""
    return _sha256(instruction)


class JudgeCache:
    """The answers of one judge setup (identity, prompt version, settings): `get`, `put`, `flush`
    (see the module doc)."""

    def __init__(self, identity: str, settings: dict, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_root("judge")
        self.setup = {"judge": identity, "prompt": PROMPT_VERSION, "settings": settings}
        self.name = _sha256(json.dumps(self.setup, sort_keys=True))[:24]
        self.path = self.root / f"{self.name}.jsonl"
        self.answers = {row["key"]: row["answer"] for row in read_jsonl(self.path)
                        if isinstance(row, dict) and isinstance(row.get("answer"), str) and "key" in row}
        self.new: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self.answers.get(key)

    def put(self, key: str, answer: str) -> None:
        self.answers[key] = answer
        self.new[key] = answer

    def flush(self) -> None:
        """Merge the new answers into the file (another run's meanwhile included), atomically."""
        if not self.new:
            return
        with cache_entry_lock(self.root, self.name, "the judge cache", "set QTUNE_CACHE to a writable folder"):
            merged = {row["key"]: row["answer"] for row in read_jsonl(self.path)
                      if isinstance(row, dict) and isinstance(row.get("answer"), str) and "key" in row}
            merged.update(self.new)
            write_jsonl(self.path, ({"key": k, "answer": v} for k, v in merged.items()))
            if not self.path.with_suffix(".json").exists():
                write_json(self.path.with_suffix(".json"), self.setup)
        self.new = {}


@dataclass
class JudgeRun:
    """answers: the raw answer to each instruction, in order; cached / generated: how many came from
    the cache and from the model; seconds: the generation's (0 when all were cached); cache: the
    file."""

    answers: list[str]
    cached: int
    generated: int
    seconds: float
    cache: str


def judge_instructions(instructions: list[str], *, model: str, settings: JudgeSettings, batch_size: int,
                       device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                       progress: bool = True, cache_dir: Path | None = None) -> JudgeRun:
    """The judge's answers to `instructions` (see the module doc): the cached ones, then the
    missing ones generated (distinct instructions once each) and cached."""
    from .models import resolve_device, resolve_dtype

    computes_in = str(resolve_dtype(dtype, resolve_device(device))).removeprefix("torch.")
    cache = JudgeCache(judge_identity(model), {**settings.key(), "dtype": computes_in}, cache_dir)
    keys = [record_key(text) for text in instructions]
    missing = list(dict.fromkeys(k for k in keys if cache.get(k) is None))
    missing_set = set(missing)
    cached = sum(k not in missing_set for k in keys)
    generated, seconds = 0, 0.0
    if missing:
        first = {}
        for k, text in zip(keys, instructions):
            first.setdefault(k, text)
        log(f"judging {len(missing)} instructions with {model} ({cached} answers cached in {cache.path})")
        start = time.perf_counter()
        judge, tokenizer = load_judge(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        from .chat_templates import render_prompt

        prompts = [render_prompt(judge_messages(first[k]), tokenizer) for k in missing]
        last_flush = [time.monotonic()]

        def store(rows: list[int], texts: list[str]) -> None:
            for i, text in zip(rows, texts):
                cache.put(missing[i], text)
            if time.monotonic() - last_flush[0] >= FLUSH_SECONDS:
                cache.flush()
                last_flush[0] = time.monotonic()

        try:
            texts = generate_answers(judge, tokenizer, prompts, settings=settings, batch_size=batch_size,
                                     progress=progress, on_batch=store)
            for k, text in zip(missing, texts):
                cache.put(k, text)
        finally:
            cache.flush()
        generated, seconds = len(missing), time.perf_counter() - start
    answers = [cache.get(k) for k in keys]
    return JudgeRun(answers, cached, generated, seconds, str(cache.path))
