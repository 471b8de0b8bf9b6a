"""Tests of qtune.chat_templates: chat templates that behave like the ones models ship with.

Templates are written here after the Qwen3, Llama 3, Mistral and Gemma families (and one with
`{% generation %}` markers), on a variant of conftest's tokenizer that has their special tokens.
For each, single-turn and multi-turn (3 assistant turns): the labels are exactly the answer and
its end-of-turn token, and the context before each trained answer is what the template renders
to generate it (`add_generation_prompt=True` on the messages before it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest

from qtune.chat_templates import render_samples, render_segments, rendering_path
from qtune.data import IGNORE_INDEX, TURN_ID_STRIDE, Record, record_id_of, tokenize_records
from qtune.errors import QTuneError
from test_data import assistant, system, user  # the message builders of the data tests

# The families' control tokens; <think> and </think> are plain added tokens, as in Qwen3.
FAMILY_SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "[INST]", "[/INST]",
    "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
]
FAMILY_TOKENS = ["<think>", "</think>"]

# Qwen3: ChatML; an assistant turn after the last user message that ends the conversation gets a
# reasoning block (empty unless the content holds `...</think>`), earlier turns are shown without it.
QWEN3 = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content -%}{%- set reasoning = '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

# Llama 3.1: BOS, a system header with the dates always (the system message optional), trimmed
# contents, <|eot_id|> after every message.
LLAMA3 = (
    "{{- bos_token -}}"
    "{%- if not date_string is defined -%}{%- set date_string = '26 Jul 2024' -%}{%- endif -%}"
    "{%- if messages[0].role == 'system' -%}"
    "{%- set system = messages[0].content | trim -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' -}}"
    "{{- system + '<|eot_id|>' -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)


def _mistral(system_turn: str) -> str:
    """Mistral: BOS, `[INST] ...[/INST]` user turns, ` answer</s>` assistant turns, no generation
    prompt; the system prompt folded into the user turn that `system_turn` names (a Jinja test
    on the loop and `ns.last_user`, the index of the last user message)."""
    return (
        "{{- bos_token -}}"
        "{%- if messages[0].role == 'system' -%}"
        "{%- set system = messages[0].content + '\\n\\n' -%}{%- set messages = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- endif -%}"
        "{%- set ns = namespace(last_user=-1) -%}"
        "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- for m in messages -%}"
        "{%- if m.role == 'user' -%}"
        "{{- '[INST] ' + (system if " + system_turn + " else '') + m.content + '[/INST]' -}}"
        "{%- else -%}"
        "{{- ' ' + m.content | trim + eos_token -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


MISTRAL_FIRST = _mistral("loop.first")  # v0.1-style: the first user turn
MISTRAL_LAST = _mistral("loop.index0 == ns.last_user")  # the last user turn of what is rendered
MISTRAL_V03 = _mistral("loop.last")  # v0.3-style: only a user turn that ends the rendering

# Gemma: BOS, the assistant role renamed to model, no system role (folded into the first user turn),
# trimmed contents, <end_of_turn> and a newline after every turn.
GEMMA = (
    "{{- bos_token -}}"
    "{%- if messages[0].role == 'system' -%}"
    "{%- set prefix = messages[0].content + '\\n\\n' -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- set role = 'model' if m.role == 'assistant' else m.role -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + m.content | trim"
    " + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

# ChatML with {% generation %} around each answer and its end-of-turn token.
CHATML_GENERATION = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}{%- generation -%}{{- m.content + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class Family:
    template: str
    bos: str
    eos: str
    before: str  # what the template writes between the generation prompt and the trained text
    trained: str  # the trained text of an answer, "{}" standing for its content
    splits: bool  # whether a multi-turn conversation with a system message is split per turn


FAMILIES = {
    "qwen3": Family(QWEN3, "<|endoftext|>", "<|im_end|>", "<think>\n\n</think>\n\n", "{}<|im_end|>", True),
    "llama3": Family(LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "", "{}<|eot_id|>", False),
    "mistral-first": Family(MISTRAL_FIRST, "<s>", "</s>", "", " {}</s>", False),
    "mistral-last": Family(MISTRAL_LAST, "<s>", "</s>", "", " {}</s>", True),
    "gemma": Family(GEMMA, "<bos>", "<eos>", "", "{}<end_of_turn>", False),
    "generation-markers": Family(CHATML_GENERATION, "<|endoftext|>", "<|im_end|>", "", "{}<|im_end|>", False),
}


SINGLE_TURN = [user("What is 2 + 3?"), assistant("2 + 3 = 5. #### 5")]
MULTI_TURN = [
    system("Be brief."),
    user("What is 2 + 3?"), assistant("5"),
    user("And 4 + 4?"), assistant("4 + 4 = 8"),
    user("Tom has 3 apples and buys 2 more. How many?"), assistant("Tom has 3 + 2 = 5 apples. #### 5"),
]


@pytest.fixture(scope="module")
def family_base(plain_tokenizer):
    """conftest's tokenizer with the families' special tokens added (a copy: fixtures stay as they are)."""
    tokenizer = copy.deepcopy(plain_tokenizer)
    tokenizer.add_tokens(FAMILY_SPECIAL_TOKENS, special_tokens=True)
    tokenizer.add_tokens(FAMILY_TOKENS)
    return tokenizer


def family_tokenizer(base, family: Family):
    tokenizer = copy.deepcopy(base)
    tokenizer.chat_template = family.template
    tokenizer.bos_token, tokenizer.eos_token = family.bos, family.eos
    return tokenizer


def labelled_runs(sample) -> list[tuple[int, list[int]]]:
    """(start position, token ids) of each contiguous run of trained tokens."""
    runs: list[tuple[int, list[int]]] = []
    for position, (token, label) in enumerate(zip(sample["input_ids"], sample["labels"])):
        if label == IGNORE_INDEX:
            continue
        assert label == token
        if runs and runs[-1][0] + len(runs[-1][1]) == position:
            runs[-1][1].append(token)
        else:
            runs.append((position, [token]))
    return runs


def check_sample(tokenizer, family: Family, sample, messages: list[dict], trained_turns: list[int]) -> None:
    """The sample is the template's rendering of `messages`, and trains exactly the answers of the
    assistant messages at `trained_turns`, each after its own generation prompt."""
    decode = tokenizer.decode
    assert decode(sample["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    runs = labelled_runs(sample)
    assert [decode(ids) for _, ids in runs] == [family.trained.format(messages[i]["content"]) for i in trained_turns]
    for (start, _), index in zip(runs, trained_turns):
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        assert decode(sample["input_ids"][:start]) == prompt + family.before


@pytest.mark.parametrize("name", FAMILIES)
def test_single_turn_trains_the_answer_and_its_end_of_turn_token(family_base, name):
    family = FAMILIES[name]
    tokenizer = family_tokenizer(family_base, family)
    for messages in (SINGLE_TURN, [system("Be brief.")] + SINGLE_TURN):
        (sample,), report = tokenize_records([Record(5, messages, {})], tokenizer)
        assert sample["sample_id"] == 5 and report.n_split == 0
        check_sample(tokenizer, family, sample, messages, [len(messages) - 1])


@pytest.mark.parametrize("name", FAMILIES)
def test_multi_turn_trains_every_answer_after_its_generation_prompt(family_base, name):
    family = FAMILIES[name]
    tokenizer = family_tokenizer(family_base, family)
    turns = [i for i, m in enumerate(MULTI_TURN) if m["role"] == "assistant"]
    samples, report = tokenize_records([Record(5, MULTI_TURN, {}), Record(6, SINGLE_TURN, {})], tokenizer)
    if family.splits:
        # One sample per assistant turn: the conversation up to it, training it alone.
        assert [s["sample_id"] for s in samples] == [5 + k * TURN_ID_STRIDE for k in (1, 2, 3)] + [6]
        for sample, index in zip(samples, turns):
            check_sample(tokenizer, family, sample, MULTI_TURN[: index + 1], [index])
        assert (report.n_split, report.n_split_samples, report.n_out) == (1, 3, 4)
        assert "2 records into 4 samples (1 conversation split into 3 samples, one per assistant turn" in (
            report.summary())
    else:
        assert [s["sample_id"] for s in samples] == [5, 6]
        check_sample(tokenizer, family, samples[0], MULTI_TURN, turns)
        assert report.n_split == 0 and report.summary() == "tokenized 2 samples: 2 kept"
    assert [record_id_of(s["sample_id"]) for s in samples] == [5] * (len(samples) - 1) + [6]


def test_the_path_is_chosen_per_tokenizer(family_base, plain_tokenizer):
    paths = {name: rendering_path(family_tokenizer(family_base, family)) for name, family in FAMILIES.items()}
    assert paths == {name: "markers" if name == "generation-markers" else "template" for name in FAMILIES}
    assert rendering_path(plain_tokenizer) == "plain"


def test_qwen3_split_shows_earlier_turns_without_their_reasoning_block(family_base):
    tokenizer = family_tokenizer(family_base, FAMILIES["qwen3"])
    samples = render_samples(MULTI_TURN, tokenizer)
    assert [s.turn for s in samples] == [1, 2, 3]
    last = "".join(text for text, _ in samples[2].segments)
    assert last.count("<think>") == 1 and "<|im_start|>assistant\n5<|im_end|>\n" in last
    # Render one conversation in non-thinking mode: the trained answer follows exactly that prompt.
    prompt = tokenizer.apply_chat_template(MULTI_TURN[:2], tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False)
    assert render_segments(MULTI_TURN[:3], tokenizer)[:2] == [(prompt, False), ("5<|im_end|>", True)]


def test_qwen3_reasoning_in_the_answer_is_trained_as_the_template_writes_it(family_base):
    tokenizer = family_tokenizer(family_base, FAMILIES["qwen3"])
    messages = [user("What is 2 + 3?"), assistant("<think>\nAdd them.\n</think>\n\n5")]
    segments = render_segments(messages, tokenizer)
    assert segments == [
        ("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n<think>\n", False),
        ("Add them.\n</think>\n\n5<|im_end|>", True),
        ("\n", False),
    ]


def test_system_prompt_shown_only_at_generation_is_rejected(family_base):
    # Mistral v0.3 folds the system prompt into a user turn only when that turn ends the rendering:
    # the answer's context at inference (with the system prompt) is rendered by no template call.
    v03 = Family(MISTRAL_V03, "<s>", "</s>", "", " {}</s>", False)
    tokenizer = family_tokenizer(family_base, v03)
    (sample,), _ = tokenize_records([Record(0, SINGLE_TURN, {})], tokenizer)
    check_sample(tokenizer, v03, sample, SINGLE_TURN, [1])  # without a system message it trains
    with pytest.raises(QTuneError, match="sample 4: the chat template renders the conversation before assistant "
                                         "message 2 differently in its generation prompt"):
        tokenize_records([Record(4, MULTI_TURN, {})], tokenizer)


def test_generation_markers_decide_even_where_the_template_is_not_prefix_stable(family_base):
    # Qwen3's template with markers around each answer and its end-of-turn token: the mask is
    # followed as it is, in one sample (earlier answers without the reasoning block).
    marked = QWEN3.replace("+ content + '<|im_end|>\\n'", "-}}{%- generation -%}{{- content + '<|im_end|>' -}}"
                           "{%- endgeneration -%}{{- '\\n'")
    assert marked.count("{%- generation -%}") == 2
    tokenizer = family_tokenizer(family_base, Family(marked, "<|endoftext|>", "<|im_end|>", "", "", False))
    assert rendering_path(tokenizer) == "markers"
    (sample,), report = tokenize_records([Record(5, MULTI_TURN, {})], tokenizer)
    assert sample["sample_id"] == 5 and report.n_split == 0
    answers = [m["content"] for m in MULTI_TURN if m["role"] == "assistant"]
    assert [tokenizer.decode(ids) for _, ids in labelled_runs(sample)] == [a + "<|im_end|>" for a in answers]
    assert tokenizer.decode(sample["input_ids"]) == tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)


def test_a_conversation_opening_with_an_assistant_turn_is_rejected(family_base):
    tokenizer = family_tokenizer(family_base, FAMILIES["llama3"])
    with pytest.raises(QTuneError, match="sample 2: the conversation starts with an assistant turn"):
        tokenize_records([Record(2, [assistant("Hi."), user("Hello"), assistant("How can I help?")], {})], tokenizer)


def test_split_samples_are_excluded_one_by_one(family_base):
    tokenizer = family_tokenizer(family_base, FAMILIES["qwen3"])
    messages = [user("Say nothing."), assistant(" "), user("Now say 5."), assistant("5")]
    samples, report = tokenize_records([Record(1, messages, {})], tokenizer)
    assert [s["sample_id"] for s in samples] == [1 + 2 * TURN_ID_STRIDE]
    assert report.excluded_ids == [1 + TURN_ID_STRIDE] and report.n_empty == 1
    assert (report.n_split, report.n_split_samples, report.n_out) == (1, 2, 1)
