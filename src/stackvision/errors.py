"""The one exception type for user errors: what went wrong and what to do about it."""

from __future__ import annotations


class StackvisionError(Exception):
    """A problem with the user's input or set-up, not a bug.

    The CLI prints it as one line (``error: <problem>. <fix>``) and exits with code 2, without a
    traceback. Library callers can catch it like any other exception.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip(".")
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.problem}. {self.fix}" if self.fix else f"{self.problem}."
