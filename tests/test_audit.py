"""`qtune audit`: planting, span-to-token mapping, exact drop shares, the verdict rule, contamination
and its gate in `qtune pipeline` and `qtune bench`, and the command end to end on the testbed."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

import qtune.train
from qtune.audit.decisions import (ScoredBatch, drop_counts, pruned_tokens, rule_rows, selection_rows, tally_tokens,
                                   token_masks)
from qtune.audit.planting import (CUT_RANGE, KINDS, OFF_TASK_REPLIES, UNPLANTED_DEFECTIVE, UNTOUCHED, answer_of,
                                  draw_sample, kind_counts, plant)
from qtune.audit.spans import response_token_flags
from qtune.audit.verdict import judge, summarize
from qtune.cli import main
from qtune.config import AuditConfig
from qtune.contamination import check_contamination, find_contamination, normalize, word_ngrams
from qtune.data import Record, collate, tokenize_records
from qtune.errors import QTuneError
from qtune.methods import build_method
from qtune.scoring import BatchScores, DatasetScores

NAMES = ["Ann", "Tom", "Mia", "Leo", "Ava", "Sam", "Zoe", "Ben"]


def gsm8k_record(i: int) -> Record:
    """A GSM8K-style record: two calculation lines (the first with a calculator annotation) and `#### N`."""
    a, b, c = 10 + i, 2 + i % 5, 3 + i % 7
    answer = (f"{NAMES[i % 8]} buys {a}*{b} = <<{a}*{b}={a * b}>>{a * b} apples.\n"
              f"Then {a * b} + {c} = {a * b + c} apples in all.\n#### {a * b + c}")
    question = f"{NAMES[i % 8]} buys {a} bags of {b} apples and finds {c} more. How many apples (case {i})?"
    return Record(i, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                  {"defective": i % 5 == 0})


def text_record(i: int) -> Record:
    """A record without a final `#### N`: three sentences."""
    answer = f"The sky is blue in case {i}. Water boils at {100 + i} degrees! Number {i} is the answer here."
    return Record(i, [{"role": "user", "content": f"Tell me three facts, number {i}."},
                      {"role": "assistant", "content": answer}], {"defective": False})


def records(n: int = 60) -> list[Record]:
    return [gsm8k_record(i) if i % 2 else text_record(i) for i in range(n)]


# --- planting ------------------------------------------------------------------------------------


def test_planting_is_deterministic_per_seed_and_splits_the_share_over_the_kinds():
    data = records()
    first, again, other = plant(data, 0.3, seed=4), plant(data, 0.3, seed=4), plant(data, 0.3, seed=5)
    as_rows = lambda planted: [(r.messages, r.metadata) for r in planted]  # noqa: E731
    assert as_rows(first) == as_rows(again) and as_rows(first) != as_rows(other)
    counts = {kind: sum(r.metadata["audit"]["kind"] == kind for r in first) for kind in (*KINDS, UNTOUCHED)}
    assert {k: counts[k] for k in KINDS} == kind_counts(18) == {"swapped": 3, "corrupted": 3, "truncated": 3,
                                                                "off_task": 3, "duplicate_exact": 3,
                                                                "duplicate_near": 3}
    assert counts[UNTOUCHED] == 60 - 18
    assert [r.sample_id for r in first] == list(range(60))
    assert [r.metadata["audit"]["record"] for r in first] == [r.sample_id for r in data]
    # The sample is a uniform draw in file order, the same for the same seed.
    assert draw_sample(data, 10, 3) == draw_sample(data, 10, 3) != draw_sample(data, 10, 4)
    assert [r.sample_id for r in draw_sample(data, 10, 3)] == sorted(r.sample_id for r in draw_sample(data, 10, 3))


@pytest.mark.parametrize("seed", range(4))
def test_each_planted_kind_is_what_it_says(seed):
    data = records()
    planted = plant(data, 0.5, seed=seed)
    for record in planted:
        label = record.metadata["audit"]
        kind, original = label["kind"], data[record.sample_id]
        answer, before = answer_of(record.messages), answer_of(original.messages)
        source = None if label["source"] is None else data[label["source"]]
        if source is not None:  # sources are records left untouched
            assert planted[label["source"]].metadata["audit"]["kind"] == UNTOUCHED
        spanned = [answer[a:b] for a, b in label["spans"]]
        if kind == UNTOUCHED:
            assert record.messages == original.messages and label["spans"] == []
        elif kind == "swapped":
            assert answer == answer_of(source.messages) != before and spanned == [answer]
            assert record.messages[0] == original.messages[0]
        elif kind == "corrupted" and "####" in before:
            old_lines, new_lines = before.split("\n"), answer.split("\n")
            old_final, new_final = (re.search(r"#### (\d+)", t).group(1) for t in (old_lines[-1], new_lines[-1]))
            assert old_final != new_final and spanned[-1] == new_final
            changed = [k for k, (x, y) in enumerate(zip(old_lines[:-1], new_lines[:-1])) if x != y]
            assert len(changed) == 1  # exactly one intermediate result changed
            line_old, line_new = old_lines[changed[0]], new_lines[changed[0]]
            result_old = re.findall(r"\d+", line_old[line_old.rindex("="):])[0]
            result_new = re.findall(r"\d+", line_new[line_new.rindex("="):])[0]
            assert result_old != result_new and all(s == result_new for s in spanned[:-1])
            assert abs(int(result_new) - int(result_old)) <= 9 and abs(int(new_final) - int(old_final)) <= 9
        elif kind == "corrupted":  # no final number: one sentence replaced by a sentence of another answer
            (start, end), = label["spans"]
            assert answer[start:end] in answer_of(source.messages) and answer[start:end] not in before
            assert answer[:start] == before[:start] and answer[end:] == before[len(before) - len(answer) + end:]
        elif kind == "truncated":
            assert before.startswith(answer) and 0 < len(answer) <= CUT_RANGE[1] * len(before)
            assert before.split("\n")[-1] not in answer and label["spans"] == []
        elif kind == "off_task":
            assert answer in OFF_TASK_REPLIES and spanned == [answer]
        elif kind == "duplicate_exact":
            assert record.messages == source.messages and source.sample_id != record.sample_id
        else:
            assert kind == "duplicate_near"
            assert record.messages != source.messages
            assert [normalize(m["content"]) for m in record.messages] == [normalize(m["content"])
                                                                          for m in source.messages]


def test_planting_into_clean_records_leaves_the_labelled_defects_alone():
    data = records()
    planted = plant(data, 0.2, seed=0, into="clean")
    for record, original in zip(planted, data):
        kind = record.metadata["audit"]["kind"]
        if original.metadata["defective"]:
            assert kind == UNPLANTED_DEFECTIVE and record.messages == original.messages
        assert record.metadata["defective"] == original.metadata["defective"]
    assert sum(r.metadata["audit"]["kind"] in KINDS for r in planted) == 12
    unlabelled = [Record(i, r.messages, {}) for i, r in enumerate(data)]
    with pytest.raises(QTuneError, match="metadata.defective"):
        plant(unlabelled, 0.2, seed=0, into="clean")
    with pytest.raises(QTuneError, match="--plant"):
        plant(data[:3], 0.1, seed=0)


@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "plain_tokenizer"])
def test_planted_spans_become_the_tokens_that_spell_them(fixture, request):
    tokenizer = request.getfixturevalue(fixture)
    planted = [r for r in plant(records(), 0.5, seed=1) if r.metadata["audit"]["kind"] == "corrupted"]
    samples, _ = tokenize_records(planted, tokenizer, max_length=512)
    assert planted and len(samples) == len(planted)
    for record, sample in zip(planted, samples):
        flags = response_token_flags(record, sample, tokenizer)
        response = [t for t, label in zip(sample["input_ids"][1:], sample["labels"][1:]) if label != -100]
        assert flags is not None and len(flags) == len(response) and any(flags)
        flagged = tokenizer.decode([t for t, f in zip(response, flags) if f])
        answer = answer_of(record.messages)
        for a, b in record.metadata["audit"]["spans"]:
            assert answer[a:b] in flagged
        unflagged = tokenizer.decode([t for t, f in zip(response, flags) if not f])
        assert len(unflagged) > len(flagged)


# --- exact drop shares on a hand-made scored batch -------------------------------------------------


def hand_batch(lengths: list[int], ppl: list[float], nll: torch.Tensor | None = None) -> ScoredBatch:
    """One batch whose sample i has id i, `lengths[i]` response tokens after a one-token prompt, and
    the given PPL (entropy 1); token NLLs `nll` [B, L] on the response positions (default 1)."""
    samples = [{"sample_id": i, "input_ids": [5] * (n + 1), "attention_mask": [1] * (n + 1),
                "labels": [-100] + [5] * n} for i, n in enumerate(lengths)]
    batch = collate(samples, pad_token_id=0)
    response = batch["labels"] != -100
    response[:, 0] = False
    token_nll = (torch.ones(response.shape) if nll is None else nll) * response
    scores = BatchScores(token_nll, response.float(), response, torch.tensor(ppl), torch.ones(len(lengths)),
                         response.sum(1))
    return ScoredBatch(batch, scores)


def test_drop_shares_are_exact_on_a_hand_made_scored_batch(tmp_path):
    cfg = AuditConfig(data="unused", out=str(tmp_path), r_sample=0.25, ppl_keep="high")
    kinds = {0: "swapped", 1: "swapped", 2: UNTOUCHED, 3: UNTOUCHED, 4: UNTOUCHED, 5: "truncated", 6: UNTOUCHED,
             7: "truncated"}
    batch = hand_batch(lengths=[3, 9, 2, 4, 5, 6, 7, 8], ppl=[9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0])
    # longest keeps keep_count(0.25, 8) = 2 samples: the longest, 1 (9 tokens) and 7 (8 tokens).
    longest = drop_counts(rule_rows(build_method("longest+all", cfg), [batch]), kinds)
    assert longest == {"swapped": (1, 2), "truncated": (1, 2), UNTOUCHED: (4, 4)}
    # perplexity (high) keeps the two highest PPL: 0 (9.0) and 7 (8.0).
    perplexity = drop_counts(rule_rows(build_method("perplexity+all", cfg), [batch]), kinds)
    assert perplexity == {"swapped": (1, 2), "truncated": (1, 2), UNTOUCHED: (4, 4)}
    entry = summarize(longest, ["swapped", "truncated"], UNTOUCHED)
    assert entry["drop_share"] == {"swapped": 0.5, "truncated": 0.5, UNTOUCHED: 1.0}
    assert entry["n"] == {"swapped": 2, "truncated": 2, UNTOUCHED: 4}
    # A static selection as one row: every sample but the kept ones dropped.
    assert drop_counts(selection_rows(list(range(8)), [2, 3, 5]), kinds) == {
        "swapped": (2, 2), "truncated": (1, 2), UNTOUCHED: (2, 4)}


def test_token_rule_prune_shares_are_exact(tmp_path):
    cfg = AuditConfig(data="unused", out=str(tmp_path), r_token=0.7)
    nll = torch.zeros(2, 11)
    nll[0, 1:11] = torch.tensor([1, 2, 9, 3, 8, 1, 1, 1, 7, 1.0])  # the three highest at 3, 5, 9: pruned
    nll[1, 1:11] = torch.arange(10.0)
    batch = hand_batch(lengths=[10, 10], ppl=[2.0, 2.0], nll=nll)
    # Sample 0's planted tokens: response tokens 2 and 4 (NLL 9 and 8) and 0 (NLL 1).
    flags = {0: [True, False, True, False, True] + [False] * 5}
    counts = tally_tokens(pruned_tokens(token_masks("perplexity", cfg, [batch]), [batch]), flags)
    assert counts == {"planted": [2, 3], "other": [1, 7]}
    # Random keeps keep_count(0.7, 10) = 7 of every sample's 10 tokens: 3 pruned in all.
    random_counts = tally_tokens(pruned_tokens(token_masks("random", cfg, [batch]), [batch]), flags)
    assert random_counts["planted"][0] + random_counts["other"][0] == 3


# --- the verdict rule ----------------------------------------------------------------------------


def test_a_selector_that_drops_at_random_is_judged_random_within_sampling_error(tmp_path):
    # The real random selection at 0.25, over 1,000 untouched records and 6 x 40 planted ones.
    kinds = {i: UNTOUCHED for i in range(1000)} | {1000 + i: KINDS[i % 6] for i in range(240)}
    scores = DatasetScores(list(kinds), [5] * len(kinds), None, None, None, None, 0.0, 0)
    same = 0
    for seed in range(40):
        kept = build_method("random", AuditConfig(data="unused", out=str(tmp_path), seed=seed)).select_dataset(scores)
        entry = summarize(drop_counts(selection_rows(list(kinds), kept.sample_ids), kinds), KINDS, UNTOUCHED)
        assert entry["drop_share"][UNTOUCHED] == pytest.approx(0.75, abs=0.03)
        same += sum(v == "same" for v in entry["verdict"].values())
    # Each interval covers the true difference (0) about 95% of the time.
    assert 0.9 <= same / (40 * 6) <= 1.0
    # Seeded draws of a random rule: the share of "same" verdicts is the interval's coverage.
    rng = random.Random(0)
    hits = [judge(sum(rng.random() < 0.6 for _ in range(40)), 40, sum(rng.random() < 0.6 for _ in range(800)), 800)
            for _ in range(1000)]
    assert 0.93 <= sum(v.verdict == "same" for v in hits) / 1000 <= 0.98


def test_a_selector_that_drops_only_swapped_answers_gets_the_right_verdicts():
    kinds = {i: UNTOUCHED for i in range(300)} | {300 + i: KINDS[i % 6] for i in range(60)}
    kept = [i for i, kind in kinds.items() if kind != "swapped"]
    entry = summarize(drop_counts(selection_rows(list(kinds), kept), kinds), KINDS, UNTOUCHED)
    assert entry["verdict"] == {"swapped": "more", **{k: "same" for k in KINDS[1:]}}
    assert entry["sentence"].startswith("Drops 100% of swapped answers and none of the untouched records;")
    # Dropping swapped answers 3x as often as untouched ones, and keeping truncated ones.
    counts = {UNTOUCHED: (240, 800), "swapped": (31, 33), "truncated": (0, 33), "off_task": (10, 33)}
    entry = summarize(counts, ["swapped", "truncated", "off_task"], UNTOUCHED)
    assert entry["verdict"] == {"swapped": "more", "truncated": "less", "off_task": "same"}
    assert "drops swapped answers 3.1x as often as untouched records (94% vs 30%)" in entry["sentence"].lower()
    assert "off-task answers at random's rate" in entry["sentence"]
    assert "drops none of the truncated answers (against 30% of untouched records): worse than random" in \
        entry["sentence"]


# --- contamination -------------------------------------------------------------------------------

QUESTION = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
            "her friends every day with four.")


def qa(i: int, question: str, answer: str = "It is 18.") -> Record:
    return Record(i, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])


def test_contamination_counts_exact_and_13_gram_overlaps_on_hand_made_pairs():
    words = QUESTION.split()
    evaluation = [qa(0, QUESTION), qa(1, "What is two plus two?"), qa(2, "An unrelated question about cats.")]
    train = [
        qa(0, "JANET'S ducks lay 16 eggs per day!!  She eats three for breakfast every morning, and bakes muffins "
              "for her friends every day with four"),  # exact after normalisation
        qa(1, "Another question.", "Recall: " + " ".join(words[3:16]) + " and so on."),  # 13 words in the answer
        qa(2, "Another question.", "Recall: " + " ".join(words[3:15]) + " and so on."),  # only 12 words
        qa(3, "what is two plus two"),  # exact: fewer than 13 words, found by the exact check only
        qa(4, "A question about dogs."),
    ]
    assert len(word_ngrams(QUESTION)) == len(words) - 12 and word_ngrams("too short") == []
    found = find_contamination(train, evaluation)
    assert found.train_ids == [0, 1, 3] and found.eval_ids == [0, 1]
    assert (found.exact_train, found.ngram_train) == (2, 2)  # record 0 is both
    assert [(p.train_id, p.eval_id, p.how) for p in found.pairs] == [(0, 0, "exact"), (1, 0, "13-gram"),
                                                                     (3, 1, "exact")]
    assert found.pairs[1].shared == normalize(" ".join(words[3:16]))
    assert found.eval_share == pytest.approx(2 / 3)


def write_records(path, rows: list[Record]):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"question": r.messages[0]["content"], "answer": r.messages[1]["content"]}) + "\n")
    return str(path)


def test_the_check_stops_above_the_threshold_and_names_the_pairs(tmp_path):
    evaluation = write_records(tmp_path / "eval.jsonl", [qa(i, f"{QUESTION} Case {i}.") for i in range(50)])
    clean = [qa(i, f"A training question number {i} about something else.") for i in range(20)]
    train = write_records(tmp_path / "train.jsonl", clean + [qa(20, f"{QUESTION} Case 7.")])
    with pytest.raises(QTuneError) as error:
        check_contamination(train, evaluation, threshold=0.01, allow=False, command="qtune x")
    message = str(error.value)
    assert "qtune x:" in message and "train record 20 ~ eval record" in message and "--allow-contamination" in message
    # Below the threshold (every eval record shares the 13-grams: 50 of 50), or allowed: it goes on.
    assert check_contamination(train, evaluation, threshold=1.0, allow=False, command="x").eval_share == 1.0
    assert check_contamination(train, evaluation, threshold=0.01, allow=True, command="x").train_ids == [20]
    only_clean = write_records(tmp_path / "clean.jsonl", clean)
    assert check_contamination(only_clean, evaluation, threshold=0.0, allow=False, command="x").train_ids == []


def test_planted_overlap_stops_a_pipeline_before_training_and_allow_contamination_goes_on(tmp_path, monkeypatch,
                                                                                           capsys):
    evaluation = [qa(i, f"{QUESTION} Case {i}.") for i in range(20)]
    eval_path = write_records(tmp_path / "eval.jsonl", evaluation)
    train = [qa(i, f"A training question number {i} about something else.") for i in range(30)]
    train_path = write_records(tmp_path / "train.jsonl", train + [qa(30, f"{QUESTION} Case 3."),
                                                                  qa(31, f"{QUESTION} Case 4.")])
    started = []

    def training_starts(cfg):
        started.append(cfg)
        raise KeyboardInterrupt  # stands for the training run: reaching it is what is tested

    monkeypatch.setattr(qtune.train, "run_train", training_starts)
    args = ["pipeline", "--out", str(tmp_path / "pipe"), "--model", "unused-model", "--data", train_path,
            "--eval-data", eval_path, "--no-eval-base", "--sft", "{max_steps: 1}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "qtune pipeline:" in err and "train record 30 ~ eval record 3" in err
    assert "train record 31 ~ eval record 4" in err
    assert "2 of 32 training records overlap" in err and not started and not (tmp_path / "pipe").exists()
    assert main([*args, "--allow-contamination"]) == 130
    assert len(started) == 1 and started[0].data == train_path


def test_bench_on_user_data_stops_before_any_cell(tmp_path, monkeypatch):
    import qtune.bench.cells
    from qtune.bench import BenchConfig, run_bench

    monkeypatch.setattr(qtune.bench.cells, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    evaluation = write_records(tmp_path / "eval.jsonl", [qa(i, f"{QUESTION} Case {i}.") for i in range(20)])
    train = write_records(tmp_path / "train.jsonl", [qa(0, f"{QUESTION} Case 1."), qa(1, "Something else.")])
    with pytest.raises(QTuneError, match="qtune bench: .*train record 0 ~ eval record 1"):
        run_bench(BenchConfig(out=str(tmp_path / "bench"), model="unused", data=train, eval_data=evaluation,
                              methods="full", seeds="0", plots=False))


# --- the command ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saturated(tmp_path_factory):
    from qtune.testbed import build_testbed

    return build_testbed(tmp_path_factory.mktemp("testbed"), progress=False)


def test_options_are_checked_before_anything_is_read(tmp_path, capsys):
    base = ["audit", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")]
    for extra, words in ((["--rules", "oracle_ratio"], "ground-truth labels"),
                         (["--selectors", "less"], "--target-data"),
                         (["--token-rules", "rho1"], "--reference-model"),
                         (["--plant", "1.5"], "--plant must be in (0, 1)"),
                         (["--rules", "longest,nonsense"], "--rules must be none, or comma-separated sample rules")):
        assert main(base + extra) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_audit_end_to_end_on_the_testbed_writes_every_output(saturated, tmp_path, capsys):
    out = tmp_path / "audit"
    code = main(["audit", "--model", str(saturated.model_dir), "--data", str(saturated.train_path),
                 "--eval-data", str(saturated.test_path), "--sample", "72", "--plant", "0.5", "--plant-into",
                 "clean", "--batch-size", "12", "--steps", "1", "--lr", "1e-3", "--no-progress", "--out", str(out)])
    assert code == 0
    for name in ("audit.md", "audit.json", "audit.html", "planted.jsonl", "eu_plane.png", "drop_rates.png",
                 "dynamic/steps.jsonl"):
        assert (out / name).is_file(), name
    result = json.loads((out / "audit.json").read_text())
    planted = [json.loads(line) for line in (out / "planted.jsonl").read_text().splitlines()]
    kinds = [row["metadata"]["audit"]["kind"] for row in planted]
    assert len(planted) == 72 and result["planted"][UNPLANTED_DEFECTIVE] == kinds.count(UNPLANTED_DEFECTIVE) > 0
    assert all(not row["metadata"]["defective"] for row, k in zip(planted, kinds) if k in KINDS)
    names = result["method_order"]
    assert sorted(names) == sorted(result["methods"])
    assert names[:2] == ["qtuning", "rule:random"] and "selector:random" in names and "train:qtuning" in names
    assert {"rule:longest", "rule:infobatch", "selector:perplexity", "selector:ifd", "selector:hardness"} <= set(names)
    for name, entry in result["methods"].items():
        for group in (UNTOUCHED, *KINDS, UNPLANTED_DEFECTIVE):
            share, n = entry["drop_share"][group], entry["n"][group]
            if share is None:  # a kind the dynamic run's few steps never met
                assert n == 0 and name.startswith("train:"), (name, group)
            else:
                assert 0 <= share <= 1 and n >= 1
        if not name.startswith("train:"):  # a static decision sees each sample once
            assert sum(entry["n"].values()) == 72
        assert entry["sentence"].endswith(".")
    # Random drops 1 - r_sample of every batch of 12: 9 of each.
    assert sum(result["methods"]["rule:random"]["hits"].values()) == 72 * 3 // 4
    steps = [json.loads(line) for line in (out / "dynamic" / "steps.jsonl").read_text().splitlines()]
    assert sum(result["methods"]["train:qtuning"]["n"].values()) == sum(len(s["sample_ids"]) for s in steps) == 12
    assert result["token_rule_order"][:2] == ["qtuning", "random"]
    assert result["token_rules"]["random"]["n"]["planted"] > 0
    assert "token:rho1" in result["skipped"] and "selector:less" in result["skipped"]
    assert result["contamination"]["n_eval"] == 500
    md, html = (out / "audit.md").read_text(), (out / "audit.html").read_text()
    assert "Passing is necessary, not sufficient." in md and "| qtuning" in md
    assert "data:image/png;base64," in html and "Passing is necessary, not sufficient." in html
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("qtuning: ") for line in printed) and any(line.startswith("token random: ")
                                                                         for line in printed)
