"""The micro testbed: task generator, ground-truth categories, tokenizer and the cached tiny model."""

from __future__ import annotations

import collections
import json
import os
import re
import time

import pytest
import torch

from qtune.testbed import ModelRecipe, TestbedConfig, build_testbed, make_corpus, make_test_set, make_train_set, write_jsonl
from qtune.testbed.model import cache_key, train_tokenizer
from qtune.testbed.tasks import final_answer

SMALL = TestbedConfig(train_size=300, test_size=60, seed=3)
TINY_RECIPE = ModelRecipe(
    hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=256, block_size=64,
    batch_size=2, steps=3, warmup_steps=1, tokenizer_documents=100, vocab_size=400,
)
TINY_DATA = TestbedConfig(train_size=40, test_size=10)

ANNOTATION = re.compile(r"<<(\d+)([-+*/])(\d+)=(-?\d+)>>(-?\d+)")


def annotations(answer: str) -> list[tuple[int, str, int, int, int]]:
    """(a, op, b, annotated value, printed value) of every `<<a op b=value>>value` in an answer."""
    return [(int(a), op, int(b), int(v), int(p)) for a, op, b, v, p in ANNOTATION.findall(answer)]


def evaluate(a: int, op: str, b: int) -> float:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]


def wrong_annotations(answer: str) -> int:
    return sum(evaluate(a, op, b) != v or v != p for a, op, b, v, p in annotations(answer))


def by_category(records: list[dict], category: str) -> list[dict]:
    return [r for r in records if r["metadata"]["category"] == category]


@pytest.fixture(scope="module")
def train():
    return make_train_set(SMALL)


def test_generator_is_deterministic_per_seed(train):
    assert make_train_set(SMALL) == train
    assert make_test_set(SMALL) == make_test_set(SMALL)
    other = make_train_set(TestbedConfig(train_size=300, test_size=60, seed=4))
    assert [r["question"] for r in other] != [r["question"] for r in train]
    assert make_corpus(5, seed=1) == make_corpus(5, seed=1) != make_corpus(5, seed=2)


def test_records_have_gsm8k_format_and_metadata(train):
    for r in train:
        assert set(r) == {"question", "answer", "metadata"}
        lines = r["answer"].split("\n")
        assert re.fullmatch(r"#### \d+", lines[-1])
        assert all(ANNOTATION.search(line) for line in lines[:-1]), r["answer"]
        meta = r["metadata"]
        assert meta["category"] in ("clean", "noise", "redundant")
        assert meta["difficulty"] in (1, 2, 3)
        assert isinstance(meta["final"], int) and meta["final"] >= 0
    # Several phrasings per operation, several people: not one template with the numbers swapped.
    phrasings = collections.defaultdict(set)
    for r in train:
        for line in r["answer"].split("\n")[:-1]:
            op = ANNOTATION.search(line).group(2)
            phrasing = re.sub(r"\b(she|he|[A-Z][a-z]+)\b", "X", line.split(" = ")[0].rsplit(" ", 3)[0])
            phrasings[op].add(phrasing)
    assert all(len(phrasings[op]) >= 3 for op in "+-*/"), phrasings
    assert len({r["question"].split()[0] for r in train}) >= 15


def test_clean_answers_are_correct(train):
    for r in by_category(train, "clean") + by_category(train, "redundant") + make_test_set(SMALL):
        steps = annotations(r["answer"])
        assert wrong_annotations(r["answer"]) == 0, r["answer"]
        assert final_answer(r["answer"]) == r["metadata"]["final"] == steps[-1][3]
        # The first steps use the question's numbers, and every number of the question is used.
        question_numbers = {int(n) for n in re.findall(r"\d+", r["question"])}
        operands = {x for a, _, b, _, _ in steps for x in (a, b)}
        assert question_numbers <= operands, r
        # Number of steps follows the difficulty.
        assert len(steps) == SMALL.levels[r["metadata"]["difficulty"] - 1][0]


def test_noise_answers_are_wrong(train):
    noise = by_category(train, "noise")
    assert {r["metadata"]["kind"] for r in noise} == set(SMALL.noise_kinds)
    for r in noise:
        assert final_answer(r["answer"]) != r["metadata"]["final"], r
        kind = r["metadata"]["kind"]
        if kind == "corrupted_step":
            assert wrong_annotations(r["answer"]) == 1, r["answer"]
            assert annotations(r["answer"])[-1][3] == final_answer(r["answer"])
        elif kind == "wrong_final":
            assert wrong_annotations(r["answer"]) == 0
            assert annotations(r["answer"])[-1][3] == r["metadata"]["final"]
        else:
            assert wrong_annotations(r["answer"]) == 0
    # A swapped answer is someone else's reasoning: it (almost always) misses the question's numbers.
    swapped = [r for r in noise if r["metadata"]["kind"] == "swapped_answer"]
    unrelated = 0
    for r in swapped:
        question_numbers = {int(n) for n in re.findall(r"\d+", r["question"])}
        operands = {x for a, _, b, _, _ in annotations(r["answer"]) for x in (a, b)}
        unrelated += not question_numbers <= operands
    assert unrelated >= 0.9 * len(swapped)


def test_redundant_records_are_near_duplicates_of_easy_clean_ones(train):
    by_id = {r["metadata"]["id"]: r for r in train}
    redundant = by_category(train, "redundant")
    assert {r["metadata"]["kind"] for r in redundant} == set(SMALL.redundant_kinds)
    skeleton = lambda text: re.sub(r"\d+", "N", text)  # noqa: E731
    numbers = lambda text: re.findall(r"\d+", text)  # noqa: E731
    for r in redundant:
        source = by_id[r["metadata"]["duplicate_of"]]
        assert source["metadata"]["category"] == "clean"
        assert source["metadata"]["difficulty"] == r["metadata"]["difficulty"] == 1
        kind = r["metadata"]["kind"]
        if kind == "repeat":
            assert (r["question"], r["answer"]) == (source["question"], source["answer"])
        elif kind == "renamed":
            assert numbers(r["question"]) == numbers(source["question"])
            assert r["question"] != source["question"]
        else:
            assert skeleton(r["question"]) == skeleton(source["question"])
            assert numbers(r["question"]) != numbers(source["question"])


def test_shares_follow_the_config(train):
    counts = collections.Counter(r["metadata"]["category"] for r in train)
    assert counts == {"noise": 60, "redundant": 60, "clean": 180}
    kinds = collections.Counter(r["metadata"]["kind"] for r in train)
    assert all(kinds[k] == 20 for k in SMALL.noise_kinds + SMALL.redundant_kinds)
    levels = collections.Counter(r["metadata"]["difficulty"] for r in by_category(train, "clean"))
    assert levels == {1: 54, 2: 72, 3: 54}
    assert len({r["metadata"]["id"] for r in train}) == len(train)

    no_noise = make_train_set(TestbedConfig(train_size=100, noise_share=0.0, redundant_share=0.5, noise_kinds=("wrong_final",)))
    assert collections.Counter(r["metadata"]["category"] for r in no_noise) == {"clean": 50, "redundant": 50}
    with pytest.raises(ValueError):
        TestbedConfig(noise_share=0.7, redundant_share=0.5)


def test_test_set_is_held_out_and_clean(train):
    test = make_test_set(SMALL)
    assert len(test) == SMALL.test_size
    assert all(r["metadata"]["category"] == "clean" for r in test)
    assert not {r["question"] for r in test} & {r["question"] for r in train}
    assert len({r["question"] for r in test}) == len(test)


def test_corpus_never_shows_the_question_answer_format():
    corpus = make_corpus(200, seed=0)
    text = "\n".join(corpus)
    assert "####" not in text and "?" not in text and "<|" not in text
    assert re.search(r"^\d+ [-+*/] \d+ = \d+$", text, re.M)  # plain equations
    assert ANNOTATION.search(text)  # the answers' annotation style
    assert re.search(r"[A-Z][a-z]+ has \d+", text)  # narratives


class Recorder(set):
    """An `exclude` set that records every question make_corpus asks about."""

    def __init__(self, excluded=()):
        super().__init__(excluded)
        self.asked: list[str] = []

    def __contains__(self, question):
        self.asked.append(question)
        return super().__contains__(question)


def test_corpus_skips_excluded_questions():
    everything = Recorder()
    make_corpus(20, seed=0, exclude=everything)
    first = everything.asked[0]
    without_first = Recorder({first})
    corpus = make_corpus(20, seed=0, exclude=without_first)
    assert first in without_first.asked  # drawn, refused, replaced by another problem
    assert corpus[0] != make_corpus(20, seed=0)[0]


def test_jsonl_round_trip(tmp_path, train):
    path = write_jsonl(train, tmp_path / "sub" / "train.jsonl")
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temporary file left
    with open(path, encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == train
    from qtune.data import load_records

    records, report = load_records(path)
    assert report.format == "question_answer" and len(records) == len(train)
    assert records[5].messages[-1]["content"] == train[5]["answer"]
    assert records[5].metadata == train[5]["metadata"]


@pytest.fixture(scope="module")
def tokenizer():
    texts = make_corpus(100, seed=0) + [r["question"] + "\n" + r["answer"] for r in make_train_set(TINY_DATA)]
    return train_tokenizer(texts, vocab_size=400, max_length=256)


def test_tokenizer_splits_digits_and_round_trips(tokenizer):
    tokens = tokenizer.tokenize("She has 1234 + 56 = <<1234+56=1290>>1290 apples.")
    digits = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digits and all(len(t) == 1 for t in digits)
    text = make_train_set(TINY_DATA)[0]["answer"]
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token} == {"<s>", "</s>", "<pad>", "<unk>"}


def test_chat_template_is_prefix_stable_and_ends_turns_with_eos(tokenizer):
    messages = [
        {"role": "system", "content": "Solve the problem."},
        {"role": "user", "content": "Mia has 3 apples. How many?"},
        {"role": "assistant", "content": "3 + 0 = <<3+0=3>>3\n#### 3"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "#### 4"},
    ]
    render = lambda m, gen: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(messages, False)
    for i in range(1, len(messages)):
        assert full.startswith(render(messages[:i], False))
        if messages[i]["role"] == "assistant":
            prompt = render(messages[:i], True)
            upto = render(messages[: i + 1], False)
            assert upto.startswith(prompt)
            assert upto[len(prompt):] == messages[i]["content"] + tokenizer.eos_token
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    with pytest.raises(Exception, match="unknown role"):
        render([{"role": "tool", "content": "x"}], False)


def test_tiny_recipe_builds_caches_and_reloads(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path / "cache"))
    paths = build_testbed(recipe=TINY_RECIPE, config=TINY_DATA, preset="data-starved", progress=False)
    assert paths.root == tmp_path / "cache" / cache_key(TINY_RECIPE, TINY_DATA)
    assert (paths.model_dir / "model.safetensors").is_file()
    assert len(paths.train_path.read_text().splitlines()) == TINY_DATA.train_size
    assert len(paths.test_path.read_text().splitlines()) == TINY_DATA.test_size
    assert [p.name for p in paths.root.parent.iterdir()] == [paths.root.name]  # no temporary folder left

    model = AutoModelForCausalLM.from_pretrained(paths.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths.model_dir)
    assert model.config.model_type == "llama" and tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Mia has 12 apples."}], add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits

    weights = paths.model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    started = time.perf_counter()
    again = build_testbed(recipe=TINY_RECIPE, config=TINY_DATA, preset="data-starved", progress=False)
    assert again == paths and time.perf_counter() - started < 0.5
    assert weights.stat().st_mtime_ns == mtime  # reused, not rebuilt

    rebuilt = build_testbed(tmp_path / "other", recipe=TINY_RECIPE, config=TINY_DATA, preset="data-starved", progress=False, force=True)
    reloaded = AutoModelForCausalLM.from_pretrained(rebuilt.model_dir)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits)  # same recipe, same model
    assert os.listdir(tmp_path / "other") == [rebuilt.root.name]

    build_testbed(recipe=TINY_RECIPE, config=TINY_DATA, preset="data-starved", progress=False, force=True)
    assert weights.stat().st_mtime_ns != mtime  # force rebuilds in place
