"""Parameter constraints: one table per estimator, checked at ``fit`` and by the CLI before any work.

Modelled on scikit-learn's ``_parameter_constraints``: each estimator class lists, for each
parameter, the values it accepts (an :class:`Interval`, an :class:`Options` set, a type, or
``None``). :func:`validate_params` checks a parameter dict against such a table and raises
:class:`InvalidParameter` naming the parameter in API words; the CLI re-words it with its flag
(``--folds``) through ``InvalidParameter.flag``.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import StackvisionError


class InvalidParameter(StackvisionError, ValueError):
    """A parameter value outside its constraints (a ``ValueError`` too, as in scikit-learn)."""

    def __init__(self, name: str, value, expected: str, fix: str | None = None, owner: str = ""):
        self.name, self.value, self.expected, self.owner = name, value, expected, owner
        self.fix_hint = fix
        super().__init__(self._problem(name), fix)

    def _problem(self, label: str) -> str:
        return f"{self.owner + ': ' if self.owner else ''}{label} must be {self.expected}, got {self.value!r}"

    def flag(self, label: str) -> StackvisionError:
        """The same error worded for a command line, ``label`` being the flag (``--folds``)."""
        return StackvisionError(
            f"{label} must be {self.expected}, got {self.value!r}", self.fix_hint or None
        )


@dataclass(frozen=True)
class Interval:
    """A real or integral range. ``closed`` in {"both", "left", "right", "neither"}."""

    type: type  # numbers.Integral or numbers.Real
    left: float | None
    right: float | None
    closed: str = "both"

    def accepts(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, self.type):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return False
        lo_ok = self.left is None or (
            v >= self.left if self.closed in ("both", "left") else v > self.left
        )
        hi_ok = self.right is None or (
            v <= self.right if self.closed in ("both", "right") else v < self.right
        )
        return lo_ok and hi_ok

    def __str__(self) -> str:
        kind = "an integer" if self.type is numbers.Integral else "a number"
        lo = "" if self.left is None else (">= " if self.closed in ("both", "left") else "> ")
        hi = "" if self.right is None else ("<= " if self.closed in ("both", "right") else "< ")
        parts = []
        if self.left is not None:
            parts.append(f"{lo}{_num(self.left)}")
        if self.right is not None:
            parts.append(f"{hi}{_num(self.right)}")
        return kind + (" " + " and ".join(parts) if parts else "")


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values."""

    values: tuple

    def __init__(self, values: Iterable):
        object.__setattr__(self, "values", tuple(values))

    def accepts(self, v) -> bool:
        if isinstance(v, bool) and not any(isinstance(x, bool) for x in self.values):
            return False  # True == 1 and False == 0, yet neither is a count
        return isinstance(v, str | int | float | type(None)) and v in self.values

    def __str__(self) -> str:
        if len(self.values) == 1:
            return repr(self.values[0])
        return "one of " + ", ".join(repr(v) for v in self.values)


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _accepts(c, v) -> bool:
    if c is None:
        return v is None
    if isinstance(c, Interval | Options):
        return c.accepts(v)
    if c == "callable":
        return callable(v)
    if isinstance(c, type):
        return isinstance(v, c) and not (c is not bool and isinstance(v, bool))
    raise TypeError(f"unknown constraint {c!r}")


def _describe(c) -> str:
    if c is None:
        return "None"
    if isinstance(c, type):
        return {str: "a string", dict: "a dict", list: "a list", bool: "True or False"}.get(
            c, f"a {c.__name__}"
        )
    return str(c)


def describe(constraints: list) -> str:
    """Human words for a list of constraints: ``an integer >= 2 or 0``."""
    return " or ".join(_describe(c) for c in constraints)


def validate_params(
    constraints: Mapping[str, list], params: Mapping, owner: str = "", fixes: Mapping | None = None
) -> None:
    """Raise :class:`InvalidParameter` for the first value in ``params`` outside its constraints.

    Parameters absent from ``constraints`` are not checked here (unknown names are caught by
    :func:`check_known`); ``fixes`` maps a parameter to a hint for the message.
    """
    for name, allowed in constraints.items():
        if name not in params:
            continue
        v = params[name]
        if not any(_accepts(c, v) for c in allowed):
            raise InvalidParameter(name, v, describe(allowed), (fixes or {}).get(name), owner)


class UnknownParameter(StackvisionError, TypeError, ValueError):
    """A parameter name the estimator does not have (a ``TypeError`` like any wrong keyword
    argument, and a ``ValueError`` as scikit-learn's ``set_params`` raises)."""

    def __init__(self, problem: str, fix: str | None = None, name: str = ""):
        self.name = name
        super().__init__(problem, fix)


def check_known(
    names: Iterable[str],
    known: Iterable[str],
    owner: str,
    what: str = "parameter",
    hints: Mapping[str, str] | None = None,
):
    """Raise :class:`UnknownParameter` for names not in ``known``, suggesting the closest known
    name (or the hint ``hints`` gives for that name)."""
    known = list(known)
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, known, n=1)
            if hints and n in hints:
                fix = hints[n]
            elif close:
                fix = f"did you mean '{close[0]}'?"
            else:
                fix = f"known {what}s: {', '.join(sorted(known))}"
            raise UnknownParameter(f"{owner}: unknown {what} '{n}'", fix, n)
