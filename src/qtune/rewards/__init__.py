"""Rewards of `qtune rl`, one file per reward, registered by name; the contract is in
`qtune.rewards.base`. Built in:

- `exact_match`: 1 when the completion's `#### N` is the reference answer (`qtune eval`'s strict
  extractor and normalisation), else 0;
- `answer_format`: 1 when the completion has exactly one `#### N` line, else 0;
- `length_penalty`: -(completion tokens) / max_completion_length.

A reward of your own is named by its import path, `module:function` (see docs/rl.md).
"""

from .answer_format import answer_format
from .base import REWARDS, bind_options, completion_text, parse_spec, register, resolve
from .exact_match import exact_match
from .length_penalty import length_penalty

__all__ = ["REWARDS", "answer_format", "bind_options", "completion_text", "exact_match", "length_penalty", "parse_spec",
           "register", "resolve"]
