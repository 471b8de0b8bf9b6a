"""The reward contract of `qtune rl` and its registry.

A reward is a Python callable that TRL's `GRPOTrainer` calls once per generation batch with
keyword arguments only:

- `prompts`: the prompt of each completion (a string; a list of messages for conversational data);
- `completions`: each completion, decoded without special tokens (a string; for conversational
  prompts a list holding one assistant message);
- `completion_ids`: each completion's token ids (up to and including its EOS, if it has one);
- every other column of the prompt dataset: qtune's has `answer` (the reference's final answer,
  normalised by `qtune.evaluate.gold_answer`) and `sample_id`;
- TRL's `trainer_state`, `log_extra` and `log_metric` (None, and functions that do nothing, in the
  zero-variance pre-pass, which runs before training).

It returns one float per completion (None where it does not apply) and accepts `**kwargs` for what
it does not use. A reward may also ask for an option of the run by naming it as a keyword-only
parameter (`length_penalty(..., *, max_completion_length, ...)`): `bind_options` binds the run's
value, so the function stays a plain function of its inputs.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable

from ..errors import QTuneError

#: name -> reward function, filled by `register` (one file per built-in reward).
REWARDS: dict[str, Callable] = {}


def register(func: Callable) -> Callable:
    """Register a reward under its function name (the name TRL logs it by: `rewards/<name>/mean`)."""
    if func.__name__ in REWARDS:
        raise ValueError(f"reward {func.__name__!r} is already registered")
    REWARDS[func.__name__] = func
    return func


def completion_text(completion) -> str:
    """The text of one completion as TRL passes it: a string, or a list of messages whose last one
    is the assistant's (conversational prompts)."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def parse_spec(spec: str) -> tuple[str, float]:
    """'exact_match' -> ('exact_match', 1.0); 'length_penalty=0.1' -> ('length_penalty', 0.1). The
    name is a registered reward or an import path 'module:function'. ValueError on a bad weight."""
    name, equals, weight = spec.partition("=")
    return name.strip(), float(weight) if equals else 1.0


def resolve(name: str) -> Callable:
    """The reward function named `name`: a registered one, or 'package.module:function' imported."""
    if name in REWARDS:
        return REWARDS[name]
    module, colon, attribute = name.partition(":")
    if not colon:
        raise QTuneError(f"unknown reward {name!r}: registered rewards are {', '.join(sorted(REWARDS))}; "
                         "a reward of your own is named by its import path, module:function")
    try:
        func = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise QTuneError(f"reward {name!r} cannot be imported: {exc}") from None
    if not callable(func):
        raise QTuneError(f"reward {name!r} is not callable")
    return func


def bind_options(func: Callable, options: dict) -> Callable:
    """`func` with each of its keyword-only parameters that names a key of `options` bound to that
    value (`functools.partial`, whose name TRL logs as the function's); `func` itself when it asks
    for none. A keyword-only parameter without a default that `options` lacks is refused."""
    wanted = {name: p for name, p in inspect.signature(func).parameters.items() if p.kind is p.KEYWORD_ONLY}
    missing = [name for name, p in wanted.items() if name not in options and p.default is p.empty]
    if missing:
        raise QTuneError(f"reward {getattr(func, '__name__', func)!r} asks for {', '.join(missing)}, which is "
                         "not an option of qtune rl")
    bound = {name: options[name] for name in wanted if name in options}
    return functools.partial(func, **bound) if bound else func
