"""The `thtb` selector: the judge's answer parser and agreement on hand-written answers, the three
stages combined on hand-made scores, the wiring of the selector (quality from metadata, the judge
asked only about what passed, EHS from the hardness selector on the stage-2 subset), the judge's
cache (counted generations), and `qtune select --selector thtb` end to end with the tiny model as
the judge."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from test_train import tiny_run_inputs  # noqa: F401 (a fixture)

import qtune.judge as judge
from qtune.config import SelectConfig
from qtune.errors import QTuneError
from qtune.judge import JudgeAnswer, JudgeRun, JudgeSettings, judge_agreement, parse_judge_answer
from qtune.scoring import DatasetScores
from qtune.selection import run_select
from qtune.selectors import SELECTORS, SelectorInputs
from qtune.selectors.thtb import intrinsic_hardness, normalised, subset_inputs, thtb_stages


def cfg(**values):
    return SelectConfig(model="m", data="d", out="o", **values)


def scores(n):
    return DatasetScores(sample_id=list(range(10, 10 + n)), n_response=[3] * n, ppl=None, ent=None,
                         token_nll=None, token_entropy=None, seconds=0.0, tokens=0)


# ----------------------------------------------------------------------------- the parser


@pytest.mark.parametrize("text, level, disciplines", [
    # valid
    ("Level: 4\nDisciplines: physics, mathematics", 4, 2),
    ("Level: 1\nDisciplines: history", 1, 1),
    # extra words around the answer: ignored; the list ends with its sentence; names counted once
    ("Sure! Here is my rating.\nLevel: 3 (apply)\nDisciplines: Mathematics, economics and computer science. "
     "These matter because...", 3, 3),
    ("**Level:** Analyze\n**Disciplines:** biology; chemistry; Biology", 4, 2),
    ("level 6, disciplines: 2 (art, music)", 6, 2),
    # the format echoed first, then the answer: the placeholders are skipped
    ("Level: <a number from 1 to 6>\nDisciplines: <first discipline>, <second discipline>, ...\n"
     "Level: 5\nDisciplines: law", 5, 1),
    # malformed
    ("I think this one is quite hard.", None, None),
    ("Level: three\nDisciplines: the instruction asks the reader to weigh many different things at once", None, None),
    ("Level: 3.5\nDisciplines: none", None, None),
    ("Level: 2\nDisciplines:", 2, None),
    # out of range
    ("Level: 7\nDisciplines: 12", None, None),
    ("Level: 0\nDisciplines: " + ", ".join(f"field{i}" for i in range(11)), None, None),
    # empty
    ("", None, None),
])
def test_parser_reads_answers_and_refuses_what_it_cannot_read(text, level, disciplines):
    answer = parse_judge_answer(text)
    assert answer == JudgeAnswer(level, disciplines)
    assert answer.parsed == (level is not None and disciplines is not None)


def test_judge_agreement_by_hand():
    # Pairs where both are readable: (1, 1), (2, 3), (3, 5), (6, 6); (None, 2) and (5, None) are left out.
    a = [1, 2, 3, None, 5, 6]
    b = [1, 3, 5, 2, None, 6]
    assert judge_agreement(a, b) == {"n": 4, "exact": 2 / 4, "within_one": 3 / 4}
    assert judge_agreement([None, 1], [2, None]) == {"n": 0, "exact": None, "within_one": None}
    with pytest.raises(ValueError):
        judge_agreement([1], [1, 2])


def test_the_prompt_asks_both_questions_and_cuts_a_long_instruction():
    (message,) = judge.judge_messages("Why is the sky blue?")
    assert message["role"] == "user" and "Why is the sky blue?" in message["content"]
    assert "Bloom" in message["content"] and "Disciplines:" in message["content"]
    long = judge.judge_messages("x" * (judge.INSTRUCTION_CHARS + 100))[0]["content"]
    assert "x" * judge.INSTRUCTION_CHARS + " [...]" in long and "x" * (judge.INSTRUCTION_CHARS + 1) not in long


# ----------------------------------------------------------------------------- the combination


def test_intrinsic_hardness_is_the_mean_of_the_normalised_level_and_discipline_count():
    # Levels 1 3 6 3 -> 0, 0.4, 1, 0.4; counts 1 2 1 3 -> 0, 0.5, 0, 1; IHS = the means.
    assert intrinsic_hardness([1, 3, 6, 3], [1, 2, 1, 3]) == pytest.approx([0.0, 0.45, 0.5, 0.7])
    assert normalised([2.0, 2.0]) == [0.0, 0.0] and normalised([]) == []
    assert intrinsic_hardness([2, 2], [1, 1]) == [0.0, 0.0]


def test_the_three_stages_on_hand_made_scores():
    """Ten samples. Quality keeps keep_count(0.6, 10) = 6 of [.9, .1, .8, .8, .2, .7, .6, .95, .6, .3]:
    7 (.95), 0 (.9), 2 (.8), 3 (.8), 5 (.7), then 6 and 8 tie at .6 and the earlier, 6, passes.
    Intrinsic keeps keep_count(0.5, 6) = 3 of those by IHS [.2, .9, .5, .9, .1, .4] (in the order
    0 2 3 5 6 7): 2 (.9), 5 (.9), 3 (.5). Extrinsic ranks 2 3 5 by EHS [.3, .8, .5] and keeps 2: 3, 5."""
    quality = [0.9, 0.1, 0.8, 0.8, 0.2, 0.7, 0.6, 0.95, 0.6, 0.3]
    seen = {}

    def intrinsic(positions):
        seen["intrinsic"] = positions
        return [0.2, 0.9, 0.5, 0.9, 0.1, 0.4]

    def extrinsic(positions):
        seen["extrinsic"] = positions
        return [0.3, 0.8, 0.5]

    stages = thtb_stages(10, 2, quality=quality, quality_keep=0.6, intrinsic=intrinsic, intrinsic_keep=0.5,
                         extrinsic=extrinsic)
    assert seen == {"intrinsic": [0, 2, 3, 5, 6, 7], "extrinsic": [2, 3, 5]}
    assert stages.passed_quality == [0, 2, 3, 5, 6, 7] and stages.passed_intrinsic == [2, 3, 5]
    assert stages.kept == [3, 5]
    # The score: dropped by quality, min-max quality (low .1, high .95); dropped by intrinsic,
    # 1 + min-max IHS over the six (.1 .. .9); ranked by extrinsic, 2 + min-max EHS over the three.
    expected = [1 + (0.2 - 0.1) / 0.8, (0.1 - 0.1) / 0.85, 2 + 0.0, 2 + 1.0, (0.2 - 0.1) / 0.85, 2 + 0.4,
                1 + 0.0, 1 + (0.4 - 0.1) / 0.8, (0.6 - 0.1) / 0.85, (0.3 - 0.1) / 0.85]
    assert stages.score == pytest.approx(expected)
    assert min(stages.score[i] for i in stages.kept) >= max(s for i, s in enumerate(stages.score)
                                                            if i not in stages.kept)


def test_without_a_quality_score_every_sample_reaches_the_judge():
    stages = thtb_stages(4, 1, quality=None, quality_keep=0.2, intrinsic=lambda p: [0.0, 1.0, 0.5, 1.0],
                         intrinsic_keep=0.5, extrinsic=lambda p: [0.2, 0.1])
    assert stages.passed_quality == [0, 1, 2, 3] and stages.passed_intrinsic == [1, 3] and stages.kept == [1]


def test_asking_for_more_than_the_first_two_stages_let_through_stops_before_the_judge_runs():
    def never(positions):
        raise AssertionError("the judge ran")

    # keep_count(0.2, 100) = 20 pass quality, keep_count(0.5, 20) = 10 pass the judge; 25 asked for.
    with pytest.raises(QTuneError, match=r"keeps 25 of 100 samples, but only 10 pass .*--judge-keep 0.2 x "
                                         r"--intrinsic-keep 0.5.*--ratio 0.1 or less"):
        thtb_stages(100, 25, quality=[float(i) for i in range(100)], quality_keep=0.2, intrinsic=never,
                    intrinsic_keep=0.5, extrinsic=never)


PAIRS = [("Define entropy.", "a" * 10), ("Design a bridge for a river town.", "b" * 80),
         ("List three cats.", "c" * 20), ("Compare two proofs of the theorem.", "d" * 60),
         ("Name the capital.", "e" * 5), ("Evaluate this essay on economics and law.", "f" * 90),
         ("Create a poem about physics.", "g" * 40), ("Explain rainfall.", "h" * 30)]
ANSWERS = {"Define entropy.": "Level: 1\nDisciplines: physics",
           "Design a bridge for a river town.": "Level: 6\nDisciplines: engineering, physics, economics",
           "List three cats.": "Level: 1\nDisciplines: biology",
           "Compare two proofs of the theorem.": "Level: 4\nDisciplines: mathematics",
           "Name the capital.": "garbled",
           "Evaluate this essay on economics and law.": "Level: 5\nDisciplines: economics, law",
           "Create a poem about physics.": "Level: 6\nDisciplines: literature, physics",
           "Explain rainfall.": "Level: 2\nDisciplines: geography, physics"}


def stub_judge(monkeypatch, asked):
    def judge_instructions(instructions, **options):
        asked.append((list(instructions), options["settings"]))
        return JudgeRun([ANSWERS[t] for t in instructions], 0, len(instructions), 0.0, "stub")

    monkeypatch.setattr(judge, "judge_instructions", judge_instructions)


def test_the_selector_filters_by_metadata_judges_only_what_passed_and_ranks_the_rest_by_the_hardness_selector(
        monkeypatch):
    """Quality keeps keep_count(0.75, 8) = 6: all but positions 2 and 4 (the lowest rewards). The
    judge sees those six: levels 1 6 4 5 6 2, disciplines 1 3 1 2 2 2 -> Bloom 0 1 .6 .8 1 .2,
    IC 0 1 0 .5 .5 .5 -> IHS 0 1 .3 .65 .75 .35; keep_count(0.5, 6) = 3 pass: positions 1, 5, 6.
    EHS is the hardness selector's score on those three alone; the 2 of highest EHS are kept."""
    asked = []
    stub_judge(monkeypatch, asked)
    rewards = [0.5, 0.9, 0.1, 0.7, 0.0, 0.8, 0.6, 0.4]
    inputs = SelectorInputs(scores(8), texts=[" ".join(p) for p in PAIRS], pairs=PAIRS,
                            metadata=[{"reward": r} for r in rewards])
    options = dict(ratio=0.25, clusters=2, judge_field="reward", judge_keep=0.75, intrinsic_keep=0.5)
    choice = SELECTORS["thtb"]().choose(cfg(**options), inputs)
    assert [texts for texts, _ in asked] == [[PAIRS[i][0] for i in (0, 1, 3, 5, 6, 7)]]
    assert asked[0][1] == JudgeSettings(48, 0.0, 0)
    ehs = SELECTORS["hardness"]().choose(cfg(**{**options, "judge_field": None}), subset_inputs(inputs, [1, 5, 6])).score
    top = sorted(range(3), key=lambda j: (-ehs[j], j))[:2]
    assert choice.kept == sorted(10 + [1, 5, 6][j] for j in top)
    assert choice.stats["passed_quality"] == 6 and choice.stats["passed_intrinsic"] == 3
    assert choice.stats["judge_unparsed"] == 0 and choice.stats["bloom_levels"] == {"1": 1, "2": 1, "4": 1, "5": 1,
                                                                                    "6": 2}
    assert choice.score[2] < 1 and choice.score[4] < 1  # dropped by quality
    assert all(1 <= choice.score[i] <= 2 for i in (0, 3, 7)) and all(choice.score[i] >= 2 for i in (1, 5, 6))


def test_without_a_judge_field_the_stats_say_no_quality_filter_ran_and_unreadable_answers_count(monkeypatch):
    asked = []
    stub_judge(monkeypatch, asked)
    inputs = SelectorInputs(scores(8), texts=[" ".join(p) for p in PAIRS], pairs=PAIRS, metadata=[{}] * 8)
    choice = SELECTORS["thtb"]().choose(cfg(ratio=0.25, clusters=2), inputs)
    assert len(asked[0][0]) == 8 and choice.stats["quality_stage"].startswith("none")
    assert choice.stats["judge_unparsed"] == 1 == choice.stats["judge_unparsed_level"]
    assert choice.stats["passed_quality"] == 8 and choice.stats["passed_intrinsic"] == 4 and len(choice.kept) == 2
    with pytest.raises(QTuneError, match=r"--judge-field 'reward': 8 records have no number"):
        SELECTORS["thtb"]().choose(cfg(ratio=0.25, clusters=2, judge_field="reward"), inputs)


def test_the_check_pass_reports_the_agreement_of_two_passes(monkeypatch):
    asked = []

    def judge_instructions(instructions, **options):
        asked.append(options["settings"])
        second = options["settings"].temperature > 0  # the check pass: one level off, one field unreadable
        answers = [ANSWERS[t] for t in instructions]
        if second:
            answers = ["Level: 2\nDisciplines: physics"] + answers[1:-1] + ["Disciplines: physics"]
        return JudgeRun(answers, 0, len(instructions), 0.0, "stub")

    monkeypatch.setattr(judge, "judge_instructions", judge_instructions)
    inputs = SelectorInputs(scores(8), texts=[" ".join(p) for p in PAIRS], pairs=PAIRS, metadata=[{}] * 8)
    choice = SELECTORS["thtb"]().choose(cfg(ratio=0.25, clusters=2, judge_check_temperature=0.7, judge_seed=3), inputs)
    assert asked == [JudgeSettings(48, 0.0, 3), JudgeSettings(48, 0.7, 4)]
    check = choice.stats["judge_check"]
    # Levels, first pass: 1 6 1 4 None 5 6 2; check: 2 6 1 4 None 5 6 None -> 6 pairs, 5 equal, all within one.
    assert check["level"] == {"n": 6, "exact": 5 / 6, "within_one": 1.0}
    # Disciplines: 1 3 1 1 None 2 2 2 and 1 3 1 1 None 2 2 1 ("garbled" has none either time): 7 pairs, 6 equal.
    assert check["disciplines"] == {"n": 7, "exact": 6 / 7, "within_one": 1.0}


# ----------------------------------------------------------------------------- the cache


def test_the_cache_answers_a_second_run_and_misses_a_changed_record_judge_prompt_or_setting(
        monkeypatch, tmp_path, tiny_tokenizer, tiny_model_dir):
    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path / "cache"))
    calls = []

    def generate_answers(model, tokenizer, prompts, *, settings, batch_size, progress=True, on_batch=None):
        calls.append(len(prompts))
        texts = [f"Level: {1 + len(p) % 6}\nDisciplines: x" for p in prompts]
        if on_batch is not None:
            on_batch(list(range(len(prompts))), texts)
        return texts

    monkeypatch.setattr(judge, "generate_answers", generate_answers)
    monkeypatch.setattr(judge, "load_judge", lambda *a, **k: (object(), tiny_tokenizer))

    def run(instructions, model=str(tiny_model_dir), settings=JudgeSettings()):
        return judge.judge_instructions(instructions, model=model, settings=settings, batch_size=2, device="cpu",
                                        dtype="float32", progress=False)

    first = run(["a", "b", "a"])
    assert calls == [2] and first.generated == 2 and first.cached == 0  # "a" generated once
    assert (tmp_path / "cache" / "judge").is_dir() and first.cache.startswith(str(tmp_path / "cache" / "judge"))
    again = run(["a", "b", "a"])
    assert calls == [2] and again.answers == first.answers and again.cached == 3 and again.generated == 0
    assert run(["a", "b", "c"]).generated == 1 and calls == [2, 1]  # a changed record misses, the others hit
    rows = [json.loads(line) for line in open(first.cache)]
    assert sorted(row["key"] for row in rows) == sorted(judge.record_key(t) for t in "abc")
    assert run(["a"], settings=JudgeSettings(seed=5)).generated == 0  # greedy: the seed plays no part
    assert run(["a"], settings=JudgeSettings(temperature=0.7)).generated == 1  # another setting misses
    other = tmp_path / "other-judge"
    shutil.copytree(tiny_model_dir, other)
    assert run(["a"], model=str(other)).generated == 1  # another judge misses
    monkeypatch.setattr(judge, "PROMPT_VERSION", "thtb-judge-test")
    assert run(["a"]).generated == 1  # another prompt version misses
    assert calls == [2, 1, 1, 1, 1]


def test_answers_of_finished_batches_are_kept_when_a_run_is_interrupted(monkeypatch, tmp_path, tiny_tokenizer,
                                                                       tiny_model_dir):
    def interrupted(model, tokenizer, prompts, *, settings, batch_size, progress=True, on_batch=None):
        on_batch([0], ["Level: 2\nDisciplines: x"])
        raise KeyboardInterrupt

    monkeypatch.setattr(judge, "generate_answers", interrupted)
    monkeypatch.setattr(judge, "load_judge", lambda *a, **k: (object(), tiny_tokenizer))
    options = dict(model=str(tiny_model_dir), settings=JudgeSettings(), batch_size=1, device="cpu", dtype="float32",
                   progress=False, cache_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        judge.judge_instructions(["p", "q"], **options)
    monkeypatch.setattr(judge, "generate_answers", lambda model, tokenizer, prompts, **k: ["Level: 3"] * len(prompts))
    rerun = judge.judge_instructions(["p", "q"], **options)
    assert rerun.cached == 1 and rerun.generated == 1 and rerun.answers == ["Level: 2\nDisciplines: x", "Level: 3"]


def test_sampled_answers_repeat_with_the_seed_and_leave_the_global_generator_alone(tiny_model_dir):
    model, tokenizer = judge.load_judge(str(tiny_model_dir), device="cpu", dtype="float32")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True) for text in ("Tom has 3 apples", "1 + 2?")]
    settings = JudgeSettings(max_new_tokens=6, temperature=1.0, seed=3)
    state = torch.get_rng_state()
    first = judge.generate_answers(model, tokenizer, prompts, settings=settings, batch_size=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert judge.generate_answers(model, tokenizer, prompts, settings=settings, batch_size=2, progress=False) == first


# ----------------------------------------------------------------------------- end to end


def test_select_with_the_tiny_model_as_judge_end_to_end(tiny_run_inputs, tmp_path, monkeypatch):
    """48 records, no quality score: all 48 judged, keep_count(0.5, 48) = 24 pass the judge, 12 kept.
    The tiny random model's answers are noise: the unreadable ones are counted, and the run goes on."""
    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path / "cache"))
    model, data = tiny_run_inputs
    options = dict(model=str(model), data=str(data), selector="thtb", judge_model=str(model), ratio=0.25,
                   clusters=4, judge_max_new_tokens=8, batch_size=16, scores=False, plot=False)
    summary = run_select(SelectConfig(out=str(tmp_path / "a"), **options))
    stats = summary["stats"]
    assert summary["n_kept"] == 12 and stats["passed_quality"] == 48 and stats["passed_intrinsic"] == 24
    assert stats["judged"] == 48 and stats["judge_generated"] == 48 and stats["judge_cached"] == 0
    assert stats["judge_unparsed"] > 0
    assert sum(stats["bloom_levels"].values()) + stats["judge_unparsed_level"] == 48
    table = pq.read_table(tmp_path / "a" / "scores.parquet").to_pydict()
    assert sum(table["kept"]) == 12 and all(s >= 2 for s, k in zip(table["score"], table["kept"]) if k)
    assert sum(s >= 2 for s in table["score"]) == 24
    again = run_select(SelectConfig(out=str(tmp_path / "b"), **options))["stats"]
    assert again["judge_generated"] == 0 and again["judge_cached"] == 48
    assert (tmp_path / "a" / "selected.jsonl").read_text() == (tmp_path / "b" / "selected.jsonl").read_text()
