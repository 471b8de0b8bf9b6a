"""The rewards of `qtune rl` on tricky completions, the registry, and rewards named by import path."""

import pytest

from qtune.errors import QTuneError
from qtune.rewards import REWARDS, answer_format, bind_options, exact_match, length_penalty, parse_spec, resolve

#: (completion, reference answer, exact_match, answer_format)
CASES = [
    ("3 + 4 = 7\n#### 7", "7", 1.0, 1.0),
    ("3 + 4 = 7", "7", 0.0, 0.0),  # no answer line
    ("", "7", 0.0, 0.0),
    ("#### 7\n#### 8", "7", 1.0, 0.0),  # two answers: the first counts, as in qtune eval; not the format
    ("#### 8\n#### 7", "7", 0.0, 0.0),
    ("10 - 13 = -3\n#### -3", "-3", 1.0, 1.0),  # negative
    ("#### -3", "3", 0.0, 1.0),
    ("#### 1,234", "1234", 1.0, 1.0),  # commas, either side
    ("#### 1234", "1,234", 1.0, 1.0),
    ("#### 12.", "12", 1.0, 1.0),  # one trailing period, as the harness strips it
    ("#### $12", "12", 0.0, 0.0),  # the strict pattern takes digits only after '#### '
    ("The answer is #### 7 apples", "7", 1.0, 0.0),  # found, but not on a line of its own
    ("####7", "7", 0.0, 0.0),  # no space: not the GSM8K marker
    ("  #### 7  ", "7", 1.0, 1.0),
]


@pytest.mark.parametrize("completion,answer,correct,formatted", CASES)
def test_exact_match_and_format_on_tricky_strings(completion, answer, correct, formatted):
    assert exact_match(completions=[completion], answer=[answer]) == [correct]
    assert answer_format(completions=[completion]) == [formatted]


def test_a_whole_gsm8k_reference_is_read_like_its_final_answer():
    reference = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"
    assert exact_match(completions=["#### 7", "#### 3"], answer=[reference, reference]) == [1.0, 0.0]


def test_a_prompt_line_echoed_back_is_scored_as_qtune_eval_scores_it():
    prompt = "Example: 2 + 2 = 4\n#### 4\nNow: 3 + 4?"
    # Only the completion is read: the prompt's '#### 4' earns nothing.
    assert exact_match(prompts=[prompt], completions=["I do not know"], answer=["4"]) == [0.0]
    # Echoing the example before answering: the first '#### ' counts (wrong here), and the format fails.
    echoed = "Example: 2 + 2 = 4\n#### 4\n3 + 4 = 7\n#### 7"
    assert exact_match(prompts=[prompt], completions=[echoed], answer=["7"]) == [0.0]
    assert answer_format(completions=[echoed]) == [0.0]


def test_conversational_completions_are_read_from_the_assistant_message():
    completions = [[{"role": "assistant", "content": "#### 5"}], [{"role": "assistant", "content": "five"}]]
    assert exact_match(completions=completions, answer=["5", "5"]) == [1.0, 0.0]
    assert answer_format(completions=completions) == [1.0, 0.0]


def test_length_penalty_is_the_share_of_the_limit_used():
    ids = [[], [1, 2], list(range(8))]
    assert length_penalty(completion_ids=ids, max_completion_length=8) == [0.0, -0.25, -1.0]
    bound = bind_options(length_penalty, {"max_completion_length": 4, "lr": 1e-3})
    assert bound(completions=["", "", ""], completion_ids=ids) == [0.0, -0.5, -2.0]
    assert bound.func is length_penalty  # TRL logs a partial by the wrapped function's name


def test_registry_specs_and_import_paths():
    assert set(REWARDS) >= {"exact_match", "answer_format", "length_penalty"}
    assert parse_spec("length_penalty=0.1") == ("length_penalty", 0.1)
    assert parse_spec("tests_pkg.mod:fn") == ("tests_pkg.mod:fn", 1.0)
    with pytest.raises(ValueError):
        parse_spec("exact_match=lots")
    assert resolve("exact_match") is exact_match
    assert resolve("qtune.rewards.length_penalty:length_penalty") is length_penalty
    with pytest.raises(QTuneError, match="unknown reward 'exactmatch'"):
        resolve("exactmatch")
    with pytest.raises(QTuneError, match="cannot be imported"):
        resolve("qtune.rewards:no_such_reward")
    assert bind_options(exact_match, {"max_completion_length": 4}) is exact_match  # asks for nothing


def test_a_reward_asking_for_an_unknown_option_is_refused():
    def needs(completions, *, temperature_schedule, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(QTuneError, match="asks for temperature_schedule"):
        bind_options(needs, {"lr": 1.0})
