"""How a conversation becomes training text: the tokenizer's chat template, or the plain template.

`render_samples` turns one conversation into one or more samples, each a list of text pieces
flagged trainable or not (`qtune.data.tokenize_records` tokenises them). The path is chosen per
tokenizer by `rendering_path`:

- "plain": no chat template; the plain template below (`PLAIN_*`).
- "markers": the chat template marks the assistant text with `{% generation %}` and the tokenizer
  is fast: the tokenizer's assistant-token mask says what is trained, in one sample.
- "template": any other chat template. Each assistant turn is found by rendering the conversation
  up to it; its trained text is its answer and the end-of-turn token after it. One sample per
  conversation when the template renders the conversation prefix-stably, else one sample per
  assistant turn, with the conversation before the turn as its prompt.

See docs/data.md ("Chat templates").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import QTuneError

# The plain template, used when the tokenizer has no chat template. BOS (if the tokenizer has one)
# comes first; an assistant turn is its prompt (no loss) then its content and EOS (loss);
# the separator follows an assistant turn when another message comes after it.
PLAIN_SYSTEM = "{content}\n\n"
PLAIN_USER = "User: {content}\n"
PLAIN_ASSISTANT_PROMPT = "Assistant: "
PLAIN_ASSISTANT = "{content}{eos}"
PLAIN_TURN_SEPARATOR = "\n"

# The tag transformers' templates use to mark the text an assistant-token mask covers.
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Stands in for an answer to see what a template writes around it: plain letters, which no
# template trims, splits or finds in its own text.
ANSWER_PROBE = "QtuneAnswerProbe"


@dataclass(frozen=True)
class RenderedSample:
    """One training sample of a conversation, as text pieces with their loss flag."""

    segments: list[tuple[str, bool]]  # concatenated, the sample's text; True pieces get loss
    turn: int = 0  # 0: trains every assistant turn; k >= 1: only the k-th (a conversation split per turn)


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer has a chat template (else the plain template is used)."""
    return bool(getattr(tokenizer, "chat_template", None))


def rendering_path(tokenizer) -> str:
    """How `render_samples` renders conversations for this tokenizer: "plain", "markers" or "template".

    "plain" without a chat template; "markers" when the chat template holds `{% generation %}`
    and the tokenizer is fast (the assistant-token mask needs token offsets); "template" otherwise.
    """
    if not has_chat_template(tokenizer):
        return "plain"
    if getattr(tokenizer, "is_fast", False) and GENERATION_MARKER.search(tokenizer.get_chat_template()):
        return "markers"
    return "template"


def render_samples(messages: list[dict], tokenizer) -> list[RenderedSample]:
    """The training samples of one conversation (see the module docstring for which path applies).

    One sample trains every assistant turn, except on the "template" path for a conversation that
    the template does not render prefix-stably: then one sample per assistant turn, the k-th holding
    the conversation up to that turn (as the template renders it) and training that turn only.
    """
    path = rendering_path(tokenizer)
    if path == "plain":
        return [RenderedSample(_plain_segments(messages, tokenizer))]
    if path == "markers":
        return [RenderedSample(_marked_segments(messages, tokenizer))]
    return _template_samples(messages, tokenizer)


def render_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The conversation as consecutive text pieces, each flagged True when it gets loss.

    For a conversation that renders as one sample (`render_samples`); one that is split per
    assistant turn is an error.
    """
    samples = render_samples(messages, tokenizer)
    if len(samples) > 1:
        raise QTuneError(
            f"the chat template does not render this conversation prefix-stably: it trains as {len(samples)} "
            "samples, one per assistant turn (use render_samples)"
        )
    return samples[0].segments


def render_prompt(messages: list[dict], tokenizer) -> str:
    """The text a model continues to generate the next assistant turn.

    `messages` is the conversation before that turn (it must not end with an assistant
    message). The text already holds BOS where the template puts one: tokenise it with
    add_special_tokens=False.
    """
    if messages and messages[-1]["role"] == "assistant":
        raise QTuneError(
            "render_prompt: the conversation already ends with an assistant turn; pass the messages before it"
        )
    if has_chat_template(tokenizer):
        return _apply_template(tokenizer, messages, add_generation_prompt=True)
    text = "".join(piece for piece, _ in _plain_segments(messages, tokenizer))
    return text + PLAIN_ASSISTANT_PROMPT


def _append(segments: list[tuple[str, bool]], text: str, trainable: bool) -> None:
    # Neighbouring pieces with the same flag are merged: fewer pieces tokenise closer to the whole text.
    if not text:
        return
    if segments and segments[-1][1] == trainable:
        segments[-1] = (segments[-1][0] + text, trainable)
    else:
        segments.append((text, trainable))


def _apply_template(tokenizer, messages: list[dict], **options):
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, **{"tokenize": False, **options})
    except jinja2.TemplateError as exc:
        raise QTuneError(f"the tokenizer's chat template failed: {exc}") from exc


# ----------------------------------------------------------------------------- the plain template


def _plain_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    eos = tokenizer.eos_token
    if not eos:
        raise QTuneError(
            "the tokenizer has neither a chat template nor an EOS token; the plain template needs EOS to end answers"
        )
    segments: list[tuple[str, bool]] = []
    if tokenizer.bos_token:
        _append(segments, tokenizer.bos_token, False)
    for index, message in enumerate(messages):
        if index > 0 and messages[index - 1]["role"] == "assistant":
            _append(segments, PLAIN_TURN_SEPARATOR, False)
        role, content = message["role"], message["content"]
        if role == "system":
            _append(segments, PLAIN_SYSTEM.format(content=content), False)
        elif role == "user":
            _append(segments, PLAIN_USER.format(content=content), False)
        else:
            _append(segments, PLAIN_ASSISTANT_PROMPT, False)
            _append(segments, PLAIN_ASSISTANT.format(content=content, eos=eos), True)
    return segments


# ----------------------------------------------------------------------------- {% generation %} markers


def _marked_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation cut where the tokenizer's assistant-token mask changes.

    A masked token makes all its characters trainable, so a marked span that starts or ends inside
    a token grows to the token's edges, as the mask itself does.
    """
    text = _apply_template(tokenizer, messages)
    # verbose=False: a conversation longer than the tokenizer's model_max_length is cut later, at
    # --max-length (`qtune.data.tokenization`), so the tokenizer's own warning would be noise.
    encoded = _apply_template(tokenizer, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                              tokenizer_kwargs={"verbose": False})
    spans: list[list[int]] = []  # [start, end) character spans of the masked tokens, adjacent ones merged
    for masked, (start, end) in zip(encoded["assistant_masks"], encoded.encodings[0].offsets):
        if not masked:
            continue
        if spans and spans[-1][1] >= start:
            spans[-1][1] = end
        else:
            spans.append([start, end])
    segments: list[tuple[str, bool]] = []
    done = 0
    for start, end in spans:
        _append(segments, text[done:start], False)
        _append(segments, text[start:end], True)
        done = end
    _append(segments, text[done:], False)
    return segments


# ----------------------------------------------------------------------------- rendering prefixes


@dataclass(frozen=True)
class _Turn:
    """One assistant turn rendered as the last message: `upto` is the conversation up to and with it."""

    prompt: str  # the generation prompt before the turn: template(messages[:i], add_generation_prompt=True)
    upto: str  # template(messages[:i+1]); starts with `prompt`
    start: int  # the trained text is upto[start:stop]: the answer and its end-of-turn token
    stop: int


def _template_samples(messages: list[dict], tokenizer) -> list[RenderedSample]:
    """One sample for a prefix-stable rendering, else one per assistant turn (module docstring)."""
    specials = _special_tokens(tokenizer)
    full = _apply_template(tokenizer, messages)
    turns = [
        _render_turn(messages, index, tokenizer, full, specials)
        for index, message in enumerate(messages)
        if message["role"] == "assistant"
    ]
    # Prefix-stable: each turn renders in the whole conversation as it does when it is the last
    # message, and the next turn's prompt starts after it.
    stable = all(full.startswith(turn.upto) for turn in turns) and all(
        len(later.prompt) >= len(earlier.upto) for earlier, later in zip(turns, turns[1:])
    )
    if stable:
        segments: list[tuple[str, bool]] = []
        done = 0
        for turn in turns:
            _append(segments, full[done : turn.start], False)
            _append(segments, full[turn.start : turn.stop], True)
            done = turn.stop
        _append(segments, full[done:], False)
        return [RenderedSample(segments)]
    samples = []
    for number, turn in enumerate(turns, 1):
        segments = []
        _append(segments, turn.upto[: turn.start], False)
        _append(segments, turn.upto[turn.start : turn.stop], True)
        _append(segments, turn.upto[turn.stop :], False)
        samples.append(RenderedSample(segments, number))
    return samples


def _render_turn(messages: list[dict], index: int, tokenizer, full: str, specials: list[str]) -> _Turn:
    """The assistant turn messages[index], rendered as the last message, with its trained text located."""
    if index == 0:
        raise QTuneError("the conversation starts with an assistant turn: a chat template has no prompt for it")
    prompt = _apply_template(tokenizer, messages[:index], add_generation_prompt=True)
    upto = full if index == len(messages) - 1 else _apply_template(tokenizer, messages[: index + 1])
    probe = _apply_template(tokenizer, messages[:index] + [{"role": "assistant", "content": ANSWER_PROBE}])
    if not (upto.startswith(prompt) and probe.startswith(prompt)):
        raise QTuneError(
            f"the chat template renders the conversation before assistant message {index} differently in its "
            "generation prompt than before the answer (for example a system prompt shown only at generation time), "
            "so no sample can give the answer the context it has at inference"
        )
    start, stop = _answer_bounds(upto[len(prompt) :], probe[len(prompt) :], specials, index)
    return _Turn(prompt, upto, len(prompt) + start, len(prompt) + stop)


def _answer_bounds(span: str, probe_span: str, specials: list[str], index: int) -> tuple[int, int]:
    """Where the trained text lies in `span`, one assistant turn as rendered after its generation prompt.

    Rules: `probe_span` is the same turn with ANSWER_PROBE as its content, so the text around the
    probe is what the template writes around any answer. The answer is what `span` has in place of
    the probe: what is left after the longest common prefix with the text before the probe and the
    longest common suffix with the text after it (a template may rewrite its decoration for some
    answers, e.g. Qwen3 writes reasoning into its think block). Spaces right before the answer are
    trained with it (tokenizers join a space to the word after it, and the model generates that
    token), other text before it is context. The trained text ends with the first special token
    after the answer (the end-of-turn token), or with the answer when none follows.
    """
    at = probe_span.find(ANSWER_PROBE)
    if at < 0 or ANSWER_PROBE in probe_span[at + 1 :]:
        raise QTuneError(
            f"cannot find the answer of assistant message {index} in the chat template's rendering "
            "(the template rewrites the answer text)"
        )
    before, after = probe_span[:at], probe_span[at + len(ANSWER_PROBE) :]
    start = _common_prefix_length(span, before)
    end = len(span) - _common_prefix_length(span[start:][::-1], after[::-1])
    while start > 0 and span[start - 1] == " ":
        start -= 1
    return start, _end_of_turn(span, end, specials)


def _common_prefix_length(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _end_of_turn(text: str, start: int, specials: list[str]) -> int:
    """The end of the first special token in text[start:] (the longest of those starting there), else start."""
    found = [(at, at + len(token)) for token in specials if (at := text.find(token, start)) >= 0]
    if not found:
        return start
    first = min(at for at, _ in found)
    return max(end for at, end in found if at == first)


def _special_tokens(tokenizer) -> list[str]:
    # Added special tokens (e.g. <|im_end|>, <|eot_id|>) are not all listed in all_special_tokens.
    added = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return sorted(added | set(tokenizer.all_special_tokens))
