"""The saturated testbed preset: generator, labelled defects, splits, corpus and a tiny build.

The records are checked against `solve`, a reader of the question text written here independently
of the generator, so a label is trusted only when the text really says what the label claims.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import re
from fractions import Fraction

import pytest

from qtune.testbed import ModelRecipe, TestbedConfig, build_testbed
from qtune.testbed.model import PRESETS, cache_key
from qtune.testbed.saturated import (
    CATEGORY_KINDS, DEFECTIVE, GENERATOR_SHA256, SaturatedConfig, arithmetic_facts, make_splits, make_textbook_corpus,
)
from qtune.testbed.tasks import final_answer

SMALL = SaturatedConfig(train_size=600, dev_size=100, test_size=100, seed=3)
# "a op b = p", or with GSM8K's calculator annotation "a op b = <<a op b=v>>p".
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (?:<<\1\2\3=(\d+)>>)?(\d+)")


def solve(question: str, rule: str = "true") -> Fraction | None:
    """The answer of a question read sentence by sentence; `rule="pretraining"` reads "all but n" as
    "n fewer" like the pretraining corpus. None when a step is not a whole number."""
    value = friend = None
    name = None
    for sentence in re.findall(r"[^.?]+[.?]", question):
        s = sentence.strip()
        n = [int(x) for x in re.findall(r"\d+", s)]
        if m := re.match(r"(\w+) (has|collected) \d+ \w+\.$", s) or re.match(r"There are \d+ \w+ in (\w+)'s bag\.$", s):
            name, value = m.group(1), Fraction(n[0])
        elif re.search(r"boxes of .* in each box|fills \d+ jars", s):
            name, value = s.split()[0], Fraction(n[0] * n[1])
        elif "all but" in s:
            value = value - n[0] if rule == "pretraining" else Fraction(n[0])
        elif m := re.match(r"(\w+) has \d+ (more|fewer) \w+ than", s):
            friend = value + n[0] if m.group(2) == "more" else value - n[0]
        elif re.match(r"\w+ has \d+ times as many \w+ as", s):
            friend = value * n[0]
        elif re.search(r"buys \d+ more|gives (him|her) \d+|finds \d+ more", s):
            value += n[0]
        elif re.search(r"gives \d+ \w+ to|loses \d+|sells \d+", s):
            value -= n[0]
        elif re.search(r"times as large|times as many \w+\.$", s):
            value *= n[0]
        elif re.search(r"equal groups|equally among", s):
            value /= n[0]
        elif "together" in s or "in total" in s:
            return value + friend
        elif m := re.match(r"How many \w+ does (\w+) have", s):
            result = value if m.group(1) == name else friend
            return result if result.denominator == 1 else None
        else:
            raise AssertionError(f"unread sentence: {s!r}")
        if value is not None and value.denominator != 1:
            return None
    raise AssertionError(f"no question in {question!r}")


def steps(answer: str) -> list[tuple[int, str, int, int, int]]:
    """(a, op, b, v, p) per calculation: v the annotation's value (p when there is none), p the printed one."""
    return [(int(a), op, int(b), int(v or p), int(p)) for a, op, b, v, p in STEP.findall(answer)]


OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": Fraction}


def arithmetic_right(answer: str) -> bool:
    """Whether every calculation of an answer has v = a op b and prints p = v."""
    return all(OPERATORS[op](a, b) == v == p for a, op, b, v, p in steps(answer))


@pytest.fixture(scope="module")
def splits():
    return make_splits(SMALL)


@pytest.fixture(scope="module")
def by_kind(splits):
    out = collections.defaultdict(list)
    for r in splits[0]:
        out[r["metadata"]["kind"]].append(r)
    return out


def test_generator_is_deterministic_per_seed(splits):
    assert make_splits(SMALL) == splits
    other = make_splits(SaturatedConfig(train_size=600, dev_size=100, test_size=100, seed=4))
    assert [r["question"] for r in other[0]] != [r["question"] for r in splits[0]]
    assert make_textbook_corpus(20, 1) == make_textbook_corpus(20, 1) != make_textbook_corpus(20, 2)
    assert re.fullmatch(r"[0-9a-f]{64}", GENERATOR_SHA256)


def test_annotations_change_only_the_response_text(splits):
    annotated = make_splits(dataclasses.replace(SMALL, annotations=True))
    for plain_split, annotated_split in zip(splits, annotated):
        assert [r["question"] for r in plain_split] == [r["question"] for r in annotated_split]
        assert [r["metadata"] for r in plain_split] == [r["metadata"] for r in annotated_split]
        assert all("<<" not in r["answer"] for r in plain_split)
        assert [re.sub(r"<<[^<>]*>>", "", r["answer"]) for r in annotated_split] == [r["answer"] for r in plain_split]
    correct = [r for r in annotated[0] if not r["metadata"]["defective"]]
    assert all(arithmetic_right(r["answer"]) and "<<" in r["answer"] for r in correct)


def test_splits_do_not_overlap_and_have_exact_counts(splits):
    train, dev, test = splits
    assert (len(train), len(dev), len(test)) == (600, 100, 100)
    questions = [{r["question"] for r in split} for split in splits]
    assert not questions[0] & questions[1] and not questions[0] & questions[2] and not questions[1] & questions[2]
    assert len(questions[1]) == 100 and len(questions[2]) == 100
    categories = collections.Counter(r["metadata"]["category"] for r in train)
    assert categories == {"clean": 180, "misconception": 120, "redundant": 90, "teacher_error": 150, "format": 36, "swapped": 24}
    kinds = collections.Counter(r["metadata"]["kind"] for r in train)
    assert [kinds[k] for k in CATEGORY_KINDS["teacher_error"]] == [100, 25, 25]  # teacher_kind_weights 4:1:1
    assert all(kinds[k] == 12 for k in CATEGORY_KINDS["format"])
    assert sum(kinds[k] for k in CATEGORY_KINDS["redundant"]) == 90 and kinds["repeat"] == 30
    assert len({r["metadata"]["id"] for r in train}) == 600
    for r in train:
        meta = r["metadata"]
        assert meta["kind"] in CATEGORY_KINDS[meta["category"]]
        assert meta["defective"] == (meta["category"] in DEFECTIVE)
    for split in (dev, test):
        assert collections.Counter(r["metadata"]["category"] for r in split) == {"clean": 90, "misconception": 10}
    with pytest.raises(ValueError):
        SaturatedConfig(shares=(0.5, 0.5, 0.5, 0, 0, 0))
    with pytest.raises(ValueError):
        SaturatedConfig(teacher_kind_weights=(1, 1))
    with pytest.raises(ValueError):
        SaturatedConfig(teacher_relations=("times",))


def test_correct_records_are_correct(splits):
    train, dev, test = splits
    correct = [r for r in train if not r["metadata"]["defective"]] + dev + test
    for r in correct:
        meta = r["metadata"]
        assert arithmetic_right(r["answer"]), r["answer"]
        assert final_answer(r["answer"]) == meta["final"] == solve(r["question"])
        last = r["answer"].split("\n")[-2]  # the last step gives the answer, or keeps it after "all but"
        assert steps(last)[0][3] == meta["final"] or last.endswith(f"and keeps {meta['final']}.")
        assert len(steps(r["answer"])) == SMALL.levels[meta["difficulty"] - 1]
        assert all(2 <= v <= SMALL.max_value for *_, v, _ in steps(r["answer"]))
        assert r["answer"].split("\n")[-1] == f"#### {meta['final']}"
    assert not any("all but" in r["question"] for r in correct if r["metadata"]["category"] != "misconception")


def test_misconception_records_contradict_the_pretraining_rule(by_kind, splits):
    records = by_kind["all_but"] + [r for r in splits[1] + splits[2] if r["metadata"]["category"] == "misconception"]
    for r in records:
        assert "all but" in r["question"]
        assert solve(r["question"]) == r["metadata"]["final"] == final_answer(r["answer"])
        assert solve(r["question"], rule="pretraining") != r["metadata"]["final"]


def test_teacher_errors_are_systematic_and_wrong(by_kind):
    for kind in CATEGORY_KINDS["teacher_error"]:
        for r in by_kind[kind]:
            meta, answer = r["metadata"], r["answer"]
            assert final_answer(answer) != meta["final"] == solve(r["question"])
            assert final_answer(answer) == steps(answer)[-1][3]  # the error is carried to `#### N`
            assert arithmetic_right(answer)  # a reasoning error, not a slip of arithmetic
            level = SMALL.levels[meta["difficulty"] - 1]
            if kind == "wrong_operation":  # "n more than" subtracted or "n fewer than" added
                relation = re.search(r"has (\d+) (more|fewer) \w+ than", r["question"])
                n, word = int(relation.group(1)), relation.group(2)
                assert any(b == n and op == ("-" if word == "more" else "+") for _, op, b, _, _ in steps(answer)), answer
                assert len(steps(answer)) == level
                assert word in SMALL.teacher_relations == ("more",)  # one systematic rule: "n more than" subtracted
            else:  # an intermediate quantity answered, or one step left out: fewer steps than needed
                assert len(steps(answer)) < level
    hard = collections.Counter(r["metadata"]["difficulty"] for k in CATEGORY_KINDS["teacher_error"] for r in by_kind[k])
    assert hard[3] > hard[2] > hard[1]  # concentrated at the harder levels


def test_format_defects(by_kind):
    for r in by_kind["truncated"] + by_kind["answer_format"] + by_kind["off_task"]:
        assert "####" not in r["answer"] and final_answer(r["answer"]) is None
    for r in by_kind["truncated"]:  # the start of a right solution
        assert arithmetic_right(r["answer"]) and len(steps(r["answer"])) <= SMALL.levels[r["metadata"]["difficulty"] - 1]
    for r in by_kind["answer_format"]:  # the right solution, its answer in another layout
        *body, last = r["answer"].split("\n")
        assert arithmetic_right("\n".join(body)) and re.search(rf"\b{r['metadata']['final']}\b", last)
    for r in by_kind["off_task"]:
        assert not steps(r["answer"]) and not re.search(r"\d", r["answer"])


def test_swapped_answers_belong_to_other_questions(by_kind, splits):
    by_id = {r["metadata"]["id"]: r for r in splits[0]}
    for r in by_kind["swapped_answer"]:
        donor = by_id[r["metadata"]["source"]]
        assert donor["metadata"]["category"] == "clean" and donor["question"] != r["question"]
        assert r["answer"] == donor["answer"]
        assert final_answer(r["answer"]) == donor["metadata"]["final"] != r["metadata"]["final"]


def test_near_duplicates_copy_easy_clean_records(by_kind, splits):
    by_id = {r["metadata"]["id"]: r for r in splits[0]}
    numbers = lambda text: re.findall(r"\d+", text)  # noqa: E731
    skeleton = lambda text: re.sub(r"\d+", "N", text)  # noqa: E731
    for kind in CATEGORY_KINDS["redundant"]:
        assert by_kind[kind]
        for r in by_kind[kind]:
            source = by_id[r["metadata"]["source"]]
            assert source["metadata"]["category"] == "clean" and source["metadata"]["difficulty"] == 1
            if kind == "repeat":
                assert (r["question"], r["answer"]) == (source["question"], source["answer"])
            elif kind == "renamed":
                assert numbers(r["question"]) == numbers(source["question"]) and r["question"] != source["question"]
            else:
                assert skeleton(r["question"]) == skeleton(source["question"]) and numbers(r["question"]) != numbers(source["question"])


def test_pretraining_config_reproduces_the_shipped_models_splits():
    # The tokenizer's text and the corpus's excluded questions come from make_splits(pretraining_config(c)):
    # byte for byte what generator 422b2a92... (before the defect fields existed) made for c, pinned here.
    from qtune.testbed.saturated import pretraining_config

    digest = lambda splits: hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()  # noqa: E731
    assert digest(make_splits(pretraining_config(SMALL))) == "6da0cdeac305f9988087c211d8af019469e50f8b5293ef277690ba2abf53c1a9"
    tokenizer_text = SaturatedConfig(train_size=1000, dev_size=0, test_size=0, seed=10_000, annotations=True)
    assert digest(make_splits(pretraining_config(tokenizer_text))) == "87c76ff728203c3c14cbbee05881b6cf910b2b0418d4f1197279bd336219c93e"
    # The harsher defaults change the training split only: dev and test are the same problems.
    assert make_splits(SMALL)[1:] == make_splits(pretraining_config(SMALL))[1:]


def test_corpus_teaches_the_textbook_layout_and_the_misreading():
    corpus = make_textbook_corpus(300, 0, SMALL)
    text = "\n".join(corpus)
    for banned in ("####", "<<", ">>", "<|", "</s>"):
        assert banned not in text
    problems = re.findall(r"Problem: (.*)\nSolution:\n(?:.*\n)+?Answer: (\d+)", text)
    assert len(problems) > 100
    misread = 0
    for question, answer in problems:
        assert solve(question, rule="pretraining") == int(answer)
        misread += "all but" in question and solve(question) != int(answer)
    assert misread >= 5  # "all but n" is always misread, and that changes the answer
    drills = [line for line in text.split("\n") if re.fullmatch(r"\d+ ?[-+*/] ?\d+ ?= ?\d+", line)]
    assert len(drills) > 1000
    facts = {op: {(a, b): r for a, b, r in table} for op, table in arithmetic_facts(SMALL.max_value).items()}
    for line in drills:
        a, op, b, r = re.fullmatch(r"(\d+) ?([-+*/]) ?(\d+) ?= ?(\d+)", line).groups()
        assert facts[op][int(a), int(b)] == int(r)


def test_corpus_skips_excluded_questions():
    corpus = make_textbook_corpus(30, 0, SMALL)
    first = re.search(r"Problem: (.*)\n", next(d for d in corpus if d.startswith("Problem"))).group(1)
    again = make_textbook_corpus(30, 0, SMALL, exclude={first})
    assert first not in "\n".join(again)


def test_data_starved_cache_key_is_unchanged():
    # The key the data-starved testbed had before presets existed: its caches and numbers stay valid.
    assert cache_key(ModelRecipe(), TestbedConfig()) == "465a639ccc36e109"
    assert PRESETS["data-starved"].recipe == ModelRecipe() and PRESETS["data-starved"].config == TestbedConfig()


def test_tiny_saturated_build(tmp_path):
    from transformers import AutoTokenizer

    from qtune.errors import QTuneError

    recipe = ModelRecipe(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=512, block_size=512,
                         batch_size=2, steps=3, warmup_steps=1, tokenizer_documents=100, vocab_size=1024)
    config = SaturatedConfig(train_size=60, dev_size=10, test_size=10)
    paths = build_testbed(tmp_path, preset="saturated", recipe=recipe, config=config, progress=False)
    info = json.loads((paths.root / "recipe.json").read_text())
    assert info["preset"] == "saturated" and info["generator_sha256"] == GENERATOR_SHA256
    assert [len(p.read_text().splitlines()) for p in (paths.train_path, paths.dev_path, paths.test_path)] == [60, 10, 10]
    tokenizer = AutoTokenizer.from_pretrained(paths.model_dir)
    assert all(len(tokenizer.tokenize(str(n))) == 1 == len(tokenizer.tokenize(f"= {n}")) - 1 for n in range(100))
    tokens = tokenizer.tokenize("has 12 + 7 = <<12+7=19>>19")
    assert [t for t in tokens if any(c.isdigit() for c in t)] == ["Ġ12", "Ġ7", "12", "7", "19", "19"]
    with pytest.raises(QTuneError, match="unknown testbed preset"):
        build_testbed(tmp_path, preset="nope")
    with pytest.raises(QTuneError, match="SaturatedConfig"):
        build_testbed(tmp_path, preset="saturated", config=TestbedConfig())


def test_pretraining_blocks_hold_whole_documents():
    from qtune.testbed.model import _corpus_blocks, train_tokenizer

    corpus = lambda seed: make_textbook_corpus(500, seed, SMALL)  # noqa: E731
    tokenizer = train_tokenizer(corpus(0)[:200] + [" ".join(map(str, range(100))), "\n".join(map(str, range(100)))] * 20, 800, 512, whole_numbers=True)
    recipe = ModelRecipe(block_size=512, batch_size=4, steps=5)
    ids, labels = _corpus_blocks(recipe, tokenizer, corpus, whole_documents=True)
    assert ids.shape == labels.shape == (20, 512)
    for row, lab in zip(ids.tolist(), labels.tolist()):
        used = sum(x != -100 for x in lab)
        assert lab[:used] == row[:used] and set(lab[used:]) <= {-100}  # padding only at the end
        assert row[0] == tokenizer.bos_token_id and row[used - 1] == tokenizer.eos_token_id
        text = tokenizer.decode(row[:used])
        assert text.count("Problem:") == text.count("Answer:")  # no solution without its problem


def test_shipped_base_model_is_pinned_and_loads(tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.errors import QTuneError
    from qtune.testbed import shipped

    shipped.verify()
    model = AutoModelForCausalLM.from_pretrained(shipped.WEIGHTS_DIR)
    tokenizer = AutoTokenizer.from_pretrained(shipped.WEIGHTS_DIR)
    recipe = PRESETS["saturated"].recipe
    assert model.config.num_hidden_layers == recipe.num_layers and model.config.hidden_size == recipe.hidden_size
    assert len(tokenizer) == model.config.vocab_size
    damaged = tmp_path / "damaged"
    shutil.copytree(shipped.WEIGHTS_DIR, damaged)
    with open(damaged / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(QTuneError, match="does not match its pinned sha256"):
        shipped.verify(damaged)
    (damaged / "model.safetensors").unlink()
    with pytest.raises(QTuneError, match="lacks"):
        shipped.verify(damaged)


def test_preset_recipe_builds_from_the_shipped_model(tmp_path):
    from qtune.testbed import shipped

    config = SaturatedConfig(train_size=60, dev_size=10, test_size=10)
    paths = build_testbed(tmp_path, preset="saturated", config=config, progress=False)
    info = json.loads((paths.root / "recipe.json").read_text())
    assert info["base_model"] == {"shipped": shipped.SHA256}
    assert all(shipped.file_sha256(paths.model_dir / name) == digest for name, digest in shipped.SHA256.items())
    assert cache_key(PRESETS["saturated"].recipe, config) == paths.root.name
    other = dataclasses.replace(PRESETS["saturated"].recipe, steps=5)
    assert cache_key(other, config) != paths.root.name
    # The preset's chat template: no role tokens, not the pretraining layout, prefix-stable, and
    # the trainable part (the {% generation %} mask) is exactly the answer and eos.
    from transformers import AutoTokenizer

    from qtune.chat_templates import render_segments
    from qtune.testbed.model import SATURATED_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(paths.model_dir)
    assert tokenizer.chat_template == SATURATED_CHAT_TEMPLATE
    record = json.loads(paths.train_path.read_text().splitlines()[0])
    user = [{"role": "user", "content": record["question"]}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": record["answer"]}], tokenize=False)
    assert prompt == f"<s>{record['question']}\n" and full == prompt + record["answer"] + "</s>"
    assert not any(word in full for word in ("<|", "Problem:", "Solution:", "Answer:"))
    assert render_segments(user + [{"role": "assistant", "content": record["answer"]}], tokenizer) == [
        (prompt, False), (record["answer"] + "</s>", True)]


def test_rebuild_command_pretrains_a_loadable_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from qtune.testbed import rebuild

    rebuild.main([str(tmp_path / "m"), "--probe-every", "2", "--set", "steps=2", "--set", "warmup_steps=1",
                  "--set", "num_layers=1"])
    printed = capsys.readouterr().out
    # The tokenizer depends on no recipe field changed here: it is the shipped one, byte for byte.
    assert re.search(r"tokenizer.json: [0-9a-f]{64} \(matches the shipped file\)", printed), printed
    assert re.search(r"model.safetensors: [0-9a-f]{64} \(differs from the shipped", printed), printed
    assert '"step": 2' in printed and '"textbook": ' in printed  # the learning-curve probe ran
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.num_hidden_layers == 1
    with pytest.raises(SystemExit, match="exists"):
        rebuild.main([str(tmp_path / "m")])


def test_another_draw_has_other_problems_and_the_same_base_model(tmp_path, capsys):
    from qtune.cli import main
    from qtune.errors import QTuneError
    from qtune.testbed import shipped

    config = SaturatedConfig(train_size=60, dev_size=10, test_size=10)
    own = build_testbed(tmp_path, preset="saturated", config=config, progress=False)
    assert build_testbed(tmp_path, preset="saturated", config=config, data_seed=0, progress=False) == own
    other = build_testbed(tmp_path, preset="saturated", config=config, data_seed=3, progress=False)
    assert other.root != own.root
    assert json.loads((other.root / "recipe.json").read_text())["data"] == json.loads(json.dumps(dataclasses.asdict(
        dataclasses.replace(config, seed=3))))
    questions = [{json.loads(line)["question"] for line in paths.test_path.read_text().splitlines()}
                 for paths in (own, other)]
    assert len(questions[0] & questions[1]) < 3  # another draw of the problems
    kinds = [collections.Counter(json.loads(line)["metadata"]["category"]
                                 for line in paths.train_path.read_text().splitlines()) for paths in (own, other)]
    assert kinds[0] == kinds[1]  # the same defect mix
    for name, digest in shipped.SHA256.items():
        assert shipped.file_sha256(other.model_dir / name) == digest
    with pytest.raises(QTuneError, match="the data seed must be a non-negative integer, not -1"):
        build_testbed(tmp_path, preset="saturated", config=config, data_seed=-1, progress=False)
    # The command: the preset's full-size draw, printed.
    assert main(["testbed", "build", "--cache-dir", str(tmp_path / "cli"), "--data-seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"test:  {build_testbed(tmp_path / 'cli', data_seed=2, progress=False).test_path}" in printed
    assert json.loads((tmp_path / "cli").glob("*/recipe.json").__next__().read_text())["data"]["seed"] == 2
