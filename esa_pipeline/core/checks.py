"""Reusable value checks for configuration fields and spec dataclasses.

Two forms of the same rules, so a YAML key and a Python argument are refused for the same reasons:
  - pydantic field types for `core/config.py` and any new config section (`FiniteFloat`, `PositiveFloat`,
    `Fraction`, `Count`, `Index`, `Seed`): strict about type (a YAML `true` is not the integer 1 and
    `.inf` / `.nan` are not numbers a sweep can use), so `esa validate` reports them before any run;
  - plain functions for frozen dataclasses such as `Perturbation` (`check_index`, `check_positive`, ...), which
    raise ValueError naming the argument and the fix.

Why strict: Python's `bool` is a subclass of `int`, so `expert=True` silently becomes expert 1 (or, where the
value is used as a divisor or a count, fails deep inside a run); pydantic's lax mode converts `true` to 1 too.
"""

from __future__ import annotations

import math
import numbers
from typing import Annotated

from pydantic import BeforeValidator, Field, Strict

# ---- pydantic field types (config sections) -------------------------------------------------------------
FiniteFloat = Annotated[float, Strict(), Field(allow_inf_nan=False)]
"""Any finite real number (ints accepted, bools, inf and NaN refused)."""
PositiveFloat = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
"""A finite number > 0 (a sigma, a scale factor)."""
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Strict(), Field(gt=0, le=1, allow_inf_nan=False)]
"""A finite fraction in (0, 1]."""
OpenFraction = Annotated[float, Strict(), Field(gt=0, lt=1, allow_inf_nan=False)]
"""A finite fraction in (0, 1) (an error rate: 1 would be no confidence at all)."""
Count = Annotated[int, Strict(), Field(ge=1)]
"""A positive integer count (tokens, items, batch size); bools and floats refused."""
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
Index = Annotated[int, Strict(), Field(ge=0)]
"""A 0-based index (layer, expert); its upper bound depends on the model and is checked against it."""
Seed = Annotated[int, Strict()]
"""A random seed: any integer, never a bool."""


def _refuse_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("true/false is not a number here: write the number itself")
    return value


NotBool = BeforeValidator(_refuse_bool)
"""For numeric `Literal[...]` choices, which pydantic cannot make strict: `Annotated[Literal[0, 32], NotBool]`
(otherwise YAML `false` is accepted as 0)."""


# ---- plain checks (dataclasses, function arguments) -----------------------------------------------------
def is_int(value: object) -> bool:
    """True for ints (numpy ints included) but not bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: object, *, minimum: int | None = None, allow_none: bool = False) -> None:
    """Raise ValueError unless `value` is an int (not a bool) ≥ `minimum` (or None when allowed)."""
    if value is None and allow_none:
        return
    none_hint = " (or None)" if allow_none else ""
    if not is_int(value):
        raise ValueError(f"{name} must be an int{none_hint}, got {value!r} ({type(value).__name__}); "
                         f"pass e.g. {name}={minimum or 0}")  # fmt: skip
    if minimum is not None and value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name} must be >= {minimum}{none_hint}, got {value!r}")


def check_index(name: str, value: object, *, allow_none: bool = True) -> None:
    """A 0-based index (layer, expert): an int ≥ 0, or None where "none/all" is meaningful."""
    check_int(name, value, minimum=0, allow_none=allow_none)


def check_real(name: str, value: object, *, positive: bool = False, at_most: float | None = None) -> float:
    """`value` as a finite float (ValueError for bools, non-numbers, inf/NaN, ≤ 0 with `positive`, > `at_most`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}; use a finite number")
    if positive and out <= 0:
        raise ValueError(f"{name} must be > 0, got {out}")
    if at_most is not None and out > at_most:
        raise ValueError(f"{name} must be <= {at_most}, got {out}")
    return out
