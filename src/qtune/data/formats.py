"""Rows -> conversations: the supported record formats (`FORMATS`), their detection from the
fields of the first record, and each format's conversion into system/user/assistant messages,
checked (a malformed row raises `RecordError` with its reason, which `qtune.data.records` turns
into a `DataError` at the row's location or a skipped entry)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError

FORMATS = ("alpaca", "prompt_completion", "question_answer", "messages", "sharegpt")

# The fields that identify each format, in the order auto-detection tries them.
FORMAT_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "question_answer": ("question", "answer"),
}

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class RecordError(Exception):
    """A problem with one record; becomes a DataError, or a skipped entry with skip_invalid."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def type_name(value) -> str:
    """A JSON value's type in the words of JSON (string, number, array, ...), for error messages."""
    names = {str: "string", bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def detect_format(row: dict, path="<input>", location: str = "record 1") -> str:
    """The format whose identifying fields the record has (FORMAT_FIELDS, tried in order).

    Raises DataError (naming `path` and `location`) when no format matches.
    """
    found = matching_format(row)
    if found is None:
        expected = "; ".join(f"{name} ({', '.join(keys)})" for name, keys in FORMAT_FIELDS.items())
        fields = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(path, location, f"cannot detect the format: fields {fields} match none of: {expected}")
    return found


def matching_format(row: dict) -> str | None:
    """The first format whose identifying fields `row` has, or None."""
    for name, keys in FORMAT_FIELDS.items():
        if all(key in row for key in keys):
            return name
    return None


def settle_format(chosen: str | None, row: dict, path: Path, location: str) -> str:
    """Detect the format, or check that a named one is not plainly another format."""
    if chosen is None:
        return detect_format(row, path, location)
    looks_like = matching_format(row)
    if not all(key in row for key in FORMAT_FIELDS[chosen]) and looks_like is not None:
        raise DataError(
            path,
            location,
            f"format {chosen} needs fields {', '.join(FORMAT_FIELDS[chosen])}, but the first record has "
            f"fields {', '.join(sorted(map(str, row)))}, which look like format {looks_like} "
            f"(use --format {looks_like} or auto)",
        )
    return chosen


def _text_field(row: dict, name: str, *, optional: bool = False) -> str:
    value = row.get(name)
    if value is None:
        if optional:
            return ""
        raise RecordError(f"missing field '{name}'")
    if not isinstance(value, str):
        raise RecordError(f"field '{name}' must be a string (got {type_name(value)})")
    return value


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _from_alpaca(row: dict) -> list[dict]:
    instruction = _text_field(row, "instruction")
    extra_input = _text_field(row, "input", optional=True)
    output = _text_field(row, "output")
    system = _text_field(row, "system", optional=True)
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    messages = [_turn("system", system)] if system.strip() else []
    return messages + [_turn("user", user), _turn("assistant", output)]


def _from_question_answer(row: dict) -> list[dict]:
    return [_turn("user", _text_field(row, "question")), _turn("assistant", _text_field(row, "answer"))]


def _from_prompt_completion(row: dict) -> list[dict]:
    prompt, completion = row.get("prompt"), row.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            raise RecordError(f"missing field '{name}'")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [_turn("user", prompt), _turn("assistant", completion)]
    if isinstance(prompt, list) and isinstance(completion, list):
        # TRL's conversational form: the completion continues the prompt's conversation.
        messages = _parse_messages(prompt, "prompt") + _parse_messages(completion, "completion")
        return _check_conversation(messages)
    raise RecordError(
        "fields 'prompt' and 'completion' must both be strings or both be arrays of messages "
        f"(got {type_name(prompt)} and {type_name(completion)})"
    )


def _from_messages(row: dict) -> list[dict]:
    return _check_conversation(_parse_messages(row.get("messages"), "messages"))


def _from_sharegpt(row: dict) -> list[dict]:
    return _check_conversation(
        _parse_messages(row.get("conversations"), "conversations", role_key="from", content_key="value",
                        roles=SHAREGPT_ROLES)
    )


def _parse_messages(value, name: str, *, role_key="role", content_key="content", roles=None) -> list[dict]:
    """Normalise a list of message objects; `roles` maps source role names to ROLES."""
    roles = roles or {role: role for role in ROLES}
    if value is None:
        raise RecordError(f"missing field '{name}'")
    if not isinstance(value, list):
        raise RecordError(f"field '{name}' must be an array of messages (got {type_name(value)})")
    messages = []
    for index, message in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(message, dict):
            raise RecordError(f"message is not an object ({where} is {type_name(message)})")
        role, content = message.get(role_key), message.get(content_key)
        if role is None:
            raise RecordError(f"message without '{role_key}' ({where})")
        if not isinstance(role, str) or role not in roles:
            raise RecordError(f"unknown role {role!r} ({where}; expected one of {', '.join(roles)})")
        if content is None:
            raise RecordError(f"message without '{content_key}' ({where})")
        if not isinstance(content, str):
            raise RecordError(f"message '{content_key}' must be a string ({where} is {type_name(content)})")
        messages.append(_turn(roles[role], content))
    return messages


def _check_conversation(messages: list[dict]) -> list[dict]:
    if not messages:
        raise RecordError("empty conversation")
    if not any(message["role"] == "assistant" for message in messages):
        raise RecordError("conversation has no assistant turn")
    return messages


_CONVERTERS = {
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
    "question_answer": _from_question_answer,
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
}


def _metadata(row: dict) -> dict:
    value = row.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecordError(f"field 'metadata' must be an object (got {type_name(value)})")
    return value


def _check_text(messages: list[dict], metadata: dict) -> None:
    """Reject text that is not valid Unicode (undecodable bytes read as lone surrogates)."""
    pending: list = [message["content"] for message in messages] + [metadata]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RecordError("invalid UTF-8 (undecodable bytes or a lone surrogate in the text)") from None
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def normalise(row: dict, format: str) -> tuple[list[dict], dict]:
    """A row of `format` as (messages, metadata), checked; `RecordError` with the reason when it is
    malformed."""
    messages = _CONVERTERS[format](row)
    metadata = _metadata(row)
    _check_text(messages, metadata)
    return messages, metadata
