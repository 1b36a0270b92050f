"""``train --preset fast|default|best`` and ``--time-limit``: what each preset sets, and the
duration syntax.

* ``fast``: one backbone (``lite0``), no flip TTA: minutes on a laptop.
* ``default``: the default stack (``fine-grained``, flip TTA).
* ``best``: the default stack, then LP-FT fine-tuned members and a ``best`` ensemble, as much
  as fits in the time limit (:mod:`.best_pipeline`).

A preset sets the backbones and the TTA only where the command line does not name them.
"""

from __future__ import annotations

import re

from .backbones import DEFAULT_STACK
from .errors import StackvisionError

PRESETS: dict[str, dict] = {
    "fast": {"backbones": "lite0", "tta": "none"},
    "default": {"backbones": ",".join(DEFAULT_STACK), "tta": "flip"},
    "best": {"backbones": ",".join(DEFAULT_STACK), "tta": "flip"},
}
#: ``--preset best`` without ``--time-limit``
BEST_DEFAULT_LIMIT = 3600.0

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([hms]?)")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``600``, ``90s``, ``20m``, ``1h``, ``1h30m`` (> 0)."""
    s = str(text).strip().lower().replace(" ", "")
    parts = _PART.findall(s)
    if not s or "".join(n + u for n, u in parts) != s or (len(parts) > 1 and not parts[-1][1]):
        raise ValueError(f"not a duration: {text!r} (e.g. 600, 90s, 20m, 1h, 1h30m)")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"the duration must be > 0, got {text!r}")
    return seconds


def preset_settings(name: str) -> dict:
    """What preset ``name`` sets; a clear error for an unknown one."""
    if name not in PRESETS:
        raise StackvisionError(
            f"unknown preset {name!r}", f"use one of: {', '.join(PRESETS)}"
        )  # fmt: skip
    return dict(PRESETS[name])


def format_duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"
