"""What the verbs print: tables, progress-free messages, the list of files left out."""

from __future__ import annotations

import sys


def table(rows: list[dict], cols: list[str], decimals: dict[str, int] | None = None) -> str:
    """A plain text table; numeric columns right-aligned, floats with 4 decimals (or
    ``decimals[column]``)."""

    def fmt(v, col):
        if isinstance(v, float):
            return f"{v:.{(decimals or {}).get(col, 4)}f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c), c) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    sep = "  ".join("-" * w for w in widths)
    numeric = [
        all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows) for c in cols
    ]
    body = [
        "  ".join(
            v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))
        )
        for row in cells
    ]
    return "\n".join([line, sep, *body])


def say(args, text: str = "") -> None:
    """Print a message; to stderr when stdout carries data (``predict`` without ``--out``)."""
    print(
        text, file=sys.stderr if getattr(args, "stdout_is_data", False) else sys.stdout, flush=True
    )


def report_problems(problems, args) -> None:
    if problems:
        say(args, f"warning: {len(problems)} file(s) left out:")
        for p in problems[:10]:
            say(args, f"  {p.path}: {p.reason}")
        if len(problems) > 10:
            say(
                args, f"  ... and {len(problems) - 10} more (listed in metrics.json and the report)"
            )


METRIC_COLS = ["evaluated on", "n_images", "accuracy", "top5_accuracy", "log_loss"]
