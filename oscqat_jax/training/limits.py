"""What a config field may hold: the pieces :data:`oscqat_jax.training.build.LIMITS` is
written with (a checked predicate and the words that say what is valid)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Limit:
    """What one config field may hold; ``valid`` says it in words for the error sentence."""

    check: Callable[[object], bool]
    valid: str
    optional: bool = False  # None is allowed (the field's "off" value)


def whole(low: int, high: int | None = None) -> Callable[[object], bool]:
    """An int (not a bool) in ``[low, high]`` (no upper bound when ``high`` is None)."""

    def check(value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return False
        return low <= value and (high is None or value <= high)

    return check


def finite(check: Callable[[float], bool]) -> Callable[[object], bool]:
    """A finite real number (NaN and infinities never are valid) that passes ``check``."""

    def number_check(value) -> bool:
        return (
            isinstance(value, numbers.Real)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and check(value)
        )

    return number_check


def one_of(choices) -> Limit:
    return Limit(lambda value: value in choices, f"use one of {', '.join(choices)}")


IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
"""``package.module:attribute`` (the attribute may be dotted): how a config names a user's
model (``model.name``) or rules factory (``quant.rules``)."""


def is_import_path(value) -> bool:
    return isinstance(value, str) and IMPORT_PATH.fullmatch(value) is not None
