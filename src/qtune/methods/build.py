"""Building a method by name: a registered method (`base.METHODS`) or "SAMPLE+TOKEN", a sample
rule and a token rule combined (`rules.composed_class`). Kept apart from `base` so that the
contract does not depend on the rules built on it."""

from __future__ import annotations

import dataclasses

from ..config import composed_parts, method_choices
from ..errors import QTuneError
from .base import METHODS, Method
from .rules import composed_class


def method_class(name: str) -> type[Method]:
    """The class of method `name`: a registered one, or "SAMPLE+TOKEN", a sample rule and a token
    rule combined (`qtune.methods.rules`). QTuneError naming what is available otherwise."""
    if name in METHODS:
        return METHODS[name]
    if composed_parts(name):
        return composed_class(name)
    raise QTuneError(f"unknown method {name!r}; available: {method_choices()}")


def build_method(name: str, config) -> Method:
    """The method `name` (see `method_class`), given its own options taken by name from `config`
    (a TrainConfig, or any object with those fields)."""
    cls = method_class(name)
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls.config_class)}
    return cls(cls.config_class(**options))
